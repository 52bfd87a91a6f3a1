"""Dynamic batching: frames from concurrent jobs share one forward pass.

Per frame, a ViT forward pass is cheapest in batches (small matmuls leave a GPU mostly idle, and
even two CPU cores gain from batch 8 to 32), so jobs that arrive together — several cines of one
study, several studies — are served fastest by shared batches. Each caller submits its frames and
gets a :class:`~concurrent.futures.Future` of *its own* rows; one worker thread calls the model.

A batch leaves when it holds ``max_batch`` frames or when its oldest frame has waited
``max_wait_ms``, whichever comes first. A submission larger than ``max_batch`` is split over
several batches and its future resolves once all of its rows are back.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

logger = logging.getLogger(__name__)

BatchFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: Future[np.ndarray]
    arrived: float
    #: Frames already handed to a batch.
    taken: int = 0
    #: Frames whose rows are back.
    done: int = 0
    out: np.ndarray | None = None
    failed: bool = False

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class _Slice:
    request: _Request
    start: int
    stop: int


@dataclass
class BatcherStats:
    """Counters for metrics and tests: batches run, frames through them, largest batch seen."""

    batches: int = 0
    frames: int = 0
    largest: int = 0
    sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=1024))


class Batcher:
    """Collects frames from concurrent submitters into batches for one function (a model).

    Parameters
    ----------
    fn
        ``(B, *item_shape)`` array → ``(B, ...)`` array, one output row per input row (e.g.
        :meth:`pipelines.infer.Predictor.predict`). Runs on the batcher's own thread only.
    item_shape
        Shape of one frame's input, e.g. ``(3, 224, 224)``; submissions are checked against it
        so that a bad one fails its own caller, not a whole batch.
    max_batch
        Most frames per call of ``fn``.
    max_wait_ms
        Longest a frame waits for company before its batch leaves anyway.
    name
        Worker thread name (shows in thread dumps and logs).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        fn: BatchFunction,
        *,
        item_shape: tuple[int, ...],
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        name: str = "usfmd-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
        if any(side < 1 for side in item_shape):
            raise ValueError(f"item_shape={item_shape}: every dimension must be >= 1")
        self._fn = fn
        self.item_shape = tuple(item_shape)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_frames = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------------
    def submit(self, inputs: np.ndarray) -> Future[np.ndarray]:
        """Queue ``(n, *item_shape)`` frames; the future gives their ``n`` output rows in order.

        The array is not copied: leave it unchanged until the future is done.

        Raises
        ------
        ValueError
            Wrong shape or no frame.
        RuntimeError
            The batcher is closed.
        """
        array = np.asarray(inputs)
        if array.ndim != len(self.item_shape) + 1 or tuple(array.shape[1:]) != self.item_shape:
            raise ValueError(f"inputs of shape {array.shape}: expected (n, *{self.item_shape})")
        if array.shape[0] < 1:
            raise ValueError("inputs hold no frame")
        future: Future[np.ndarray] = Future()
        request = _Request(array, future, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(request)
            self._pending_frames += request.size
            self._cond.notify_all()
        return future

    def __call__(self, inputs: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Submit and wait: the rows for ``inputs`` (exceptions of the batch re-raised here)."""
        return self.submit(inputs).result(timeout)

    @property
    def pending_frames(self) -> int:
        """Frames queued and not yet handed to a batch."""
        with self._cond:
            return self._pending_frames

    def close(self, timeout: float | None = None) -> None:
        """Stop taking submissions, finish what is queued, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- worker ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Slice] | None:
        """Block until a batch is due; ``None`` once closed and drained."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return None
                deadline = self._pending[0].arrived + self.max_wait
                while self._pending_frames < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                slices = self._take()
                if slices:
                    return slices

    def _take(self) -> list[_Slice]:
        """Move up to ``max_batch`` frames from the queue's head into a batch (lock held)."""
        slices: list[_Slice] = []
        room = self.max_batch
        while self._pending and room:
            request = self._pending[0]
            if request.failed:
                # An earlier batch with some of its frames failed; its caller already knows.
                self._pending.popleft()
                self._pending_frames -= request.size - request.taken
                continue
            if request.taken == 0 and not request.future.set_running_or_notify_cancel():
                # Cancelled by its caller before any of its frames ran: drop it.
                self._pending.popleft()
                self._pending_frames -= request.size
                continue
            count = min(room, request.size - request.taken)
            slices.append(_Slice(request, request.taken, request.taken + count))
            request.taken += count
            self._pending_frames -= count
            room -= count
            if request.taken == request.size:
                self._pending.popleft()
        return slices

    def _run(self) -> None:
        try:
            while (slices := self._next_batch()) is not None:
                self._run_batch(slices)
        finally:
            # Only reached with work queued if the worker itself dies (KeyboardInterrupt,
            # SystemExit): no caller may be left waiting on a future nobody will resolve.
            with self._cond:
                self._closed = True
                stranded, self._pending = list(self._pending), collections.deque()
                self._pending_frames = 0
            for request in stranded:
                if not request.future.done():
                    request.future.set_exception(RuntimeError("the batcher's worker stopped"))

    def _run_batch(self, slices: list[_Slice]) -> None:
        live = [s for s in slices if not s.request.failed]
        batch = np.concatenate([s.request.inputs[s.start : s.stop] for s in live])
        try:
            out = np.asarray(self._fn(batch))
            if out.ndim < 1 or out.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"batch function returned shape {out.shape} for {batch.shape[0]} inputs"
                )
        except BaseException as exc:
            # Every caller with frames in this batch hears of it; the batcher itself carries on.
            logger.exception("batch of %d frames failed", batch.shape[0])
            for s in live:
                if not s.request.failed:
                    s.request.failed = True
                    s.request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.stats.batches += 1
        self.stats.frames += int(batch.shape[0])
        self.stats.largest = max(self.stats.largest, int(batch.shape[0]))
        self.stats.sizes.append(int(batch.shape[0]))
        row = 0
        for s in live:
            request, count = s.request, s.stop - s.start
            if request.out is None:
                request.out = np.empty((request.size, *out.shape[1:]), dtype=out.dtype)
            request.out[s.start : s.stop] = out[row : row + count]
            row += count
            request.done += count
            if request.done == request.size:
                request.future.set_result(request.out)
