"""Ingest of the whole US corpus from real dcmtk peers, then stability and its jobs.

Every file of ``ultrasound_files()`` is sent in its own transfer syntax (``dcmsend``, and
``storescu`` with the per-syntax proposal flag), and must come back from the archive in that same
syntax with identical decoded pixels. The corpus reuses SOP Instance UIDs across files (the same
image in several encodings), so each test sends copies whose only change is a fresh SOP Instance
UID: pixel data, study, series and patient are untouched.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from daemon.db.models import Instance, Job, JobState, Patient, Series, Study, StudyState
from daemon.db.studies import ANALYZE
from daemon.service import Daemon

from helpers import dcmtk, run_peer, ultrasound_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

#: storescu proposes one family of syntaxes per run (``storescu --help``, "proposed transmission
#: transfer syntaxes"); this flag puts the file's own syntax on offer so it goes out unchanged.
STORESCU_FLAG: dict[str, str] = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    JPEGBaseline8Bit: "-xy",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}
UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})


def as_is(syntax: str) -> str:
    return syntax


def as_dcmsend_sends(syntax: str) -> str:
    """An uncompressed file goes out in one context offering every uncompressed syntax, Explicit
    VR Little Endian first (``dcmsend -d``): dcmsend itself converts big endian and implicit VR.
    With ``-dn`` (never decompress) a compressed file is offered in its own syntax only."""
    return ExplicitVRLittleEndian if syntax in UNCOMPRESSED else syntax


@dataclass(frozen=True)
class Sample:
    """A corpus file, its sendable copy and what the index must say about it."""

    original: Path
    copy: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str
    frames: int


def unique_copy(original: Path, directory: Path) -> Sample:
    """Copy ``original`` with a new SOP Instance UID; everything else is kept byte for byte."""
    ds = pydicom.dcmread(original)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / f"{uid}.dcm"
    ds.save_as(copy, enforce_file_format=True)
    return Sample(
        original=original,
        copy=copy,
        sop_instance_uid=uid,
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sample, ...]:
    directory = tmp_path_factory.mktemp("corpus")
    return tuple(unique_copy(f, directory) for f in ultrasound_files())


@functools.cache
def original_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def dcmsend(port: int, files: Iterable[Path], *options: str) -> None:
    args = [dcmtk("dcmsend"), *options, "-aet", "DCMSEND", "-aec", "USFMD", "127.0.0.1", str(port)]
    result = run_peer(args + [str(f) for f in files])
    assert result.returncode == 0, result.stderr


def storescu_as_is(port: int, samples: Iterable[Sample]) -> None:
    """One storescu run per proposal flag, so that each file keeps its transfer syntax."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for sample in samples:
        groups[STORESCU_FLAG[sample.transfer_syntax_uid]].append(sample.copy)
    for flag, files in groups.items():
        # -R: contexts for the files' own SOP classes only (storescu's default list lacks the
        # retired US classes that part of the corpus uses).
        args = [dcmtk("storescu"), flag, "-R", "-aet", "STORESCU", "-aec", "USFMD", "127.0.0.1"]
        result = run_peer(args + [str(port)] + [str(f) for f in files])
        assert result.returncode == 0, f"storescu {flag}: {result.stderr}"


def indexed(d: Daemon) -> dict[str, tuple[Instance, Series, Study, Patient]]:
    with d.db.read() as session:
        rows = session.execute(
            select(Instance, Series, Study, Patient)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Instance.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
        ).all()
    return {row[0].sop_instance_uid: (row[0], row[1], row[2], row[3]) for row in rows}


def jobs(d: Daemon) -> list[Job]:
    with d.db.read() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def studies(d: Daemon) -> dict[str, Study]:
    with d.db.read() as session:
        return {s.study_instance_uid: s for s in session.scalars(select(Study))}


def assert_ingested(
    d: Daemon, samples: tuple[Sample, ...], calling_ae: str, arrives_as: Callable[[str], str]
) -> None:
    """Rows, archived syntax and decoded pixels of every sample, against its original file."""
    rows = indexed(d)
    assert sorted(rows) == sorted(s.sop_instance_uid for s in samples)
    for s in samples:
        instance, series, study, patient = rows[s.sop_instance_uid]
        name = s.original.name
        assert instance.sop_class_uid == s.sop_class_uid, name
        syntax = arrives_as(s.transfer_syntax_uid)
        assert instance.transfer_syntax_uid == syntax, name
        assert instance.number_of_frames == s.frames, name
        assert instance.analysable is True, name
        assert instance.duplicates == 0, name
        assert instance.calling_ae == calling_ae, name
        assert series.series_instance_uid == s.series_instance_uid, name
        assert study.study_instance_uid == s.study_instance_uid, name
        assert (patient.patient_id, patient.issuer) == (s.patient_id, ""), name

        archived = pydicom.dcmread(d.archive.absolute(instance.path))
        assert archived.file_meta.TransferSyntaxUID == syntax, name
        assert archived.SOPInstanceUID == s.sop_instance_uid, name
        assert instance.size_bytes == d.archive.absolute(instance.path).stat().st_size, name
        expected = original_pixels(s.original)
        got = archived.pixel_array
        # Same values and type; byte order may differ (a big endian file decodes to ">u2").
        assert got.dtype.newbyteorder("=") == expected.dtype.newbyteorder("="), name
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), f"{name}: archived pixels differ from the original"
    assert not any(d.archive.incoming.iterdir()), "partial receives left in .incoming"


def all_stable(d: Daemon, expected_jobs: int) -> Callable[[], bool]:
    def check() -> bool:
        states = {s.state for s in studies(d).values()}
        return states == {StudyState.STABLE} and len(jobs(d)) == expected_jobs

    return check


@pytest.fixture
def stable_daemon(start_daemon: Callable[..., Daemon], db_url: str) -> Iterator[Daemon]:
    yield start_daemon(
        database={"url": db_url}, study={"stable_seconds": 1.0, "sweep_interval_seconds": 0.1}
    )


def test_corpus_covers_every_syntax_and_frame_layout(corpus: tuple[Sample, ...]) -> None:
    """The corpus really is the mix the receiver must handle (guards against a shrunken corpus)."""
    syntaxes = {s.transfer_syntax_uid for s in corpus}
    assert syntaxes == set(STORESCU_FLAG), syntaxes
    assert len(corpus) == len(ultrasound_files()) >= 20
    assert max(s.frames for s in corpus) == 120 and min(s.frames for s in corpus) == 1
    assert len({s.sop_instance_uid for s in corpus}) == len(corpus)


def test_dcmsend_corpus_then_stability_jobs(
    stable_daemon: Daemon, corpus: tuple[Sample, ...], tmp_path: Path
) -> None:
    d = stable_daemon
    port = d.server.port
    dcmsend(port, (s.copy for s in corpus), "-dn")
    assert d.receiver.counters.stored == len(corpus)
    assert_ingested(d, corpus, "DCMSEND", as_dcmsend_sends)

    # Stability: exactly one analyze job per (analysable) instance, every study stable.
    wait_for(all_stable(d, len(corpus)), timeout=15, msg="every study stable with its jobs")
    first_jobs = jobs(d)
    rows = indexed(d)
    assert sorted(j.instance_pk for j in first_jobs) == sorted(r[0].id for r in rows.values())
    assert {(j.kind, j.state) for j in first_jobs} == {(ANALYZE, JobState.QUEUED)}
    stable_at = {uid: s.stable_at for uid, s in studies(d).items()}
    assert len(stable_at) == len({s.study_instance_uid for s in corpus})

    # Sweeping again, or receiving the same instances again (this time some of them decompressed
    # by dcmsend: same SOP instance, other syntax), queues nothing.
    assert d.sweep_once() == (0, 0)
    dcmsend(port, (s.copy for s in corpus))
    assert d.receiver.counters.duplicates == len(corpus)
    assert {r[0].duplicates for r in indexed(d).values()} == {1}
    assert {s.state for s in studies(d).values()} == {StudyState.STABLE}
    assert d.sweep_once() == (0, 0)
    assert [j.id for j in jobs(d)] == [j.id for j in first_jobs]

    # A late instance re-opens its study; only it gets a job at the next stability.
    late = unique_copy(next(s.original for s in corpus if s.frames == 2), tmp_path / "late")
    dcmsend(port, [late.copy])
    late_row = indexed(d)[late.sop_instance_uid][0]
    wait_for(all_stable(d, len(corpus) + 1), timeout=15, msg="late instance's study stable again")
    new_jobs = jobs(d)[len(first_jobs) :]
    assert [(j.instance_pk, j.kind) for j in new_jobs] == [(late_row.id, ANALYZE)]
    after = {uid: s.stable_at for uid, s in studies(d).items()}
    reopened = {uid for uid in after if after[uid] != stable_at[uid]}
    assert reopened == {late.study_instance_uid}
    late_stable_at = after[late.study_instance_uid]
    assert isinstance(late_stable_at, datetime) and late_stable_at > late_row.received_at


def test_storescu_corpus_as_is(
    start_daemon: Callable[..., Daemon], db_url: str, corpus: tuple[Sample, ...]
) -> None:
    d = start_daemon(database={"url": db_url})
    storescu_as_is(d.server.port, corpus)
    assert d.receiver.counters.stored == len(corpus)
    assert d.receiver.counters.failures == 0
    assert_ingested(d, corpus, "STORESCU", as_is)


def test_dcmsend_lossless_files_keep_their_syntax(
    start_daemon: Callable[..., Daemon], corpus: tuple[Sample, ...]
) -> None:
    lossless = tuple(s for s in corpus if s.transfer_syntax_uid in (JPEGLosslessSV1, RLELossless))
    assert len(lossless) == 3
    d = start_daemon()
    # dcmsend proposes each file's own syntax first, then uncompressed ones it could convert to.
    dcmsend(d.server.port, (s.copy for s in lossless))
    assert_ingested(d, lossless, "DCMSEND", as_is)
