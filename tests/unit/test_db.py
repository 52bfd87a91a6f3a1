"""Index and stability on both backends: idempotent rows, jobs once, re-opened studies."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.index import InstanceHeader, record_instance
from daemon.db.models import (
    Finding,
    Instance,
    Job,
    JobState,
    ModelVersion,
    Patient,
    Series,
    Study,
    StudyState,
)
from daemon.db.studies import REPORT, counts, queue_reports_if_settled, sweep, sweep_reports
from daemon.errors import ConformanceError

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def header(sop: str, study: str = "1.2.3", series: str = "1.2.3.1", **kw: object) -> InstanceHeader:
    ds = Dataset()
    ds.SOPClassUID = kw.pop("sop_class", US_IMAGE)
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "PAT-1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "US"
    ds.Manufacturer = kw.pop("manufacturer", "GE Healthcare")
    ds.NumberOfFrames = kw.pop("frames", 1)
    return InstanceHeader.from_dataset(ds, "1.2.840.10008.1.2.1")


def store(db: Database, h: InstanceHeader, at: datetime, ae: str = "US1") -> bool:
    with db.write() as session:
        return record_instance(
            session, h, path=f"{h.sop_instance_uid}.dcm", size_bytes=10, calling_ae=ae, now=at
        )


def n(db: Database, model: type) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def stable(db: Database, at: datetime, wait: float = 60) -> tuple[int, int]:
    return sweep(db, at, lambda _ae: wait, wait)


def test_rows_and_idempotent_resend(db: Database) -> None:
    assert store(db, header("1.2.3.1.1"), T0) is True
    assert store(db, header("1.2.3.1.2", frames=30), T0) is True
    assert store(db, header("1.2.3.1.1"), T0) is False  # re-sent: no second row
    assert (n(db, Patient), n(db, Study), n(db, Series), n(db, Instance)) == (1, 1, 1, 2)
    with db.read() as session:
        first = session.scalar(select(Instance).where(Instance.sop_instance_uid == "1.2.3.1.1"))
        multi = session.scalar(select(Instance).where(Instance.sop_instance_uid == "1.2.3.1.2"))
        assert first is not None and first.duplicates == 1
        assert multi is not None and multi.number_of_frames == 30


def test_stability_queues_jobs_once(db: Database) -> None:
    store(db, header("1.2.3.1.1"), T0)
    store(db, header("1.2.3.1.2"), T0)
    store(db, header("1.2.3.1.3", sop_class=COMPREHENSIVE_SR), T0)  # stored, never analysed
    store(db, header("1.2.3.1.4", manufacturer="usfmd"), T0)  # our own output: loop guard
    assert stable(db, T0 + timedelta(seconds=59)) == (0, 0)  # not idle long enough
    assert stable(db, T0 + timedelta(seconds=61)) == (1, 2)
    assert stable(db, T0 + timedelta(seconds=120)) == (0, 0)  # nothing more to do
    with db.read() as session:
        jobs = list(session.scalars(select(Job)))
        assert {j.state for j in jobs} == {JobState.QUEUED} and len(jobs) == 2
        study = session.scalar(select(Study))
        assert study is not None and study.state == StudyState.STABLE


def test_late_instance_reopens_study_and_adds_only_its_job(db: Database) -> None:
    store(db, header("1.2.3.1.1"), T0)
    assert stable(db, T0 + timedelta(seconds=61)) == (1, 1)
    late = T0 + timedelta(seconds=300)
    store(db, header("1.2.3.1.9"), late)
    with db.read() as session:
        assert session.scalar(select(Study.state)) == StudyState.RECEIVING
    assert stable(db, late + timedelta(seconds=30)) == (0, 0)
    assert stable(db, late + timedelta(seconds=61)) == (1, 1)
    assert n(db, Job) == 2


def test_per_ae_stability(db: Database) -> None:
    store(db, header("1.2.3.1.1"), T0, ae="FAST")
    store(db, header("2.1", study="2", series="2.1"), T0, ae="SLOW")
    waits = {"FAST": 5.0, "SLOW": 100.0}
    result = sweep(db, T0 + timedelta(seconds=10), lambda ae: waits[ae or ""], 5.0)
    assert result == (1, 1)


def test_counts(db: Database) -> None:
    store(db, header("1.2.3.1.1"), T0)
    store(db, header("1.2.3.1.1"), T0)
    store(db, header("1.2.3.1.3", sop_class=COMPREHENSIVE_SR), T0)
    stable(db, T0 + timedelta(seconds=61))
    report = counts(db.sessions())
    assert report["studies"] == {"stable": 1}
    assert report["instances"] == {
        "total": 2,
        "analysable": 1,
        "stored_only": 1,
        "duplicate_sends": 1,
    }
    assert report["jobs"] == {"queued": 1}


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_header_requires_type1_uids(missing: str) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = US_IMAGE, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2", "1.2.3"
    delattr(ds, missing)
    with pytest.raises(ConformanceError, match=missing):
        InstanceHeader.from_dataset(ds, "1.2.840.10008.1.2")


def test_header_refuses_invalid_uid() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = US_IMAGE, "1.2.abc"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2", "1.2.3"
    with pytest.raises(ConformanceError, match="not a valid UID"):
        InstanceHeader.from_dataset(ds, "1.2.840.10008.1.2")


def _active_version(session: Session, device_uid: str) -> ModelVersion:
    version = ModelVersion(
        task="heart_view", version="1", algorithm_name="a", encoder="e",
        preprocessing="usf-mae", classes=[], path="m.pt", sha256="0" * 64,
        device_uid=device_uid, synthetic=False, active=True, created_at=T0,
    )  # fmt: skip
    session.add(version)
    session.flush()
    return version


def _finding(session: object, instance: Instance, version_pk: int) -> None:
    session.add(  # type: ignore[attr-defined]
        Finding(
            instance_pk=instance.id,
            study_pk=instance.study_pk,
            model_version_pk=version_pk,
            task="heart_view",
            class_name="aorta",
            probability=0.9,
            probabilities=[0.9, 0.025, 0.025, 0.025, 0.025],
            frames=1,
            best_frame=0,
            created_at=T0,
        )
    )


def test_the_sweep_queues_what_finishers_missed_across_studies(db: Database) -> None:
    """Three studies with findings: two settled without a report queued (the finishers raced),
    one still analysing. One sweep queues the two, per study and version; the next queues none;
    a late finding re-opens a study's report under a new key."""
    for study in ("1.2.7", "1.2.8", "1.2.9"):
        store(db, header(f"{study}.1.1", study=study, series=f"{study}.1"), T0)
    store(db, header("1.2.7.1.2", study="1.2.7", series="1.2.7.1"), T0)
    assert stable(db, T0 + timedelta(seconds=61)) == (3, 4)
    with db.write() as session:
        version = _active_version(session, "2.25.98")
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        instances = session.scalars(select(Instance).order_by(Instance.id)).all()
        for instance in instances[:3]:
            _finding(session, instance, version.id)
        for job in jobs:  # the third study is still being analysed
            running = job.instance_pk == instances[2].id
            job.state = JobState.RUNNING if running else JobState.DONE
        settled = {instances[0].study_pk, instances[1].study_pk}
    later = T0 + timedelta(minutes=2)
    with db.write() as session:
        assert sweep_reports(session, later, timedelta(hours=1)) == 2
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        with db.write() as session:  # nothing new: two reads, however many studies there are
            assert sweep_reports(session, later, timedelta(hours=1)) == 0
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 2
    assert not [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    with db.read() as session:
        reports = session.scalars(select(Job).where(Job.kind == REPORT)).all()
        assert {r.params["study_pk"] for r in reports} == settled
    with db.write() as session:  # a late instance's finding: the study's SR must be redone
        _finding(session, session.get(Instance, instances[3].id), version.id)  # type: ignore[arg-type]
    with db.write() as session:
        assert sweep_reports(session, later, timedelta(hours=1)) == 1
        assert sweep_reports(session, later + timedelta(hours=2), timedelta(hours=1)) == 0


def test_reports_are_queued_once_when_the_studys_analyses_settle(db: Database) -> None:
    store(db, header("1.2.3.1.1"), T0)
    store(db, header("1.2.3.1.2"), T0)
    assert stable(db, T0 + timedelta(seconds=61)) == (1, 2)
    with db.write() as session:
        version = _active_version(session, "2.25.99")
        first, second = session.scalars(select(Job).order_by(Job.id)).all()
        instances = session.scalars(select(Instance).order_by(Instance.id)).all()
        _finding(session, instances[0], version.id)
        first.state = JobState.DONE
        study_pk, version_pk = instances[0].study_pk, version.id
    later = T0 + timedelta(minutes=2)
    with db.write() as session:  # the second analysis is still open: no report yet
        assert queue_reports_if_settled(session, study_pk, later) == 0
        assert sweep_reports(session, later, timedelta(hours=1)) == 0
    with db.write() as session:
        job = session.get(Job, second.id)
        assert job is not None
        job.state = JobState.AWAITING_MODEL  # settled: waits for another task's model
        _finding(session, session.get(Instance, instances[1].id), version_pk)  # type: ignore[arg-type]
    with db.write() as session:  # the finisher and the sweep race: one report job
        assert queue_reports_if_settled(session, study_pk, later) == 1
        assert sweep_reports(session, later, timedelta(hours=1)) == 0
    with db.read() as session:
        reports = session.scalars(select(Job).where(Job.kind == REPORT)).all()
        assert len(reports) == 1
        assert reports[0].params == {"study_pk": study_pk, "model_version_pk": version_pk}
