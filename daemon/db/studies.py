"""Study completeness and the jobs it creates, plus the counts ``usfmd status`` prints.

A study is complete ("stable") once no instance has arrived for ``stable_seconds`` (per calling AE
if configured). Becoming stable queues one ``analyze`` job per analysable instance that has none;
an instance arriving later re-opens the study and, at the next stability, only it gets a job.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.orm import Session

from daemon.db.engine import Database
from daemon.db.models import Instance, Job, JobState, Study, StudyState

ANALYZE = "analyze"


def stable_candidates(session: Session, now: datetime, shortest_wait: float) -> list[Study]:
    cutoff = now - timedelta(seconds=shortest_wait)
    query = select(Study).where(
        Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
    )
    return list(session.scalars(query))


def mark_stable(session: Session, study: Study, now: datetime) -> int:
    """Flip one study to stable and queue its missing jobs; return the number of jobs queued.

    The UPDATE is conditional on the ``last_received_at`` we saw: if an instance arrived in the
    meantime the study stays open (no lost instance, no premature job), on any backend.
    """
    flipped = session.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.state == StudyState.RECEIVING,
            Study.last_received_at == study.last_received_at,
        )
        .values(state=StudyState.STABLE, stable_at=now)
    ).rowcount  # type: ignore[attr-defined]
    if not flipped:
        return 0
    missing = (
        select(
            Instance.id,
            Instance.study_pk,
        )
        .outerjoin(Job, and_(Job.instance_pk == Instance.id, Job.kind == ANALYZE))
        .where(Instance.study_pk == study.id, Instance.analysable.is_(True), Job.id.is_(None))
    )
    rows = session.execute(missing).all()
    if rows:
        session.execute(
            insert(Job),
            [
                {
                    "kind": ANALYZE,
                    "instance_pk": instance_pk,
                    "study_pk": study_pk,
                    "state": JobState.QUEUED,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                    "not_before": now,
                }
                for instance_pk, study_pk in rows
            ],
        )
    return len(rows)


def sweep(
    db: Database,
    now: datetime,
    stable_seconds_for: Callable[[str | None], float],
    shortest_wait: float,
) -> tuple[int, int]:
    """Find studies idle long enough and mark them stable; return (studies, jobs)."""
    studies = jobs = 0
    with db.write() as session:
        for study in stable_candidates(session, now, shortest_wait):
            wait = stable_seconds_for(study.calling_ae)
            if study.last_received_at > now - timedelta(seconds=wait):
                continue
            queued = mark_stable(session, study, now)
            studies += 1
            jobs += queued
    return studies, jobs


def counts(session: Session) -> dict[str, dict[str, int]]:
    """Studies and jobs by state, instances by analysability: what an operator asks first."""

    def by(column: Any, model: type) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).select_from(model).group_by(column))
        return {str(getattr(key, "value", key)): int(n) for key, n in rows}

    instances = session.execute(
        select(
            Instance.analysable, func.count(), func.coalesce(func.sum(Instance.duplicates), 0)
        ).group_by(Instance.analysable)
    ).all()
    inst = {"total": 0, "analysable": 0, "stored_only": 0, "duplicate_sends": 0}
    for analysable, n, dups in instances:
        inst["total"] += int(n)
        inst["analysable" if analysable else "stored_only"] += int(n)
        inst["duplicate_sends"] += int(dups)
    return {
        "studies": by(Study.state, Study),
        "instances": inst,
        "jobs": by(Job.state, Job),
    }
