"""The dispatcher: drains the outbox to every enabled destination, N associations at a time.

One loop thread claims batches; each batch is one association in a pool thread. A destination
has ``max_associations`` slots; a slot claims under its own lease-owner token, and the claim
itself refuses a slot when that many associations (of any process, on any host) already hold
live leases on the destination, so the limit holds across ``usfmd serve`` and ``usfmd worker
--dispatch`` processes sharing one database.

Stopping (SIGTERM) claims nothing more, lets open associations go on for ``drain_seconds``, then
aborts them; objects not sent go back to pending without counting the attempt. A process that
dies instead leaves its objects leased: they are claimable again when the lease expires.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from datetime import UTC, datetime
from pathlib import Path

from pynetdicom.association import Association

from daemon.config import Destination, Settings
from daemon.db.engine import Database
from daemon.dispatch import outbox, scu
from daemon.dispatch.outbox import ClaimedItem, Delivery, RetryPolicy

log = logging.getLogger(__name__)

#: Seconds stop() waits for aborted associations' threads after the drain.
_ABORT_GRACE = 10.0


def _now() -> datetime:
    return datetime.now(UTC)


def destination_names(settings: Settings) -> list[str]:
    """Every configured destination, enabled or not: a disabled one keeps its queue."""
    return [d.name for d in settings.dispatch.destinations]


class Dispatcher:
    """Sends queued results; :meth:`start` runs it in a thread, :meth:`run_once` runs one round."""

    def __init__(
        self, settings: Settings, db: Database, archive_root: Path, name: str | None = None
    ) -> None:
        self.settings = settings
        self.dispatch = settings.dispatch
        self.db = db
        self.archive_root = archive_root
        self.policy = RetryPolicy.from_settings(settings.dispatch)
        #: Prefix of this process's lease owners; unique per process and host.
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.destinations: list[Destination] = [d for d in self.dispatch.destinations if d.enabled]
        self._free = {d.name: list(range(d.max_associations)) for d in self.destinations}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._aborting = threading.Event()
        self._open: set[Association] = set()
        self._futures: set[Future[None]] = set()
        workers = max(1, sum(d.max_associations for d in self.destinations))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dispatch")
        self._thread: threading.Thread | None = None

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()
        log.info(
            "dispatcher started",
            extra={"destinations": [d.name for d in self.destinations], "owner": self.name},
        )

    def wake(self) -> None:
        """Look at the outbox now instead of at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - DB outage etc.: log, wait, keep dispatching
                log.exception("dispatcher round failed; retrying")
            self._wake.wait(self.dispatch.poll_seconds)
            self._wake.clear()

    def run_once(self) -> int:
        """Start an association for each free slot of each destination with due objects."""
        started = 0
        for destination in self.destinations:
            while not self._stopping.is_set():
                with self._lock:
                    if not self._free[destination.name]:
                        break
                    slot = self._free[destination.name].pop(0)
                items = self._claim(destination, slot)
                if not items:
                    with self._lock:
                        self._free[destination.name].insert(0, slot)
                    break
                future = self._pool.submit(self._deliver, destination, slot, items)
                with self._lock:
                    self._futures.add(future)
                future.add_done_callback(self._forget)
                started += 1
        return started

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def owner(self, destination: str, slot: int) -> str:
        return f"{self.name}:{destination}:{slot}"

    def _claim(self, destination: Destination, slot: int) -> list[ClaimedItem]:
        now = _now()
        if not outbox.has_due(self.db, destination.name, now):
            return []
        return outbox.claim(
            self.db,
            destination.name,
            self.owner(destination.name, slot),
            now,
            lease_seconds=self.dispatch.lease_seconds,
            max_associations=destination.max_associations,
            limit=self.dispatch.batch_size,
            policy=self.policy,
        )

    # -- one association -----------------------------------------------------------------------
    def _deliver(self, destination: Destination, slot: int, items: list[ClaimedItem]) -> None:
        owner = self.owner(destination.name, slot)
        try:
            self._send_batch(destination, owner, items)
        except Exception:  # noqa: BLE001 - pool thread boundary: the leases expire, log it
            log.exception(
                "dispatch batch failed; its objects return when their lease expires",
                extra={"destination": destination.name, "objects": len(items)},
            )
        finally:
            with self._lock:
                self._free[destination.name].append(slot)
            self._wake.set()  # the slot is free: more may be due

    def _record(self, owner: str, deliveries: Sequence[Delivery]) -> None:
        recorded = outbox.record(
            self.db, owner, deliveries, _now(), self.policy, self.dispatch.lease_seconds
        )
        if recorded < len(deliveries):
            log.warning(
                "lease lost while sending; another association took the objects over",
                extra={"owner": owner, "lost": len(deliveries) - recorded},
            )

    def _send_batch(self, destination: Destination, owner: str, items: list[ClaimedItem]) -> None:
        extra = {"destination": destination.name, "ae_title": destination.ae_title}
        try:
            assoc = scu.open_association(
                destination,
                self.settings.dicom.ae_title,
                scu.proposed_contexts(items),
                self.dispatch,
            )
        except scu.AssociationFailed as exc:
            self._record(owner, [Delivery(item, False, None, str(exc)) for item in items])
            log.warning("destination unreachable: %s", exc, extra={**extra, "objects": len(items)})
            return
        with self._lock:
            self._open.add(assoc)
        remaining = list(items)
        sent = failed = 0
        try:
            for message_id, item in enumerate(items, start=1):
                if self._aborting.is_set():
                    break
                if not assoc.is_established:
                    lost = [
                        Delivery(i, False, None, "association ended by the peer") for i in remaining
                    ]
                    self._record(owner, lost)
                    failed += len(lost)
                    remaining = []
                    break
                delivery = scu.send(assoc, item, self.archive_root, message_id)
                if not delivery.accepted and self._aborting.is_set():
                    break  # we aborted it: not the destination's failure, give it back
                remaining.remove(item)
                self._record(owner, [delivery])
                if delivery.accepted:
                    sent += 1
                else:
                    failed += 1
                    log.warning(
                        "object not accepted: %s",
                        delivery.error,
                        extra={**extra, "sop_instance_uid": item.sop_instance_uid},
                    )
        finally:
            with self._lock:
                self._open.discard(assoc)
            if assoc.is_established:
                if self._aborting.is_set():
                    assoc.abort()
                else:
                    assoc.release()
            if remaining:
                outbox.release(self.db, owner, [i.id for i in remaining], _now())
        log.info(
            "association to destination done",
            extra={**extra, "sent": sent, "failed": failed, "returned": len(remaining)},
        )

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, drain_seconds: float | None = None) -> None:
        """Claim nothing more; let batches finish for ``drain_seconds``, then abort them."""
        drain = self.dispatch.drain_seconds if drain_seconds is None else drain_seconds
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            pending = set(self._futures)
        _, not_done = wait_for_futures(pending, timeout=drain)
        if not_done:
            self._aborting.set()
            with self._lock:
                open_now = list(self._open)
            for assoc in open_now:
                assoc.abort()
                # A sender waiting for a C-STORE response blocks on the DIMSE queue until the
                # DIMSE timeout; our own abort does not post to it (only a peer's does, PS3.8
                # AA-2/3/4 in pynetdicom's fsm), so post the same "no message" item here.
                assoc.dimse.msg_queue.put((None, None))
            log.warning("aborted associations at shutdown", extra={"associations": len(open_now)})
            wait_for_futures(not_done, timeout=_ABORT_GRACE)
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("dispatcher stopped", extra={"owner": self.name})
