"""One worker: claim, heartbeat, run, complete or fail — until told to stop."""

from __future__ import annotations

import logging
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path

from daemon.db import queue
from daemon.db.queue import ClaimedJob, LeaseLost
from daemon.worker.handlers import HANDLERS, Handler, JobFailed, WorkContext

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class _Heartbeat(threading.Thread):
    """Extends the lease every ``heartbeat_seconds`` while the handler works."""

    def __init__(self, ctx: WorkContext, job: ClaimedJob) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.ctx, self.job = ctx, job
        self.done = threading.Event()

    def run(self) -> None:
        q = self.ctx.settings.queue
        while not self.done.wait(q.heartbeat_seconds):
            if not queue.heartbeat(
                self.ctx.db, self.job.id, self.ctx.worker, _now(), q.lease_seconds
            ):
                log.warning("lease lost while working", extra={"job": self.job.id})
                self.ctx.lease_lost.set()
                return


class Worker:
    def __init__(self, ctx: WorkContext, handlers: dict[str, Handler] | None = None) -> None:
        self.ctx = ctx
        self.handlers = handlers or HANDLERS
        self.current: ClaimedJob | None = None

    def run_once(self) -> bool:
        """Claim and run one job; False when none was due."""
        q = self.ctx.settings.queue
        jobs = queue.claim(
            self.ctx.db,
            self.ctx.worker,
            _now(),
            q.lease_seconds,
            q.max_attempts,
            kinds=list(self.handlers),
        )
        if not jobs:
            return False
        for job in jobs:
            self._run(job)
        return True

    def run(self, stop: threading.Event) -> None:
        log.info("worker started", extra={"worker": self.ctx.worker})
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - DB outage etc.: log, wait, keep the worker alive
                log.exception("worker loop error; retrying", extra={"worker": self.ctx.worker})
                busy = False
            if not busy:
                stop.wait(self.ctx.settings.queue.poll_seconds)
        log.info("worker stopped", extra={"worker": self.ctx.worker})

    def _run(self, job: ClaimedJob) -> None:
        q = self.ctx.settings.queue
        self.ctx.lease_lost.clear()
        self.current = job
        beat = _Heartbeat(self.ctx, job)
        beat.start()
        extra = {"job": job.id, "kind": job.kind, "attempt": job.attempts}
        try:
            outcome = self.handlers[job.kind](self.ctx, job)
        except Exception as exc:  # noqa: BLE001 - any handler error is the job's, not the worker's
            beat.done.set()
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
                self.ctx.db,
                job,
                self.ctx.worker,
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
            self.current = None
            return
        beat.done.set()
        try:
            queue.complete(
                self.ctx.db,
                job,
                self.ctx.worker,
                _now(),
                outcome.payload,
                outcome.state,
                outcome.effect,
            )
        except LeaseLost:
            log.warning("job taken over by another worker; result discarded", extra=extra)
            return
        finally:
            self.current = None
        log.info("job finished", extra={**extra, "state": outcome.state.value})

    def release_current(self) -> None:
        job = self.current
        if job is not None:
            queue.release(self.ctx.db, job, self.ctx.worker, _now())
            log.warning("job released at shutdown", extra={"job": job.id})
