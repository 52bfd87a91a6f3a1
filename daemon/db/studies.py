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
from daemon.db.models import Finding, Instance, Job, JobState, Study, StudyState
from daemon.db.queue import enqueue_once

ANALYZE = "analyze"
#: One SR per study and model version (daemon/worker/report.py).
REPORT = "report"
#: Job states after which an analysis will not change any more without an operator or a model.
_SETTLED = (JobState.DONE, JobState.AWAITING_MODEL, JobState.DEAD, JobState.CANCELLED)


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


def queue_reports_if_settled(
    session: Session, study_pk: int, now: datetime, finishing: int | None = None
) -> int:
    """Queue one ``report`` job per model version with findings in the study, once no other
    analysis of the study is still open; returns how many were newly queued.

    The dedup key names the findings it covers, so a study re-opened by a late instance gets
    a new SR covering it, and racing finishers queue each report once.
    """
    open_jobs = select(func.count()).where(
        Job.study_pk == study_pk,
        Job.kind == ANALYZE,
        Job.state.not_in(_SETTLED),
    )
    if finishing is not None:
        open_jobs = open_jobs.where(Job.id != finishing)
    if session.scalar(open_jobs):
        return 0
    versions = session.execute(
        select(Finding.model_version_pk, func.count(), func.max(Finding.id))
        .where(Finding.study_pk == study_pk)
        .group_by(Finding.model_version_pk)
    ).all()
    covered = [(study_pk, int(v), int(n), int(last)) for v, n, last in versions]
    return _queue_reports(session, now, covered)


def _report_key(study_pk: int, version_pk: int, count: int, last: int) -> str:
    return f"report:{study_pk}:{version_pk}:{count}:{last}"


def _queue_reports(
    session: Session, now: datetime, covered: list[tuple[int, int, int, int]]
) -> int:
    """Queue the reports named by ``(study, version, findings, last finding id)`` once each."""
    queued = 0
    for study_pk, version_pk, count, last in covered:
        params = {"study_pk": study_pk, "model_version_pk": version_pk}
        key = _report_key(study_pk, version_pk, count, last)
        if enqueue_once(session, REPORT, key, now, params=params, study_pk=study_pk):
            queued += 1
    return queued


def sweep_reports(session: Session, now: datetime, window: timedelta) -> int:
    """Queue reports of studies whose last analysis settled without queueing them.

    Two workers finishing a study's last two analyses at once may each see the other still
    running; this pass (run with the stability sweep) catches that. Only studies with findings
    from the last ``window`` are looked at, and with three queries however many there are (a
    busy site has hundreds an hour, swept every few seconds): settled studies, their findings
    per version, then which of those reports exist.
    """
    still_open = (
        select(Job.id)
        .where(Job.study_pk == Finding.study_pk, Job.kind == ANALYZE, Job.state.not_in(_SETTLED))
        .exists()
    )
    settled = (
        select(Finding.study_pk)
        .where(Finding.created_at >= now - window, ~still_open)
        .distinct()
        .scalar_subquery()
    )
    rows = session.execute(
        select(Finding.study_pk, Finding.model_version_pk, func.count(), func.max(Finding.id))
        .where(Finding.study_pk.in_(settled))
        .group_by(Finding.study_pk, Finding.model_version_pk)
    ).all()
    if not rows:
        return 0
    covered = [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]
    wanted = {_report_key(*row): row for row in covered}
    known = set(session.scalars(select(Job.dedup_key).where(Job.dedup_key.in_(list(wanted)))))
    return _queue_reports(session, now, [row for key, row in wanted.items() if key not in known])
