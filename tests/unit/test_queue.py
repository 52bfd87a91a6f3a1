"""Queue semantics on both backends: leases, exactly-once completion, back-off, dead letters."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from daemon.db import migrate, queue
from daemon.db.engine import Database
from daemon.db.models import Job, JobResult, JobState
from daemon.db.queue import LeaseLost, backoff_seconds

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LEASE = 30.0


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def add(db: Database, count: int = 1, at: datetime = T0) -> list[int]:
    with db.write() as session:
        jobs = [queue.enqueue(session, "probe", at, params={"n": i}) for i in range(count)]
        session.flush()
        return [j.id for j in jobs]


def job(db: Database, job_id: int) -> Job:
    with db.read() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def results(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(JobResult)) or 0)


def test_claim_marks_running_and_is_exclusive(db: Database) -> None:
    add(db, 3)
    first = queue.claim(db, "w1", T0, LEASE, 5, limit=2)
    second = queue.claim(db, "w2", T0, LEASE, 5, limit=2)
    assert [j.params["n"] for j in first] == [0, 1]
    assert [j.params["n"] for j in second] == [2]
    assert queue.claim(db, "w3", T0, LEASE, 5) == []
    row = job(db, first[0].id)
    assert (row.state, row.lease_owner, row.attempts) == (JobState.RUNNING, "w1", 1)


def test_claim_passes_over_a_job_another_claimer_has_locked(db: Database) -> None:
    """PostgreSQL, many hosts: a claim skips rows another transaction holds (SKIP LOCKED)
    instead of waiting for it, and never takes them."""
    if db.is_sqlite:
        pytest.skip("SQLite has one writer at a time and no row locks")
    first, second = add(db, 2)
    claimed: list[list[queue.ClaimedJob]] = []
    poll = threading.Thread(target=lambda: claimed.append(queue.claim(db, "w", T0, LEASE, 5)))
    holder = db.engine.connect()
    try:
        holder.exec_driver_sql("BEGIN")
        holder.execute(select(Job.id).where(Job.id == first).with_for_update())
        poll.start()
        poll.join(5)
        assert not poll.is_alive(), "the claim waited for the locked job"
        assert [[j.id for j in c] for c in claimed] == [[second]]
    finally:
        holder.rollback()
        holder.close()
        if poll.ident is not None:
            poll.join(10)


def test_not_before_and_kind_filter(db: Database) -> None:
    (future,) = add(db, 1, at=T0 + timedelta(seconds=60))
    assert queue.claim(db, "w", T0, LEASE, 5) == []
    assert queue.claim(db, "w", T0 + timedelta(seconds=61), LEASE, 5, kinds=["analyze"]) == []
    assert [j.id for j in queue.claim(db, "w", T0 + timedelta(seconds=61), LEASE, 5)] == [future]


def test_complete_once_with_effect(db: Database) -> None:
    add(db)
    (claimed,) = queue.claim(db, "w1", T0, LEASE, 5)
    queue.complete(db, claimed, "w1", T0, {"ok": True})
    assert job(db, claimed.id).state == JobState.DONE and results(db) == 1
    with pytest.raises(LeaseLost):
        queue.complete(db, claimed, "w1", T0, {"ok": True})
    assert results(db) == 1


def test_expired_lease_is_reclaimed_and_stale_worker_loses(db: Database) -> None:
    add(db)
    (stale,) = queue.claim(db, "slow", T0, LEASE, 5)
    assert queue.claim(db, "fast", T0 + timedelta(seconds=LEASE - 1), LEASE, 5) == []
    (taken,) = queue.claim(db, "fast", T0 + timedelta(seconds=LEASE + 1), LEASE, 5)
    assert taken.id == stale.id and taken.attempts == 2
    assert not queue.heartbeat(db, stale.id, "slow", T0, LEASE)
    with pytest.raises(LeaseLost):
        queue.complete(db, stale, "slow", T0, {"by": "slow"})
    queue.complete(db, taken, "fast", T0, {"by": "fast"})
    assert results(db) == 1


def test_a_deferring_claim_takes_only_jobs_due_long_enough(db: Database) -> None:
    """A busy worker process defers (``defer_seconds``): a job due for less than that is left to
    an idler one; once due that long, or when its lease has expired that long, it is taken."""
    (young,) = add(db)
    soon = T0 + timedelta(seconds=0.4)
    assert queue.claim(db, "busy", soon, LEASE, 5, defer_seconds=0.5) == []
    assert [j.id for j in queue.claim(db, "busy", soon, LEASE, 5, defer_seconds=0.3)] == [young]
    expired = soon + timedelta(seconds=LEASE + 0.4)  # the lease ran out 0.4 s ago
    assert queue.claim(db, "busy", expired, LEASE, 5, defer_seconds=0.5) == []
    (taken,) = queue.claim(db, "idle", expired, LEASE, 5)
    assert taken.id == young and job(db, young).lease_owner == "idle"


def test_heartbeat_extends_lease(db: Database) -> None:
    add(db)
    (claimed,) = queue.claim(db, "w", T0, LEASE, 5)
    assert queue.heartbeat(db, claimed.id, "w", T0 + timedelta(seconds=25), LEASE)
    assert queue.claim(db, "x", T0 + timedelta(seconds=40), LEASE, 5) == []  # 25 + 30 > 40


def test_failure_backoff_then_dead_letter(db: Database) -> None:
    add(db)
    now = T0
    for attempt in (1, 2):
        (claimed,) = queue.claim(db, "w", now, LEASE, 3)
        assert claimed.attempts == attempt
        state = queue.fail(db, claimed, "w", now, f"boom {attempt}", 3, 10, 900)
        assert state == JobState.FAILED
        wait = backoff_seconds(attempt, 10, 900)
        assert queue.claim(db, "w", now + timedelta(seconds=wait - 1), LEASE, 3) == []
        now += timedelta(seconds=wait)
    (claimed,) = queue.claim(db, "w", now, LEASE, 3)
    assert queue.fail(db, claimed, "w", now, "boom 3", 3, 10, 900) == JobState.DEAD
    row = job(db, claimed.id)
    assert row.last_error == "boom 3" and row.finished_at is not None
    assert queue.claim(db, "w", now + timedelta(days=1), LEASE, 3) == []


def test_lease_expiry_on_last_attempt_dead_letters(db: Database) -> None:
    add(db)
    (claimed,) = queue.claim(db, "crashy", T0, LEASE, 1)
    assert queue.claim(db, "w", T0 + timedelta(seconds=LEASE + 1), LEASE, 1) == []
    assert job(db, claimed.id).state == JobState.DEAD


def test_backoff_values() -> None:
    assert [backoff_seconds(a, 10, 60) for a in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_operator_retry_and_cancel(db: Database) -> None:
    first, second = add(db, 2)
    (claimed,) = queue.claim(db, "w", T0, LEASE, 1, limit=1)
    queue.fail(db, claimed, "w", T0, "bad", 1, 10, 900)
    assert queue.retry(db, [first, second], T0) == 1  # only the dead one is retryable
    row = job(db, first)
    assert (row.state, row.attempts, row.last_error) == (JobState.QUEUED, 0, None)
    assert queue.cancel(db, [second], T0) == 1
    assert queue.claim(db, "w", T0, LEASE, 5, limit=5)[0].id == first


def test_cancel_running_discards_effect(db: Database) -> None:
    add(db)
    (claimed,) = queue.claim(db, "w", T0, LEASE, 5)
    queue.cancel(db, [claimed.id], T0)
    with pytest.raises(LeaseLost):
        queue.complete(db, claimed, "w", T0, {})
    assert results(db) == 0 and job(db, claimed.id).state == JobState.CANCELLED


def test_release_returns_job_without_counting(db: Database) -> None:
    add(db)
    (claimed,) = queue.claim(db, "w", T0, LEASE, 5)
    queue.release(db, claimed, "w", T0)
    row = job(db, claimed.id)
    assert (row.state, row.attempts, row.lease_owner) == (JobState.QUEUED, 0, None)


def test_enqueue_once_by_key(db: Database) -> None:
    """Two finishers of a study's last jobs may both try to queue its report: one job results."""
    with db.write() as session:
        assert queue.enqueue_once(session, "report", "report:1:2:abc", T0, params={"v": 2})
    with db.write() as session:
        assert not queue.enqueue_once(session, "report", "report:1:2:abc", T0)
        assert queue.enqueue_once(session, "report", "report:1:2:def", T0)
    with db.read() as session:
        keys = session.scalars(select(Job.dedup_key).order_by(Job.id)).all()
    assert keys == ["report:1:2:abc", "report:1:2:def"]


def test_a_poll_with_nothing_due_takes_no_write_lock(db: Database) -> None:
    """Idle workers poll often: with no job due, a claim only reads, so a writer holding the
    lock (on SQLite: the receiver indexing an instance) is neither blocked nor blocks it."""
    add(db, 1, at=T0 + timedelta(seconds=60))  # queued, not yet due
    holder = db.engine.connect()
    try:
        if db.is_sqlite:
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            holder.exec_driver_sql("BEGIN")
            holder.exec_driver_sql("LOCK TABLE jobs IN EXCLUSIVE MODE")  # reads still pass
        claimed: list[list[queue.ClaimedJob]] = []
        poll = threading.Thread(target=lambda: claimed.append(queue.claim(db, "w", T0, LEASE, 5)))
        poll.start()
        poll.join(5)
        assert not poll.is_alive(), "the idle poll waited for the write lock"
        assert claimed == [[]]
    finally:
        holder.rollback()
        holder.close()
    # Once due, the same call claims it.
    assert len(queue.claim(db, "w", T0 + timedelta(seconds=61), LEASE, 5)) == 1
