"""Worker processes against a real queue (SQLite and PostgreSQL): exactly-once under races,
recovery after kill -9, SIGTERM drains or releases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon.db import migrate, queue
from daemon.db.engine import Database
from daemon.db.models import Job, JobResult, JobState

from helpers import wait_for

USFMD = [sys.executable, "-m", "daemon.cli"]


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
    assert len({worker for _, worker in done}) > 1, "the work was shared between processes"


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
