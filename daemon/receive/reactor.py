"""Event-driven waits for pynetdicom's acceptor loops (the one place we reach into pynetdicom).

Why: pynetdicom 3.0 runs two polling loops per association. The DUL thread sleeps 1 ms whenever it
finds nothing to do, and the association thread sleeps 1 ms before every look at the DIMSE queue.
With a sender that waits for each C-STORE response (storescu, dcmsend, most modalities) every
instance pays those sleeps three times: the next request sits unread on the socket, the decoded
message sits in the queue, the response sits in the outgoing queue. Measured on the ingest bench
(1.44 MB frames, one association) that was ~2 ms of ~8 ms per file; busy-polling instead (shorter
sleeps) made it worse, because the spinning thread competes for the GIL with the thread reading.

What: the same loops, with each sleep replaced by a wait that returns as soon as there is work:

* the DUL thread waits in ``select()`` on its socket plus a wake-up socket pair that
  :meth:`EventDUL.send_pdu`/``kill_dul``/``stop_dul`` write to;
* the association thread waits on a :class:`threading.Event` that the DUL sets after every state
  machine action (the only place messages, releases and aborts are queued for it) and when it
  exits; ``kill()`` sets it too;
* :class:`FastSocket` reads a PDU with ``recv_into`` into one buffer instead of 4 KiB ``recv``
  calls appended to a ``bytearray``.

Every wait also has a short timeout (:data:`IDLE_WAIT`), so timers (ARTIM, network timeout) keep
working and a missed wake-up costs at most that. The loop bodies are copies of pynetdicom 3.0.4's
``DULServiceProvider.run_reactor`` and ``Association._run_reactor`` with only the sleep changed;
``tests/unit/test_reactor.py`` pins the pynetdicom version range they were copied from and runs
associations (store, release, abort, N-EVENT-REPORT on the same association) through them.
Only the acceptor associations of our own server use these classes (see ``server.py``).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

DUL_LOGGER = logging.getLogger("pynetdicom.dul")  # the loggers the copied loops log to
ASSOC_LOGGER = logging.getLogger("pynetdicom.association")

#: Longest a reactor waits without a wake-up before it re-checks its timers and flags.
IDLE_WAIT = 0.01

#: The pynetdicom releases whose loops were copied here (checked by the unit tests).
COPIED_FROM = ("3.0.",)

#: sha256 (first 16 hex digits) of ``inspect.getsource`` of the two upstream loops we copied;
#: the unit tests fail when pynetdicom changes them, so that the copies are redone, not stale.
UPSTREAM_SOURCE = {
    "DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "Association._run_reactor": "f28838c5559e462a",
}


def supported() -> bool:
    return pynetdicom.__version__.startswith(COPIED_FROM)


class FastSocket(AssociationSocket):
    """Reads ``nr_bytes`` with ``recv_into`` straight into the result buffer."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:  # connection closed: return what arrived, as pynetdicom does
                del view
                del buffer[nr_read:]
                return buffer
            nr_read += count
        return buffer


class EventDUL(DULServiceProvider):
    """DUL provider whose idle wait is ``select()`` on the peer socket and a wake-up pair."""

    activity: threading.Event
    _wake_r: socket.socket
    _wake_w: socket.socket

    def _init_events(self, activity: threading.Event) -> None:
        self.activity = activity
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already a wake-up pending, or the pair is closed

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def run(self) -> None:
        # Thread.__init__ bound pynetdicom's run_reactor as the target; run ours instead.
        try:
            make_target(self.run_reactor)()
        finally:
            self.activity.set()  # the association notices at once that the DUL has gone
            self._wake_r.close()
            self._wake_w.close()

    def _wait_idle(self) -> None:
        """Return when the socket is readable, a primitive was queued, or IDLE_WAIT passed."""
        transport = self.socket
        peer = transport.socket if transport is not None else None
        if isinstance(peer, ssl.SSLSocket) and peer.pending():
            return  # decrypted bytes already buffered: select() would not see them
        waitables: list[socket.socket] = [self._wake_r]
        if peer is not None and transport is not None and transport._is_connected:
            waitables.append(peer)
        try:
            ready, _, _ = select.select(waitables, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # the peer socket was closed under us
            ready = []
            select.select([self._wake_r], [], [], IDLE_WAIT)
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(64):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4 ``DULServiceProvider.run_reactor``; the sleep is ``_wait_idle``."""
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_idle()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            # Wake the association only when it may have something to do: a complete DIMSE
            # message, an A-RELEASE/A-ABORT primitive, or any event other than P-DATA going out
            # (Evt9) or coming in (Evt10). Waking it for each P-DATA-TF of a 1.4 MB dataset
            # only makes the two threads fight for the GIL while the data arrives.
            if (
                event not in ("Evt9", "Evt10")
                or not self.to_user_queue.empty()
                or not self.assoc.dimse.msg_queue.empty()
            ):
                self.activity.set()
            sleep = False


class EventAssociation(Association):
    """Acceptor association whose reactor waits for DUL activity instead of sleeping 1 ms."""

    _activity: threading.Event

    def kill(self) -> None:
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4 ``Association._run_reactor``; the sleep is a wait on ``_activity``.

        The wait sits inside the paused window, so a ``send_*()`` call from another thread (our
        Storage Commitment report on the same association) need not wait for it to end.
        """
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._activity.wait(IDLE_WAIT)
            self._activity.clear()  # before the checks below: a later set() wakes the next wait
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._activity.set()  # look again at once: another message may be queued

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


def install(assoc: Association) -> Association:
    """Switch a freshly created, not yet started acceptor association to the event-driven loops.

    A pynetdicom outside :data:`COPIED_FROM` keeps its own loops (correct, only slower).
    """
    if not supported() or assoc.is_alive():
        return assoc
    activity = threading.Event()
    assoc.__class__ = EventAssociation
    cast(EventAssociation, assoc)._activity = activity
    dul = assoc.dul
    dul.__class__ = EventDUL
    cast(EventDUL, dul)._init_events(activity)
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = FastSocket
    return assoc


__all__ = [
    "COPIED_FROM",
    "EventAssociation",
    "EventDUL",
    "FastSocket",
    "IDLE_WAIT",
    "UPSTREAM_SOURCE",
    "install",
    "supported",
]
