"""Worker processes against a real queue (SQLite and PostgreSQL): exactly-once under races,
recovery after kill -9, SIGTERM drains or releases every job in flight, and several analyses
side by side in one process sharing forward passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from daemon.config import load_settings
from daemon.db import migrate, queue
from daemon.db.engine import Database
from daemon.db.models import Finding, Instance, Job, JobResult, JobState
from daemon.models import activate, import_model
from daemon.service import open_archive
from pipelines.models import build_task_model, get_encoder_card, save_model_file
from pipelines.phantom import make_phantom
from pipelines.phantom.dicom import phantom_dataset

from helpers import archive_stable, wait_for

USFMD = [sys.executable, "-m", "daemon.cli"]
TINY = dict(get_encoder_card("usf-mae-vit-b16").tiny_overrides)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def _env(tmp_path: Path, db: Database, **queue_settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USFMD_")}
    env.update(
        USFMD_STORAGE__DATA_DIR=str(tmp_path / "data"),
        USFMD_DATABASE__URL=db.url,
        USFMD_QUEUE__POLL_SECONDS="0.05",
    )
    for key, value in queue_settings.items():
        env[f"USFMD_QUEUE__{key.upper()}"] = str(value)
    return env


def _workers(env: dict[str, str], processes: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*USFMD, "worker", "--processes", str(processes)], env=env, stdout=out, stderr=out
        )


def _probes(db: Database, count: int, **params: float) -> list[int]:
    with db.write() as session:
        jobs = [
            queue.enqueue(session, "probe", datetime.now(UTC), params=params) for _ in range(count)
        ]
        session.flush()
        return [j.id for j in jobs]


def _states(db: Database) -> dict[str, int]:
    with db.read() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state.value: n for state, n in rows}


def _job(db: Database, job_id: int) -> Job:
    with db.read() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_four_processes_500_jobs_each_done_once(tmp_path: Path, db: Database) -> None:
    ids = _probes(db, 500)
    proc = _workers(_env(tmp_path, db), 4, tmp_path / "w.log")
    try:
        wait_for(lambda: _states(db) == {"done": 500}, 120, "500 probes done")
    finally:
        assert _stop(proc) == 0
    with db.read() as session:
        done = session.execute(select(JobResult.job_pk, JobResult.worker)).all()
    assert sorted(pk for pk, _ in done) == ids  # one effect per job, none missing
    processes = {worker.rsplit("/", 1)[0] for _, worker in done}  # host:pid:index/slot
    assert len(processes) > 1, "the work was shared between processes"


def test_kill_9_mid_job_completes_once_after_lease_expiry(tmp_path: Path, db: Database) -> None:
    env = _env(tmp_path, db, lease_seconds=2, heartbeat_seconds=0.5, backoff_base_seconds=0)
    (job_id,) = _probes(db, 1, seconds=2.0)
    first = _workers(env, 1, tmp_path / "w1.log")
    try:
        wait_for(lambda: _job(db, job_id).state == JobState.RUNNING, 30, "job claimed")
        owner = _job(db, job_id).lease_owner or ""
        os.kill(int(owner.split(":")[1]), signal.SIGKILL)  # the worker process, mid-job
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert _job(db, job_id).state == JobState.RUNNING  # nobody finished it
    second = _workers(env, 1, tmp_path / "w2.log")
    try:
        wait_for(lambda: _job(db, job_id).state == JobState.DONE, 30, "job finished by survivor")
    finally:
        assert _stop(second) == 0
    row = _job(db, job_id)
    assert row.attempts == 2 and row.lease_owner is None
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(JobResult)) == 1


def test_sigterm_lets_a_short_job_finish(tmp_path: Path, db: Database) -> None:
    (job_id,) = _probes(db, 1, seconds=1.5)
    proc = _workers(_env(tmp_path, db, drain_seconds=20), 1, tmp_path / "w.log")
    wait_for(lambda: _job(db, job_id).state == JobState.RUNNING, 30, "job claimed")
    assert _stop(proc) == 0
    assert _job(db, job_id).state == JobState.DONE


def test_sigterm_releases_a_long_job(tmp_path: Path, db: Database) -> None:
    (job_id,) = _probes(db, 1, seconds=120)
    proc = _workers(_env(tmp_path, db, drain_seconds=1), 1, tmp_path / "w.log")
    wait_for(lambda: _job(db, job_id).state == JobState.RUNNING, 30, "job claimed")
    assert _stop(proc) == 0
    row = _job(db, job_id)
    assert (row.state, row.attempts, row.lease_owner) == (JobState.QUEUED, 0, None)


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, db: Database) -> None:
    """kill -9 of ``usfmd worker`` (or serve) must not leave orphans claiming jobs; a long job
    they held is released for others."""
    env = _env(tmp_path, db, lease_seconds=30, heartbeat_seconds=0.5, drain_seconds=0.5)
    (job_id,) = _probes(db, 1, seconds=60.0)
    parent = _workers(env, 1, tmp_path / "w.log")
    try:
        wait_for(lambda: _job(db, job_id).state == JobState.RUNNING, 30, "job claimed")
        child = int((_job(db, job_id).lease_owner or "").split(":")[1])
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not _alive(child), 20, "the orphaned worker to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
    assert _job(db, job_id).state == JobState.QUEUED  # released, not left to the lease


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_every_job_in_flight(tmp_path: Path, db: Database) -> None:
    ids = _probes(db, 3, seconds=1.5)
    env = _env(tmp_path, db, drain_seconds=20, jobs_per_worker=3)
    proc = _workers(env, 1, tmp_path / "w.log")
    wait_for(
        lambda: all(_job(db, i).state == JobState.RUNNING for i in ids), 30, "three jobs claimed"
    )
    owners = {_job(db, i).lease_owner for i in ids}
    assert len(owners) == 3 and len({o.rsplit("/", 1)[0] for o in owners if o}) == 1
    assert _stop(proc) == 0
    assert [_job(db, i).state for i in ids] == [JobState.DONE] * 3


def test_sigterm_releases_every_long_job_in_flight(tmp_path: Path, db: Database) -> None:
    ids = _probes(db, 3, seconds=120)
    proc = _workers(_env(tmp_path, db, drain_seconds=1, jobs_per_worker=4), 1, tmp_path / "w.log")
    wait_for(
        lambda: all(_job(db, i).state == JobState.RUNNING for i in ids), 30, "three jobs claimed"
    )
    assert _stop(proc) == 0
    for i in ids:
        row = _job(db, i)
        assert (row.state, row.attempts, row.lease_owner) == (JobState.QUEUED, 0, None)


# --- analyses side by side ----------------------------------------------------------------------

N_STUDIES = 24


def _archive_one_frame_studies(db: Database, data_dir: Path, count: int) -> None:
    """``count`` one-frame phantom studies, stored and indexed as receive does, made stable."""
    archive = open_archive(
        load_settings(None, storage={"data_dir": str(data_dir), "min_free_space": 0})
    )
    now = datetime.now(UTC)
    for seed in range(count):
        archive_stable(db, archive, phantom_dataset([make_phantom(500 + seed, "heart")]), now)


def test_worker_slots_analyse_many_one_frame_studies_once(tmp_path: Path, db: Database) -> None:
    """One process with four job slots: every one-frame study is analysed exactly once (one
    finding, one heatmap, one SR each) and frames of different studies share forward passes."""
    data_dir = tmp_path / "data"
    torch.manual_seed(11)
    model = build_task_model("heart_view", "usf-mae-vit-b16", overrides=TINY)
    save_model_file(tmp_path / "heart.pt", model, synthetic=True)
    with db.write() as session:
        version = import_model(
            session, tmp_path / "heart.pt", version="1", synthetic=True, data_dir=data_dir
        )
        session.flush()
        activate(session, version.id, allow_synthetic=True)
    _archive_one_frame_studies(db, data_dir, N_STUDIES)
    env = _env(tmp_path, db, jobs_per_worker=4, heartbeat_seconds=1)
    env.update(
        USFMD_ANALYSIS__ROUTES='[{"task": "heart_view"}]',
        USFMD_ANALYSIS__MAX_BATCH="4",
        USFMD_ANALYSIS__MAX_WAIT_MS="300",
        USFMD_MODELS__DEVICE="cpu",
        USFMD_LOGGING__JSON="true",
    )
    log = tmp_path / "w.log"
    proc = _workers(env, 1, log)
    try:
        wait_for(lambda: _states(db) == {"done": 2 * N_STUDIES}, 240, "analyses and SRs done")
    finally:
        assert _stop(proc) == 0
    with db.read() as session:
        jobs = session.execute(select(Job.kind, Job.attempts)).all()
        results = list(session.scalars(select(JobResult.job_pk)))
        findings = session.scalar(select(func.count()).select_from(Finding))
        outputs = session.execute(
            select(Instance.sop_class_uid, func.count())
            .where(Instance.analysable.is_(False))
            .group_by(Instance.sop_class_uid)
        ).all()
    assert sorted(jobs) == sorted([("analyze", 1)] * N_STUDIES + [("report", 1)] * N_STUDIES)
    assert len(results) == len(set(results)) == 2 * N_STUDIES  # one effect per job
    assert findings == N_STUDIES
    assert sorted(n for _, n in outputs) == [N_STUDIES, N_STUDIES]  # heatmaps, SRs
    (closed,) = [
        entry
        for entry in map(json.loads, log.read_text().splitlines())
        if entry.get("message") == "batcher closed"
    ]
    assert closed["frames"] == N_STUDIES
    assert closed["largest"] > 1 and closed["batches"] < N_STUDIES, closed
