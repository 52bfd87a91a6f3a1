"""Job handlers by kind. A handler computes outside any transaction and returns an
:class:`Outcome`; the worker commits the outcome's effect together with the job's completion."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.orm import Session

from daemon.config import Settings
from daemon.db.engine import Database
from daemon.db.models import JobState
from daemon.db.queue import ClaimedJob
from daemon.db.studies import ANALYZE, REPORT
from daemon.receive.archive import Archive

PROBE = "probe"


@dataclass
class ProcessShared:
    """What the jobs running side by side in one worker process share, made on first use
    (under ``lock``): models and their batchers load torch, which only analysing processes need.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The process's :class:`daemon.models.cache.ModelCache`.
    model_cache: Any = None
    #: The process's :class:`daemon.worker.batching.BatcherPool`.
    batchers: Any = None


@dataclass
class WorkContext:
    """What a handler may use.

    A worker process makes one, and :meth:`for_job` a copy per job it runs: ``worker`` (the
    job's lease owner), ``lease_lost`` (set when the job's heartbeat finds it taken over) and
    ``job_exit`` (undone when the job ends) are the job's own; ``stopping`` and ``shared`` are
    the process's.
    """

    settings: Settings
    db: Database
    archive: Archive
    worker: str
    lease_lost: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    shared: ProcessShared = field(default_factory=ProcessShared)
    #: Callbacks run when the job ends, whatever its outcome (e.g. letting go of a batcher).
    job_exit: contextlib.ExitStack[bool | None] = field(default_factory=contextlib.ExitStack)

    def for_job(self, worker: str) -> WorkContext:
        """A context for one job leased to ``worker``, sharing this process's state."""
        return replace(
            self, worker=worker, lease_lost=threading.Event(), job_exit=contextlib.ExitStack()
        )

    @property
    def model_cache(self) -> Any:
        """This process's :class:`daemon.models.cache.ModelCache` (None until first use)."""
        return self.shared.model_cache

    @model_cache.setter
    def model_cache(self, cache: Any) -> None:
        self.shared.model_cache = cache


@dataclass(frozen=True)
class Outcome:
    payload: dict[str, Any]
    state: JobState = JobState.DONE
    effect: Callable[[Session], None] | None = None


class JobFailed(Exception):
    """A handler's expected failure: recorded as the job's last error, retried with back-off.

    ``permanent``: retrying cannot help (the input itself is bad); the job is dead-lettered at
    once, still visible and retryable by an operator with ``usfmd jobs retry``.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class JobReleased(JobFailed):
    """The handler gave its job back to the queue, uncounted (its worker is stopping): not a
    failure, nothing more to record."""


class ProbeFailure(JobFailed):
    pass


def run_probe(ctx: WorkContext, job: ClaimedJob) -> Outcome:
    """Diagnostic job (``usfmd jobs probe``): proves workers everywhere claim and finish work.

    Parameters in ``job.params``: ``seconds`` to work (in slices, so a lost lease is noticed) and
    ``fail_times``: fail that many first attempts, to exercise retry and dead-lettering.
    """
    fail_times = int(job.params.get("fail_times", 0))
    if job.attempts <= fail_times:
        raise ProbeFailure(f"probe asked to fail attempt {job.attempts} of {fail_times}")
    remaining = float(job.params.get("seconds", 0.0))
    while remaining > 0 and not ctx.lease_lost.is_set():
        step = min(0.05, remaining)
        ctx.lease_lost.wait(step)
        remaining -= step
    return Outcome(payload={"worker": ctx.worker, "attempt": job.attempts})


def run_analyze(ctx: WorkContext, job: ClaimedJob) -> Outcome:
    """``analyze`` jobs (one per analysable instance of a stable study): see
    :mod:`daemon.worker.analyze`, imported here on first use — it imports this module's types,
    and the image stages (OpenCV, codecs) are loaded only by processes that analyse."""
    from daemon.worker.analyze import run_analyze as analyze

    return analyze(ctx, job)


def run_report(ctx: WorkContext, job: ClaimedJob) -> Outcome:
    """``report`` jobs (one SR per study and model version): see :mod:`daemon.worker.report`."""
    from daemon.worker.report import run_report as report

    return report(ctx, job)


Handler = Callable[[WorkContext, ClaimedJob], Outcome]
HANDLERS: dict[str, Handler] = {PROBE: run_probe, ANALYZE: run_analyze, REPORT: run_report}
