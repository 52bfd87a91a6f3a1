"""``usfmd serve``: wire configuration, database, archive, DICOM listener and scheduler together."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.config import Settings
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.studies import sweep, sweep_reports
from daemon.dispatch.dispatcher import Dispatcher
from daemon.receive.archive import Archive
from daemon.receive.handlers import Receiver
from daemon.receive.server import DicomServer
from daemon.worker.process import WorkerPool

log = logging.getLogger(__name__)


def open_archive(settings: Settings) -> Archive:
    storage = settings.storage
    return Archive(
        storage.archive, storage.quarantine, storage.incoming, int(storage.min_free_space)
    )


def open_database(settings: Settings, upgrade: bool = True) -> Database:
    db = Database(
        settings.database_url,
        pool_size=settings.database.pool_size,
        busy_timeout_ms=settings.database.busy_timeout_ms,
    )
    if upgrade:
        migrate.upgrade(db.engine)
    return db


class Daemon:
    """The running service; :meth:`start` returns once it listens, :meth:`stop` drains it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = open_database(settings)
        self.archive = open_archive(settings)
        left = self.archive.discard_incoming()
        if left:
            log.warning("removed unacknowledged partial receives", extra={"files": left})
        self.receiver = Receiver(settings, self.archive, self.db)
        self.server = DicomServer(settings.dicom, self.receiver)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.workers = WorkerPool(settings, settings.queue.workers)
        # Results go out from here unless dispatch is left to `usfmd worker --dispatch` hosts.
        sending = settings.dispatch.enabled and any(
            d.enabled for d in settings.dispatch.destinations
        )
        self.dispatcher = Dispatcher(settings, self.db, self.archive.root) if sending else None
        self._stopped = threading.Event()

    def sweep_once(self) -> tuple[int, int]:
        waits = [self.settings.study.stable_seconds] + [
            ae.stable_seconds for ae in self.settings.dicom.calling_aes if ae.stable_seconds
        ]
        studies, jobs = sweep(
            self.db, datetime.now(UTC), self.settings.stable_seconds_for, min(waits)
        )
        if studies:
            log.info("studies became stable", extra={"studies": studies, "jobs_queued": jobs})
        with self.db.write() as session:
            reports = sweep_reports(session, datetime.now(UTC), timedelta(hours=1))
        if reports:
            log.info("study reports queued by the sweep", extra={"reports": reports})
        stale = self.archive.discard_stale_incoming(self.stale_incoming_seconds)
        if stale:
            log.warning("discarded abandoned partial receives", extra={"files": stale})
        return studies, jobs

    @property
    def stale_incoming_seconds(self) -> float:
        """Idle time after which a partial receive is abandoned: well above the network timeout
        that would have ended its association."""
        return max(4 * self.settings.dicom.network_timeout, 300.0)

    def start(self) -> None:
        self.server.start()
        self.scheduler.add_job(
            self.sweep_once,
            "interval",
            seconds=self.settings.study.sweep_interval_seconds,
            id="stability-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        self.workers.start()
        if self.dispatcher is not None:
            self.dispatcher.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.server.stop()
        self.scheduler.shutdown(wait=True)
        self.workers.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()  # open associations drain; unsent objects stay queued
        self.receiver.close()
        self.db.dispose()
        log.info("usfmd stopped")

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop accepting and let associations finish."""
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info(
                "signal received, shutting down", extra={"signal": signal.Signals(signum).name}
            )
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()
