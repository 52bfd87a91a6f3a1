"""The job queue: claim with a lease, heartbeat, complete with the effect, retry, dead-letter.

Claims are one atomic ``UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING``; on PostgreSQL the
inner SELECT takes ``FOR UPDATE SKIP LOCKED`` so workers on many hosts never wait for or steal
each other's rows, and on SQLite the statement is a single write transaction (one writer at a
time), which is safe without SKIP LOCKED. Completion is conditional on the worker still holding
the lease and runs in the same transaction as the job's effect: a worker that lost its lease
(because it stalled past expiry and another worker took the job) rolls its effect back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from daemon.db.engine import Database
from daemon.db.models import Job, JobResult, JobState
from daemon.db.sql import insert_ignore, lease_rows, update_where

log = logging.getLogger(__name__)

#: States a job may be claimed from (FAILED waits for its back-off in ``not_before``).
CLAIMABLE = (JobState.QUEUED, JobState.FAILED)
#: States an operator may retry / cancel.
RETRYABLE = (JobState.DEAD, JobState.FAILED, JobState.CANCELLED, JobState.AWAITING_MODEL)
CANCELLABLE = (JobState.QUEUED, JobState.FAILED, JobState.AWAITING_MODEL, JobState.RUNNING)


class LeaseLost(Exception):
    """The worker no longer owns the job: another worker took it after the lease expired."""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    kind: str
    instance_pk: int | None
    study_pk: int | None
    params: dict[str, Any]
    attempts: int


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential back-off before retry ``attempts`` + 1: base, 2·base, 4·base, … ≤ cap."""
    return float(min(cap, base * 2 ** max(attempts - 1, 0)))


def dead_letter_expired(session: Session, now: datetime, max_attempts: int) -> int:
    """Jobs whose lease expired after their last allowed attempt go to DEAD, not back in line."""
    result = session.execute(
        update(Job)
        .where(
            Job.state == JobState.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts >= max_attempts,
        )
        .values(
            state=JobState.DEAD,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            finished_at=now,
            last_error="worker lost (lease expired) on the last allowed attempt",
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def claim(
    db: Database,
    worker: str,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
    kinds: Sequence[str] | None = None,
    limit: int = 1,
    defer_seconds: float = 0.0,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due jobs (oldest first), including ones whose lease expired.

    An idle worker polls often; a read-only look (index ``ix_jobs_state_not_before``) first
    keeps those polls from taking the write lock — on SQLite the receiver's too — and from
    running the claim's two updates when nothing is due.

    ``defer_seconds``: take only jobs that have been due at least this long. A busy worker
    process passes more (:meth:`daemon.worker.loop.Worker.run`), so a new job goes to the least
    busy process polling the queue rather than to whichever polls first.
    """
    ready = now - timedelta(seconds=defer_seconds)
    due = or_(
        and_(Job.state.in_(CLAIMABLE), Job.not_before <= ready),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < ready),
    )
    if kinds:
        due = and_(due, Job.kind.in_(list(kinds)))
    with db.read() as session:
        if session.execute(select(Job.id).where(due).limit(1)).first() is None:
            return []
    with db.write() as session:
        dead_letter_expired(session, now, max_attempts)
        claim = lease_rows(
            Job,
            select(Job.id).where(due).order_by(Job.id).limit(limit),
            state=JobState.RUNNING,
            owner=worker,
            lease_seconds=lease_seconds,
            now=now,
        )
        rows = session.execute(
            claim.returning(
                Job.id, Job.kind, Job.instance_pk, Job.study_pk, Job.params, Job.attempts
            )
        ).all()
    return [
        ClaimedJob(r.id, r.kind, r.instance_pk, r.study_pk, dict(r.params or {}), r.attempts)
        for r in sorted(rows, key=lambda r: r.id)
    ]


def _owned(job_id: int, worker: str) -> Any:
    return and_(Job.id == job_id, Job.lease_owner == worker, Job.state == JobState.RUNNING)


def heartbeat(db: Database, job_id: int, worker: str, now: datetime, lease_seconds: float) -> bool:
    """Extend the lease; False means it was lost and the work should stop."""
    with db.write() as session:
        result = session.execute(
            update(Job)
            .where(_owned(job_id, worker))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def complete(
    db: Database,
    job: ClaimedJob,
    worker: str,
    now: datetime,
    payload: dict[str, Any],
    state: JobState = JobState.DONE,
    effect: Callable[[Session], None] | None = None,
) -> None:
    """Record the job's effect and its completion atomically, or raise :class:`LeaseLost`."""
    with db.write() as session:
        finished = session.execute(
            update(Job)
            .where(_owned(job.id, worker))
            .values(
                state=state,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
                finished_at=now,
                last_error=None,
            )
        )
        if not finished.rowcount:  # type: ignore[attr-defined]
            raise LeaseLost(f"job {job.id} is no longer leased to {worker}")
        if effect is not None:
            effect(session)
        session.add(
            JobResult(job_pk=job.id, kind=job.kind, worker=worker, payload=payload, created_at=now)
        )


def fail(
    db: Database,
    job: ClaimedJob,
    worker: str,
    now: datetime,
    error: str,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
) -> JobState:
    """Record a failed attempt: retry after back-off, or dead-letter after ``max_attempts``."""
    dead = job.attempts >= max_attempts
    state = JobState.DEAD if dead else JobState.FAILED
    delay = backoff_seconds(job.attempts, backoff_base, backoff_max)
    with db.write() as session:
        session.execute(
            update(Job)
            .where(_owned(job.id, worker))
            .values(
                state=state,
                lease_owner=None,
                lease_expires_at=None,
                not_before=now if dead else now + timedelta(seconds=delay),
                updated_at=now,
                finished_at=now if dead else None,
                last_error=error[:4000],
            )
        )
    return state


def release(db: Database, job: ClaimedJob, worker: str, now: datetime) -> None:
    """Give an unfinished job back at shutdown: claimable at once, the try not counted."""
    with db.write() as session:
        session.execute(
            update(Job)
            .where(_owned(job.id, worker))
            .values(
                state=JobState.QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                attempts=Job.attempts - 1,
                not_before=now,
                updated_at=now,
            )
        )


def retry(db: Database, job_ids: Sequence[int], now: datetime) -> int:
    """Operator retry: put dead/failed/cancelled/awaiting jobs back in line with fresh attempts."""
    return update_where(
        db,
        Job,
        and_(Job.id.in_(list(job_ids)), Job.state.in_(RETRYABLE)),
        state=JobState.QUEUED,
        attempts=0,
        not_before=now,
        updated_at=now,
        finished_at=None,
        last_error=None,
    )


def cancel(db: Database, job_ids: Sequence[int], now: datetime) -> int:
    """Operator cancel; a running job's worker then fails to complete and drops its effect."""
    return update_where(
        db,
        Job,
        and_(Job.id.in_(list(job_ids)), Job.state.in_(CANCELLABLE)),
        state=JobState.CANCELLED,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=now,
        finished_at=now,
    )


def enqueue(
    session: Session,
    kind: str,
    now: datetime,
    params: dict[str, Any] | None = None,
    instance_pk: int | None = None,
    study_pk: int | None = None,
) -> Job:
    job = Job(
        kind=kind,
        instance_pk=instance_pk,
        study_pk=study_pk,
        params=params,
        state=JobState.QUEUED,
        attempts=0,
        created_at=now,
        updated_at=now,
        not_before=now,
    )
    session.add(job)
    return job


def enqueue_once(
    session: Session,
    kind: str,
    dedup_key: str,
    now: datetime,
    params: dict[str, Any] | None = None,
    study_pk: int | None = None,
) -> bool:
    """Queue a job that must exist once under ``dedup_key``; False if it already did.

    Race-safe across workers and hosts (INSERT ... ON CONFLICT DO NOTHING on the unique key),
    so two workers finishing the last jobs of a study at once still queue one report.
    """
    values = {
        "kind": kind,
        "dedup_key": dedup_key,
        "study_pk": study_pk,
        "params": params,
        "state": JobState.QUEUED.value,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "not_before": now,
    }
    return insert_ignore(session.connection(), Job, values)


def list_jobs(
    session: Session, states: Sequence[JobState] | None = None, limit: int = 100
) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if states:
        query = query.where(Job.state.in_(list(states)))
    return list(session.scalars(query))
