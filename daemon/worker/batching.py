"""Shared forward passes: one :class:`~pipelines.infer.Batcher` per task's model version in a
worker process, used by every job that process runs at once (``queue.jobs_per_worker``).

A job *holds* the batcher of each model it uses until it ends (``WorkContext.job_exit`` lets
go). When a newer version of a task is activated, the next job gets a new batcher and the old
one is retired: it keeps serving the jobs that still hold it and is closed (its thread stopped,
its model left to be freed) when the last of them lets go, so no job ever finds its batcher
closed under it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from daemon.models.cache import LoadedModel
from daemon.worker.handlers import WorkContext
from daemon.worker.inference import TaskRun, predictor_for
from pipelines.infer import Batcher, Predictor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    task: str
    version: int
    batcher: Batcher
    holders: int = 0


class BatcherPool:
    """The batchers of one worker process.

    Parameters
    ----------
    max_batch
        Most frames per forward pass; None: each predictor's ``preferred_batch``.
    max_wait_ms
        Longest a frame waits for company before its batch leaves anyway.
    """

    def __init__(self, max_batch: int | None = None, max_wait_ms: float = 20.0) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self._lock = threading.Lock()
        self._current: dict[str, _Entry] = {}
        self._retired: list[_Entry] = []
        self._closed = False

    def hold(self, loaded: LoadedModel, predictor: Predictor) -> Batcher:
        """The batcher of ``loaded``'s version (made on first use), held until :meth:`release`.

        Raises
        ------
        RuntimeError
            The pool is closed (the worker process is stopping).
        """
        task, version = loaded.task.name, loaded.ref.id
        to_close: _Entry | None = None
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher pool is closed")
            entry = self._current.get(task)
            if entry is None or entry.version != version:
                if entry is not None:
                    # A newer version is active: the old batcher serves its holders, then closes.
                    if entry.holders:
                        self._retired.append(entry)
                    else:
                        to_close = entry
                max_batch = self.max_batch or predictor.preferred_batch
                # Every pass also keeps the Eigen-CAM layer's activations (the predictor's
                # cam_target): a job's reported frame is explained from the pass that
                # classified it.
                batcher = Batcher(
                    predictor.predict_with_activations,
                    item_shape=predictor.input_shape,
                    max_batch=max_batch,
                    max_wait_ms=self.max_wait_ms,
                    name=f"batcher-{task}-{version}",
                )
                entry = self._current[task] = _Entry(task, version, batcher)
                log.info(
                    "batcher started",
                    extra={"task": task, "model_id": version, "max_batch": max_batch},
                )
            entry.holders += 1
            batcher = entry.batcher
        if to_close is not None:
            _close(to_close)
        return batcher

    def release(self, batcher: Batcher) -> None:
        """Let go of a batcher from :meth:`hold`; a retired one closes with its last holder."""
        to_close: _Entry | None = None
        with self._lock:
            entry = next(
                (e for e in [*self._current.values(), *self._retired] if e.batcher is batcher),
                None,
            )
            if entry is None or entry.holders < 1:
                raise ValueError("release of a batcher that is not held")
            entry.holders -= 1
            if entry.holders == 0 and entry in self._retired:
                self._retired.remove(entry)
                to_close = entry
        if to_close is not None:
            _close(to_close)

    def batchers(self) -> dict[str, Batcher]:
        """Task → the batcher of its current version (for stats and tests)."""
        with self._lock:
            return {task: entry.batcher for task, entry in self._current.items()}

    def close(self) -> None:
        """Finish what is queued and stop every batcher (the worker process is ending)."""
        with self._lock:
            self._closed = True
            entries = [*self._current.values(), *self._retired]
            self._current.clear()
            self._retired.clear()
        for entry in entries:
            _close(entry)


def _close(entry: _Entry) -> None:
    entry.batcher.close()
    stats = entry.batcher.stats
    log.info(
        "batcher closed",
        extra={
            "task": entry.task,
            "model_id": entry.version,
            "batches": stats.batches,
            "frames": stats.frames,
            "largest": stats.largest,
        },
    )


def batcher_pool(ctx: WorkContext) -> BatcherPool:
    """This worker process's pool, made on first use from ``[analysis]``."""
    shared = ctx.shared
    with shared.lock:
        if shared.batchers is None:
            analysis = ctx.settings.analysis
            shared.batchers = BatcherPool(analysis.max_batch, analysis.max_wait_ms)
        pool: BatcherPool = shared.batchers
        return pool


def task_run(ctx: WorkContext, loaded: LoadedModel) -> TaskRun:
    """A :class:`TaskRun` for one job whose frames go through the process's shared batcher of
    ``loaded``'s version, held until the job ends."""
    predictor = predictor_for(loaded)
    pool = batcher_pool(ctx)
    batcher = pool.hold(loaded, predictor)
    ctx.job_exit.callback(pool.release, batcher)
    # Up to two batches in flight: the job decodes the next batch's frames while one runs.
    return TaskRun(loaded, batcher, in_flight=2 * batcher.max_batch)
