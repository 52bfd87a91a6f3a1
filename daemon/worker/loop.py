"""One worker process's jobs: claim, heartbeat, run, complete or fail — until told to stop.

A worker runs up to ``queue.jobs_per_worker`` jobs at once, one thread per job *slot*. Each
slot leases its jobs under its own name (``<worker>/<slot>``) and each job has its own
heartbeat and ``lease_lost`` flag, so a job taken over by another worker stops alone. Threads,
not more processes: the jobs of one process share its models and their batchers
(:mod:`daemon.worker.batching`), so frames of concurrent analyses go through the model together.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from daemon.db import queue
from daemon.db.queue import ClaimedJob, LeaseLost
from daemon.worker.handlers import HANDLERS, Handler, JobFailed, JobReleased, WorkContext

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class _Heartbeat(threading.Thread):
    """Extends one job's lease every ``heartbeat_seconds`` while its handler works."""

    def __init__(self, ctx: WorkContext, job: ClaimedJob) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.ctx, self.job = ctx, job
        self.done = threading.Event()

    def run(self) -> None:
        q = self.ctx.settings.queue
        while not self.done.wait(q.heartbeat_seconds):
            try:
                alive = queue.heartbeat(
                    self.ctx.db, self.job.id, self.ctx.worker, _now(), q.lease_seconds
                )
            except Exception:  # noqa: BLE001 - a DB hiccup: the lease has time left, try again
                log.exception("heartbeat failed; retrying", extra={"job": self.job.id})
                continue
            if not alive:
                log.warning("lease lost while working", extra={"job": self.job.id})
                self.ctx.lease_lost.set()
                return


@dataclass(frozen=True, slots=True)
class Running:
    """A job in one of the worker's slots, with its own context (lease owner, lease_lost)."""

    slot: int
    job: ClaimedJob
    ctx: WorkContext


class Worker:
    """Claims jobs into free slots and runs them, each in its own thread.

    Parameters
    ----------
    ctx
        The process's context; every job gets :meth:`WorkContext.for_job` of it.
    handlers
        Job kind → handler (default: :data:`daemon.worker.handlers.HANDLERS`).
    slots
        Jobs run at once; default ``queue.jobs_per_worker``.
    """

    def __init__(
        self,
        ctx: WorkContext,
        handlers: dict[str, Handler] | None = None,
        slots: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.handlers = handlers or HANDLERS
        self.slots = slots if slots is not None else ctx.settings.queue.jobs_per_worker
        if self.slots < 1:
            raise ValueError(f"slots={self.slots}: must be >= 1")
        self._changed = threading.Condition()
        self._running: dict[int, Running] = {}
        self._threads: dict[int, threading.Thread] = {}

    def slot_owner(self, slot: int) -> str:
        """The lease owner name of ``slot``'s jobs."""
        return f"{self.ctx.worker}/{slot}"

    def running(self) -> list[Running]:
        """The jobs in the slots now, in slot order."""
        with self._changed:
            return [self._running[slot] for slot in sorted(self._running)]

    def run_once(self) -> bool:
        """Claim a job for every free slot and run them, side by side, to their end; False when
        none was due."""
        started = self._claim_and_start()
        for thread in started:
            thread.join()
        return bool(started)

    def run(self, stop: threading.Event) -> None:
        """Keep the slots busy until ``stop`` is set, then wait for the jobs in them (the
        process's drain decides how long).

        One job is claimed at a time: when a job ends (its slot is refilled at once) or every
        ``poll_seconds``. A burst of new jobs is so shared between the worker processes polling
        the queue instead of filling the first one's slots while the others stay idle — on CPU
        each process's model runs on its own core. A process running ``n`` jobs takes only jobs
        due for ``n`` polls already, so a job that becomes due goes to the least busy process:
        left to whichever polled first, 8 long cines split 4 + 4 between two processes only a
        quarter of the time, and the process with fewer idled at the end (docs/benchmarks.md).
        """
        log.info("worker started", extra={"worker": self.ctx.worker, "slots": self.slots})
        poll = self.ctx.settings.queue.poll_seconds
        while not stop.is_set():
            try:
                with self._changed:
                    busy = len(self._running)
                self._claim_and_start(limit=1, defer_seconds=poll * busy)
            except Exception:  # noqa: BLE001 - DB outage etc.: log, wait, keep the worker alive
                log.exception("worker loop error; retrying", extra={"worker": self.ctx.worker})
            with self._changed:
                if not stop.is_set():
                    self._changed.wait(poll)  # a job ending wakes the loop at once
        with self._changed:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join()
        log.info("worker stopped", extra={"worker": self.ctx.worker})

    def release_all(self) -> None:
        """Give every job in the slots back to the queue (shutdown past the drain time)."""
        for running in self.running():
            queue.release(self.ctx.db, running.job, running.ctx.worker, _now())
            log.warning("job released at shutdown", extra={"job": running.job.id})

    def _claim_and_start(
        self, limit: int | None = None, defer_seconds: float = 0.0
    ) -> list[threading.Thread]:
        """One claim per free slot (at most ``limit``), under that slot's name, until the queue
        has none due (for ``defer_seconds``: see :func:`daemon.db.queue.claim`)."""
        q = self.ctx.settings.queue
        started: list[threading.Thread] = []
        while not self.ctx.stopping.is_set() and (limit is None or len(started) < limit):
            with self._changed:
                free = [s for s in range(self.slots) if s not in self._running]
            if not free:
                break
            slot = free[0]
            owner = self.slot_owner(slot)
            jobs = queue.claim(
                self.ctx.db,
                owner,
                _now(),
                q.lease_seconds,
                q.max_attempts,
                kinds=list(self.handlers),
                defer_seconds=defer_seconds,
            )
            if not jobs:
                break
            (job,) = jobs
            running = Running(slot, job, self.ctx.for_job(owner))
            thread = threading.Thread(
                target=self._run_in_slot, args=(running,), name=f"job-{job.id}", daemon=True
            )
            with self._changed:
                self._running[slot] = running
                self._threads[slot] = thread
            thread.start()
            started.append(thread)
        return started

    def _run_in_slot(self, running: Running) -> None:
        try:
            self._run(running.job, running.ctx)
        except Exception:  # noqa: BLE001 - a DB error recording the outcome: the lease expires
            log.exception("job outcome not recorded", extra={"job": running.job.id})
        finally:
            with self._changed:
                self._running.pop(running.slot, None)
                self._threads.pop(running.slot, None)
                self._changed.notify_all()

    def _run(self, job: ClaimedJob, ctx: WorkContext) -> None:
        q = ctx.settings.queue
        beat = _Heartbeat(ctx, job)
        beat.start()
        extra = {"job": job.id, "kind": job.kind, "attempt": job.attempts, "worker": ctx.worker}
        try:
            try:
                outcome = self.handlers[job.kind](ctx, job)
            finally:
                beat.done.set()
                _let_go(ctx, job)
        except JobReleased as exc:
            log.info("job released, back in line", extra={**extra, "reason": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is the job's, not the worker's
            error = f"{type(exc).__name__}: {exc}"
            where = None
            if not isinstance(exc, JobFailed):
                error += "\n" + traceback.format_exc(limit=8)
                # Where it broke, without the message (which may quote data): for the log.
                last = traceback.extract_tb(exc.__traceback__)[-1]
                where = f"{Path(last.filename).name}:{last.lineno} in {last.name}"
            # A permanent failure (e.g. an undecodable file) is dead-lettered at once: retrying
            # cannot change the bytes in the archive.
            permanent = isinstance(exc, JobFailed) and exc.permanent
            state = queue.fail(
                ctx.db,
                job,
                ctx.worker,
                _now(),
                error,
                job.attempts if permanent else q.max_attempts,
                q.backoff_base_seconds,
                q.backoff_max_seconds,
            )
            log.warning(
                "job failed",
                extra={**extra, "state": state.value, "error": type(exc).__name__, "where": where},
            )
            return
        try:
            queue.complete(
                ctx.db, job, ctx.worker, _now(), outcome.payload, outcome.state, outcome.effect
            )
        except LeaseLost:
            log.warning("job taken over by another worker; result discarded", extra=extra)
            return
        log.info("job finished", extra={**extra, "state": outcome.state.value})


def _let_go(ctx: WorkContext, job: ClaimedJob) -> None:
    """Run the job's exit callbacks (e.g. its hold on shared batchers); their errors are logged,
    not the job's."""
    try:
        ctx.job_exit.close()
    except Exception:  # noqa: BLE001
        log.exception("job clean-up failed", extra={"job": job.id})
