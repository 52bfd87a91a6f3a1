"""The clean stage (scrub, then inpaint, per frame; one strip decision per instance) and the
``analyze`` job around it: phantoms in a temporary archive, a real queue on both backends."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from sqlalchemy import func, select

from daemon.config import Settings, load_settings
from daemon.db import queue
from daemon.db.engine import Database
from daemon.db.models import Finding, Job, JobState, ModelVersion
from daemon.db.studies import ANALYZE
from daemon.models.registry import ModelRegistryError
from daemon.receive.archive import Archive
from daemon.service import open_archive, open_database
from daemon.worker.analyze import AWAITING_REASON, Interrupted, analyze_instance, clean_params
from daemon.worker.handlers import HANDLERS, JobFailed, JobReleased, WorkContext
from daemon.worker.loop import Worker
from pipelines.clean import (
    Cleaner,
    CleanParams,
    NoStripConfigured,
    TooMuchToInpaint,
    clean_instance,
)
from pipelines.decode import YBRConverter, iter_frames
from pipelines.inpaint import InpaintParams, inpaint
from pipelines.phantom import frame_meta, make_cine, make_phantom
from pipelines.phantom.dicom import phantom_dataset
from pipelines.scrub import ScrubParams, UnscrubbedFrameError, require_scrubbed, scrub_band

from helpers import MOSTLY_COLOUR, archive_stable, ultrasound_files

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


# --- the clean stage --------------------------------------------------------------------------


def test_clean_is_scrub_then_inpaint_exactly() -> None:
    sample = make_phantom(2, "head", style="grey")
    meta = frame_meta(sample, sop_instance_uid="2.25.7")
    cleaned = Cleaner()(sample.annotated, meta)
    scrubbed, report = scrub_band(sample.annotated, meta)
    expected, mask = inpaint(scrubbed)
    assert np.array_equal(cleaned.pixels, expected)
    assert cleaned.scrub == report and cleaned.report.band_rows == report.band_height > 0
    assert cleaned.report.masked_fraction == pytest.approx(mask.mean())
    assert not cleaned.pixels.flags.writeable
    assert not cleaned.pixels[sample.phi_mask].any(), "an identifier pixel left the clean stage"
    require_scrubbed(meta, cleaned.scrub)


def test_one_strip_decision_serves_every_frame_of_a_cine() -> None:
    cine = make_cine(4, 3, "heart")
    frames = [np.array(s.annotated) for s in cine]
    # Text only on the first frame's strip: later frames are still cut as the first was.
    for frame in frames[1:]:
        frame[: cine[0].phi_band_height] = 0
    cleaner = Cleaner()
    outs = [
        cleaner(frame, frame_meta(s, sop_instance_uid="2.25.8", frame_index=i, number_of_frames=3))
        for i, (frame, s) in enumerate(zip(frames, cine, strict=True))
    ]
    assert len({o.report.band_rows for o in outs}) == 1 and outs[0].report.band_rows > 0
    assert [o.scrub.frame_index for o in outs if o.scrub] == [0, 1, 2]
    # A new instance gets its own decision.
    blank = np.zeros((600, 800, 3), np.uint8)
    assert cleaner(blank, frame_meta(cine[0], sop_instance_uid="2.25.9")).report.band_rows == 0


def test_owned_frames_are_scrubbed_in_place_others_are_not_touched() -> None:
    sample = make_phantom(3, "head")
    meta = frame_meta(sample)
    mine = np.array(sample.annotated)
    Cleaner()(mine, meta)
    assert np.array_equal(mine, sample.annotated)
    Cleaner()(mine, meta, owned=True)
    assert not mine[sample.phi_mask].any()


def test_configured_strips_and_detection_off() -> None:
    sample = make_phantom(5, "heart")
    meta = frame_meta(sample)
    configured = CleanParams(
        scrub=ScrubParams(strips={("usfmd-phantom", "*"): 44}), detect_band=False
    )
    out = Cleaner(configured)(sample.annotated, meta)
    assert (out.report.band_method, out.report.band_rows) == ("configured", 44)
    with pytest.raises(NoStripConfigured, match="usfmd-phantom.*detect_band is off"):
        Cleaner(CleanParams(detect_band=False))(sample.annotated, meta)
    # A header saying Burned In Annotation NO may pass unscrubbed when detection is off...
    said_no = dataclasses.replace(meta, burned_in_annotation=False)
    passed = Cleaner(CleanParams(detect_band=False))(sample.annotated, said_no)
    assert passed.scrub is None and passed.report.band_method == "none"
    # ...but never one that says YES (the guard is the clean stage's last step).
    with pytest.raises(UnscrubbedFrameError):
        require_scrubbed(meta, passed.scrub)


def test_clean_instance_streams_a_jpeg_cine(tmp_path: Path) -> None:
    cine = make_cine(6, 4, "heart")
    path = tmp_path / "cine.dcm"
    phantom_dataset(cine, transfer_syntax=JPEGBaseline8Bit).save_as(path, enforce_file_format=True)
    frames = list(clean_instance(path))
    assert [f.meta.frame_index for f in frames] == [0, 1, 2, 3]
    assert all(f.report.decode_ms > 0 and f.report.inpaint_ms > 0 for f in frames)
    for frame, sample in zip(frames, cine, strict=True):
        assert frame.pixels.shape == (600, 800, 3)
        assert frame.pixels[: frame.report.band_rows].max() == 0
        assert frame.report.band_rows >= sample.phi_mask.nonzero()[0].max() + 1


def test_ybr_conversion_equals_pydicom_on_every_input() -> None:
    convert = YBRConverter()
    values = np.arange(256, dtype=np.uint8)
    for y0 in range(0, 256, 32):  # all 2^24 (Y, Cb, Cr), 2M at a time
        y, cb, cr = np.meshgrid(values[y0 : y0 + 32], values, values, indexing="ij")
        ybr = np.ascontiguousarray(np.stack([y, cb, cr], axis=-1).reshape(2048, 1024, 3))
        expected = convert_color_space(ybr, "YBR_FULL", "RGB")
        assert np.array_equal(convert(ybr), expected), f"Y {y0}..{y0 + 31}"


# --- the analyze job ----------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return load_settings(
        None,
        storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
        database={"url": db_url},
        queue={"workers": 0},
    )


@pytest.fixture
def ctx(settings: Settings) -> Iterator[WorkContext]:
    db = open_database(settings)
    yield WorkContext(settings, db, open_archive(settings), "test-worker")
    db.dispose()


def _archive(db: Database, archive: Archive, ds: Dataset) -> int:
    """Store and index ``ds`` as receive does, make its study stable; return the job id."""
    archive_stable(db, archive, ds, NOW)
    with db.read() as session:
        job = session.scalar(select(Job).where(Job.kind == ANALYZE).order_by(Job.id.desc()))
        assert job is not None
        return job.id


def _claim(ctx: WorkContext) -> queue.ClaimedJob:
    (job,) = queue.claim(ctx.db, ctx.worker, datetime.now(UTC), 60, 5, kinds=[ANALYZE])
    return job


def test_analyze_job_awaits_a_model_with_the_stage_report(
    ctx: WorkContext, caplog: pytest.LogCaptureFixture
) -> None:
    cine = make_cine(11, 3, "heart")
    _archive(ctx.db, ctx.archive, phantom_dataset(cine, transfer_syntax=JPEGBaseline8Bit))
    job = _claim(ctx)
    with caplog.at_level(logging.INFO):
        outcome = HANDLERS[ANALYZE](ctx, job)
    assert outcome.state is JobState.AWAITING_MODEL
    assert outcome.payload["awaiting"] == AWAITING_REASON
    stages = outcome.payload["stages"]
    assert (stages["frames"], stages["rows"], stages["columns"]) == (3, 600, 800)
    assert stages["photometric_interpretation"] == "YBR_FULL_422" and stages["lossy"]
    assert stages["band"]["method"] == "detected" and stages["band"]["region_source"] == "header"
    assert 0 < stages["band"]["rows"] <= cine[0].phi_band_height
    assert 0 < stages["masked_fraction"]["mean"] <= stages["masked_fraction"]["max"] < 0.1
    assert set(stages["ms_per_frame"]) == {"decode", "scrub", "inpaint", "total"}
    assert "prediction" not in outcome.payload and "probability" not in str(outcome.payload)
    queue.complete(ctx.db, job, ctx.worker, NOW, outcome.payload, outcome.state)
    with ctx.db.read() as session:
        assert session.get(Job, job.id).state is JobState.AWAITING_MODEL  # type: ignore[union-attr]
    patient = cine[0].patient
    assert patient.name not in caplog.text and patient.patient_id not in caplog.text


def test_an_active_version_whose_file_is_missing_fails_closed(ctx: WorkContext) -> None:
    """The registry names an active version but its weights are gone: the job fails with the
    registry's reason and nothing is concluded (no finding from a model that did not load)."""
    _archive(ctx.db, ctx.archive, phantom_dataset([make_phantom(12, "head")]))
    with ctx.db.write() as session:
        session.add(
            ModelVersion(
                task="ventriculomegaly",
                version="1",
                algorithm_name="test",
                encoder="usf-mae-vit-b16",
                preprocessing="usf-mae",
                classes=["normal", "ventriculomegaly"],
                path="x.pt",
                sha256="0" * 64,
                device_uid="2.25.1234",
                active=True,
                created_at=NOW,
            )
        )
    with pytest.raises(ModelRegistryError, match="x.pt"):
        HANDLERS[ANALYZE](ctx, _claim(ctx))
    with ctx.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == 0


def test_undecodable_instance_fails_without_patient_data(ctx: WorkContext) -> None:
    sample = make_phantom(13, "head")
    ds = phantom_dataset([sample])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # truncated frame
    _archive(ctx.db, ctx.archive, ds)
    with pytest.raises(JobFailed) as failure:
        HANDLERS[ANALYZE](ctx, _claim(ctx))
    message = str(failure.value)
    assert "DecodeError" in message and ds.SOPInstanceUID in message
    assert sample.patient.name not in message and sample.patient.patient_id not in message
    assert failure.value.permanent


def test_a_mostly_colour_instance_fails_for_good_naming_the_frame(ctx: WorkContext) -> None:
    """A sector under a yellow colour map would be inpainted almost whole: refused, never shown
    to a model, and not retried (the same pixels give the same answer)."""
    sample = make_phantom(16, "head")
    grey = sample.annotated.mean(axis=2)
    # A yellow map over the sector, lifting dark speckle as tint maps do: ~30 % of the frame.
    level = (np.clip(grey * 1.6 + 70, 0, 255) * (grey > 5)).astype(np.uint8)
    yellow = np.stack([level, level, level // 10], axis=-1)
    ds = phantom_dataset([dataclasses.replace(sample, annotated=yellow)])
    _archive(ctx.db, ctx.archive, ds)
    with pytest.raises(JobFailed) as failure:
        HANDLERS[ANALYZE](ctx, _claim(ctx))
    message = str(failure.value)
    assert f"TooMuchToInpaint: SOP Instance {ds.SOPInstanceUID} frame 0" in message
    assert "max_inpainted_fraction" in message and sample.patient.name not in message
    assert failure.value.permanent


def test_worker_dead_letters_a_permanent_failure_at_once(ctx: WorkContext) -> None:
    """Retrying cannot change the archived bytes: an undecodable instance is dead after one
    attempt (an operator can still ``usfmd jobs retry`` it)."""
    ds = phantom_dataset([make_phantom(15, "head")])
    ds.PixelData = ds.PixelData[:100]
    job_id = _archive(ctx.db, ctx.archive, ds)
    assert Worker(ctx).run_once()
    with ctx.db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts) == (JobState.DEAD, 1)
        assert job.last_error is not None and "DecodeError" in job.last_error


def test_missing_file_and_missing_instance(ctx: WorkContext) -> None:
    ds = phantom_dataset([make_phantom(14, "heart")])
    _archive(ctx.db, ctx.archive, ds)
    relative = Archive.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    ctx.archive.absolute(relative).unlink()
    with pytest.raises(JobFailed, match="archived file missing"):
        HANDLERS[ANALYZE](ctx, _claim(ctx))
    orphan = dataclasses.replace(_claim_again(ctx), instance_pk=None)
    with pytest.raises(JobFailed, match="names no instance"):
        HANDLERS[ANALYZE](ctx, orphan)


def _claim_again(ctx: WorkContext) -> queue.ClaimedJob:
    with ctx.db.write() as session:
        job = queue.enqueue(session, ANALYZE, NOW)
        session.flush()
        job_id = job.id
    (claimed,) = [j for j in queue.claim(ctx.db, "w2", datetime.now(UTC), 60, 5) if j.id == job_id]
    return claimed


def test_stopping_worker_releases_the_job_between_frames(ctx: WorkContext) -> None:
    _archive(ctx.db, ctx.archive, phantom_dataset(make_cine(15, 3, "heart")))
    job = _claim(ctx)
    ctx.stopping.set()
    with pytest.raises(JobReleased, match="worker stopping") as raised:
        HANDLERS[ANALYZE](ctx, job)
    assert isinstance(raised.value.__cause__, Interrupted)  # not a failure: nothing recorded
    with ctx.db.read() as session:
        row = session.get(Job, job.id)
        assert row is not None and row.state is JobState.QUEUED and row.attempts == 0
        assert row.last_error is None


def test_lost_lease_stops_the_analysis(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    phantom_dataset(make_cine(16, 4, "heart")).save_as(path, enforce_file_format=True)
    seen: list[int] = []
    lost = iter([None, None, "lease lost"])
    with pytest.raises(Interrupted, match="lease lost"):
        analyze_instance(
            path,
            CleanParams(),
            sink=lambda frame: seen.append(frame.meta.frame_index),
            should_stop=lambda: next(lost),
        )
    assert seen == [0, 1]  # stopped before decoding the third frame
    whole = analyze_instance(path, CleanParams())
    assert whole.frames == 4 and whole.as_dict()["band"]["rows"] > 0


def test_pipeline_settings_become_clean_params() -> None:
    default = clean_params(load_settings(None).pipeline)
    assert default == CleanParams(), "config defaults must equal the stage's own defaults"
    custom = load_settings(
        None,
        pipeline={
            "scrub_bands": [
                {"manufacturer": "GE Healthcare", "model": "Voluson E10", "rows": 60},
                {"manufacturer": "Philips", "rows": 48},
            ],
            "detect_band": False,
            "inpaint": {"radius": 5, "colour_flow_min_area": 200},
        },
    ).pipeline
    params = clean_params(custom)
    assert params.scrub.configured_strip("ge healthcare", "VOLUSON E10") == 60
    assert params.scrub.configured_strip("Philips", "EPIQ 7") == 48
    assert params.scrub.configured_strip("Samsung", "HERA") is None
    assert not params.detect_band
    assert params.inpaint == InpaintParams(radius=5, colour_flow_min_area=200)


def test_native_and_jpeg_frames_decode_to_what_the_phantom_holds(tmp_path: Path) -> None:
    sample = make_phantom(17, "heart")
    for syntax in (ExplicitVRLittleEndian, JPEGBaseline8Bit):
        path = tmp_path / f"{syntax}.dcm"
        phantom_dataset([sample], transfer_syntax=syntax).save_as(path, enforce_file_format=True)
        ((frame, _),) = list(iter_frames(path))
        error = np.abs(frame.astype(int) - sample.annotated).mean()
        assert error == 0 if syntax == ExplicitVRLittleEndian else error < 3


@pytest.mark.parametrize("path", ultrasound_files(), ids=lambda p: p.name)
def test_every_corpus_file_goes_through_decode_and_clean(path: Path) -> None:
    """Real scanners' files, including an ultrasound region that starts at the top row (no room
    for a strip above it), which once crashed the strip detector; the mostly colour ones are
    refused, naming the frame, and pass only with the limit off."""
    settings = load_settings(None)
    params = clean_params(settings.pipeline)
    if path.name in MOSTLY_COLOUR:
        frame, share = MOSTLY_COLOUR[path.name]
        with pytest.raises(TooMuchToInpaint, match=rf"frame {frame}: {share} of the frame"):
            analyze_instance(path, params)
        params = dataclasses.replace(params, max_inpainted_fraction=None)
    summary = analyze_instance(path, params)
    assert summary.frames >= 1


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.01])
def test_max_inpainted_fraction_must_be_a_share(limit: float) -> None:
    with pytest.raises(ValueError, match="max_inpainted_fraction"):
        CleanParams(max_inpainted_fraction=limit)
