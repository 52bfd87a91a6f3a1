"""Worker processes: ``usfmd serve`` starts ``queue.workers`` of them, ``usfmd worker`` runs
them alone so that more hosts can join one PostgreSQL queue.

Processes, not threads: image stages and inference are CPU-bound and must not share the GIL
with the DICOM receiver. Inside a process, ``queue.jobs_per_worker`` jobs run side by side
(:class:`daemon.worker.loop.Worker`) and share the process's models and batchers. SIGTERM stops
claiming, lets the jobs in flight finish for ``queue.drain_seconds`` and gives back those still
running then (not counted as an attempt).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from daemon.config import Settings, load_settings, settings_to_dict
from daemon.logs import configure_logging
from daemon.worker.handlers import WorkContext
from daemon.worker.loop import Worker

log = logging.getLogger(__name__)


def worker_name(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def run_worker(settings: Settings, index: int, stop: threading.Event) -> None:
    """Run one worker in this process until ``stop`` is set (then drain or release)."""
    from daemon.service import open_archive, open_database

    db = open_database(settings, upgrade=False)
    ctx = WorkContext(settings, db, open_archive(settings), worker_name(index))
    worker = Worker(ctx)

    def drain() -> None:
        stop.wait()
        ctx.stopping.set()
        deadline = time.monotonic() + settings.queue.drain_seconds
        while worker.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if worker.running():
            worker.release_all()
            os._exit(0)  # handlers cannot be interrupted otherwise; their jobs are back in line

    threading.Thread(target=drain, name="drain", daemon=True).start()
    try:
        worker.run(stop)
    finally:
        _close_shared(ctx)
        db.dispose()


def _close_shared(ctx: WorkContext) -> None:
    """Stop the process's batchers (their queues are empty: every job has ended)."""
    pool = ctx.shared.batchers
    if pool is not None:
        pool.close()


def _watch_parent(parent: int, stop: threading.Event, interval: float = 1.0) -> None:
    """Stop (drain or release) when the parent dies: a ``usfmd serve`` killed with SIGKILL
    cannot tell its workers, and orphans would go on claiming jobs with stale settings."""
    while not stop.wait(interval):
        if os.getppid() != parent:
            log.warning("parent process gone; worker stopping")
            stop.set()


def _child(settings_data: dict[str, Any], index: int, parent: int) -> None:
    from pipelines.memory import keep_freed_memory

    keep_freed_memory()  # frame-sized arrays reuse freed memory instead of new pages
    settings = load_settings(None, **settings_data)
    configure_logging(settings.logging.level, settings.logging.json_format)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_watch_parent, args=(parent, stop), daemon=True).start()
    run_worker(settings, index, stop)


class WorkerPool:
    """Local worker processes, started and drained together."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        data = settings_to_dict(self.settings)
        # One worker process per core: BLAS/OpenMP thread pools inside each would only make them
        # fight over the same cores (measured ~30x slower under load). Spawned children read
        # these at start-up; an operator's own values win.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
        for index in range(self.count):
            process = context.Process(
                target=_child, args=(data, index, os.getpid()), name=f"usfmd-worker-{index}"
            )
            process.start()
            self.processes.append(process)
        if self.count:
            log.info("worker processes started", extra={"workers": self.count})

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        grace = self.settings.queue.drain_seconds + 5
        for process in self.processes:
            process.join(grace)
            if process.is_alive():
                log.error("worker did not stop in time; killing", extra={"pid": process.pid})
                process.kill()
                process.join(5)
        self.processes.clear()
