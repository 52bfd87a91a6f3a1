"""From C-STORE to the PACS: dcmtk sends a phantom study to a daemon with worker processes and an
active (synthetic) model; the heatmaps and the study's SR arrive in a running Orthanc, in the
source study, and every object usfmd wrote passes dciodvfy and dsrdump.

The model here is a tiny encoder with a fresh head: it proves the plumbing, not accuracy (that
is tests/integration/test_train_demo.py). Like every phantom-trained model it is marked
synthetic, and the SR says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from sqlalchemy import select

from daemon.db.models import (
    Finding,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Study,
)
from daemon.models.registry import activate, import_model
from daemon.service import Daemon
from pipelines.models import build_task_model, get_encoder_card
from pipelines.models.modelfile import save_model_file
from pipelines.phantom import make_cine, make_phantom
from pipelines.phantom.dicom import write_phantom
from pipelines.report.validate import dciodvfy, dsrdump
from pipelines.tasks import get_task
from training.demo import DemoConfig, DemoResult, demo_algorithm_name
from training.phantom_data import draw_phantom

from dispatch_peers import orthanc
from helpers import dcmtk, run_peer, ultrasound_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: Held-out phantoms sent through the daemon (the demo's own test split).
N_HELD_OUT = 40


def _tiny_model(path: Path) -> Path:
    card = get_encoder_card("usf-mae-vit-b16")
    model = build_task_model("heart_view", "usf-mae-vit-b16", overrides=dict(card.tiny_overrides))
    save_model_file(path, model, synthetic=True)
    return path


def _study(directory: Path) -> list[Path]:
    directory.mkdir()
    files = {
        "heart-raw.dcm": ([make_phantom(41, "heart")], ExplicitVRLittleEndian),
        "heart-cine.dcm": (make_cine(41, 4, "heart"), JPEGBaseline8Bit),
    }
    for name, (frames, syntax) in files.items():
        write_phantom(directory / name, frames, transfer_syntax=syntax)
    return sorted(directory.iterdir())


def test_phantom_study_results_arrive_in_orthanc(
    tmp_path: Path, db_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        daemon = start_daemon(
            database={"url": db_url},
            queue={"workers": 1, "poll_seconds": 0.1},
            study={"stable_seconds": 1, "sweep_interval_seconds": 0.5},
            models={"reload_seconds": 0.5},
            # Only the task this model answers: unrouted, the other built-in tasks would leave
            # the jobs awaiting their models.
            analysis={"routes": [{"task": "heart_view", "match": {"Modality": "US"}}]},
            dispatch={
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                ],
                "poll_seconds": 0.1,
            },
        )
        with daemon.db.write() as session:
            version = import_model(
                session,
                _tiny_model(tmp_path / "tiny.pt"),
                version="plumbing-1",
                synthetic=True,
                data_dir=daemon.settings.storage.data_dir,
            )
            session.flush()
            activate(session, version.id, allow_synthetic=True)
        files = _study(tmp_path / "study")
        (real_cine,) = [p for p in ultrasound_files() if p.name == "color3d_jpeg_baseline.dcm"]
        port = str(daemon.settings.dicom.port)
        sent = run_peer(
            [dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", port, *map(str, [*files, real_cine])]
        )
        assert sent.returncode == 0, sent.stderr

        def delivered(count: int) -> bool:
            with daemon.db.read() as session:
                items = list(session.scalars(select(OutboxItem)))
            return len(items) == count and all(i.state == OutboxState.SENT for i in items)

        # Phantom study: two heatmaps and its SR; the real 120-frame cine: one heatmap, one SR.
        wait_for(lambda: delivered(5), 240, "three heatmaps and two SRs sent to Orthanc")
        with daemon.db.read() as session:
            findings = list(session.scalars(select(Finding)))
            states = set(session.scalars(select(Job.state).where(Job.kind == "analyze")))
            ours = [
                (row.sop_class_uid, row.path)
                for row in session.scalars(select(Instance).where(Instance.analysable.is_(False)))
            ]
        assert len(findings) == 3 and states == {JobState.DONE}
        assert {f.task for f in findings} == {"heart_view"}
        assert sorted(f.frames for f in findings) == [1, 4, 120]

        source_studies = {
            str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in [*files, real_cine]
        }
        studies = pacs.rest("GET", "/studies")
        held_studies = {
            pacs.rest("GET", f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in studies
        }
        assert held_studies == source_studies, "results must join their source studies"
        held = {
            pacs.rest("GET", f"/instances/{i}/simplified-tags")["SOPClassUID"]
            for i in pacs.rest("GET", "/instances")
        }
        assert held == {SR_CLASS, SC_CLASS}

        # A late image re-opens the phantom study: its heatmap, then an SR covering all three
        # findings that names the study's first SR as its predecessor.
        first_srs = _srs(daemon)
        late = dcmread(files[0])
        late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = "2.25.4242"
        late.InstanceNumber = 9
        late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
        sent = run_peer(
            [dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", port, str(tmp_path / "late.dcm")]
        )
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: delivered(7), 240, "the late heatmap and the new SR sent")
        (superseding,) = set(_srs(daemon)) - set(first_srs)
        (replaced,) = [uid for uid, study in first_srs.items() if study == late.StudyInstanceUID]
        with daemon.db.read() as session:
            ours = [
                (row.sop_class_uid, row.path)
                for row in session.scalars(select(Instance).where(Instance.analysable.is_(False)))
            ]
            path = session.scalar(
                select(Instance.path).where(Instance.sop_instance_uid == superseding)
            )
        new_sr = dcmread(daemon.archive.absolute(path))
        (study_item,) = new_sr.PredecessorDocumentsSequence
        (series_item,) = study_item.ReferencedSeriesSequence
        assert [r.ReferencedSOPInstanceUID for r in series_item.ReferencedSOPSequence] == [replaced]
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in new_sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert len(evidence) == 3 and late.SOPInstanceUID in evidence
        held_uids = {
            pacs.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
            for i in pacs.rest("GET", "/instances")
        }
        assert {superseding, replaced} <= held_uids

    archive = daemon.archive
    assert len(ours) == 7
    for _, path in ours:
        verdict = dciodvfy(archive.absolute(path))
        assert verdict.errors == (), verdict.errors
    for sop_class, path in ours:
        if sop_class == SR_CLASS:
            (name,) = _text_values(dcmread(archive.absolute(path)), "111001")  # Algorithm Name
            assert "synthetic" in name
            text, _ = dsrdump(archive.absolute(path))  # (dsrdump cuts long TEXT values short)
            assert "First-trimester fetal heart view" in text and "Probability" in text


def _srs(daemon: Daemon) -> dict[str, str]:
    """SOP Instance UID → Study Instance UID of every SR the daemon has made."""
    with daemon.db.read() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Study.study_instance_uid)
            .join(Study, Study.id == Instance.study_pk)
            .where(Instance.sop_class_uid == SR_CLASS)
        ).all()
    return {str(sop): str(study) for sop, study in rows}


def test_demo_model_through_the_daemon_is_accurate_and_says_synthetic(
    tmp_path: Path, start_daemon: Callable[..., Daemon], demo_model: DemoResult
) -> None:
    """Held-out phantoms sent with dcmsend, analysed by ``usfmd serve``'s workers with the
    trained demo model: ≥ 95 % of the findings are right, and every SR names the algorithm as a
    synthetic demo. The clean stage runs with the settings the model was trained with."""
    config = DemoConfig()
    spec = config.data_spec()
    directory = tmp_path / "held-out"
    directory.mkdir()
    truth: dict[str, str] = {}
    classes = get_task(config.task).class_names
    for index in range(N_HELD_OUT):
        sample, label = draw_phantom(spec, "test", index)
        ds = write_phantom(directory / f"{index:03}.dcm", [sample])
        truth[str(ds.SOPInstanceUID)] = classes[label]
    daemon = start_daemon(
        queue={"workers": 2, "poll_seconds": 0.1},
        study={"stable_seconds": 1, "sweep_interval_seconds": 0.5},
        # The daemon's default inpaint masks all colour; the demo model reads colour flow and its
        # file says so: its frames must be cleaned as it was trained, without this config.
        analysis={"routes": [{"task": config.task}]},
    )
    with daemon.db.write() as session:
        version = import_model(
            session,
            demo_model.path,
            version="demo-1",
            synthetic=True,
            data_dir=daemon.settings.storage.data_dir,
            algorithm_name=demo_algorithm_name(config.task),
        )
        session.flush()
        activate(session, version.id, allow_synthetic=True)
    port = str(daemon.settings.dicom.port)
    files = sorted(map(str, directory.iterdir()))
    sent = run_peer([dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", port, *files])
    assert sent.returncode == 0, sent.stderr

    def reports_done() -> bool:
        with daemon.db.read() as session:
            jobs = session.execute(select(Job.kind, Job.state)).all()
        return len(jobs) == 2 * N_HELD_OUT and all(s == JobState.DONE for _, s in jobs)

    wait_for(reports_done, 300, f"{N_HELD_OUT} analyses and their SRs")
    with daemon.db.read() as session:
        found = dict(
            session.execute(
                select(Instance.sop_instance_uid, Finding.class_name).join(
                    Finding, Finding.instance_pk == Instance.id
                )
            ).all()
        )
        srs = list(session.scalars(select(Instance.path).where(Instance.sop_class_uid == SR_CLASS)))
    right = sum(found.get(uid) == label for uid, label in truth.items())
    assert right / N_HELD_OUT >= 0.95, f"{right} of {N_HELD_OUT} right"
    assert len(srs) == N_HELD_OUT  # one study per phantom, one SR each
    for path in srs:
        sr = dcmread(daemon.archive.absolute(path))
        assert _text_values(sr, "111001") == {demo_algorithm_name(config.task)}  # Algorithm Name
    text, _ = dsrdump(daemon.archive.absolute(srs[0]))
    assert "synthetic" in text


def _text_values(node: Any, concept: str) -> set[str]:
    """TEXT values of content items named ``concept`` (DCM code value), anywhere in the tree."""
    found = set()
    for item in node.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if names and names[0].CodeValue == concept and "TextValue" in item:
            found.add(str(item.TextValue))
        found |= _text_values(item, concept)
    return found
