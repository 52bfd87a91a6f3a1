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

import ctypes
import logging
import os
import queue
import select
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from daemon.receive import encoding

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
    # Not copied, relied on: a C-STORE-RQ's data set goes to ``_data_set_file`` when one is set,
    # and an empty last fragment completes the message (EventDUL._receive_pdv).
    "DIMSEMessage.decode_msg": "f51c777e841a76be",
}


def supported() -> bool:
    return pynetdicom.__version__.startswith(COPIED_FROM)


class FastSocket(AssociationSocket):
    """Reads ``nr_bytes`` with ``recv_into`` straight into the result buffer; bytes handed back
    with :meth:`unread` are returned first (so pynetdicom can re-read a PDU we only peeked at)."""

    _unread: bytes = b""

    def unread(self, data: bytes | bytearray) -> None:
        self._unread = bytes(data) + self._unread

    @property
    def ready(self) -> bool:
        return bool(self._unread) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        if self._unread:
            nr_read = min(nr_bytes, len(self._unread))
            view[:nr_read] = self._unread[:nr_read]
            self._unread = self._unread[nr_read:]
        while nr_read < nr_bytes:
            count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:  # connection closed: return what arrived, as pynetdicom does
                del view
                del buffer[nr_read:]
                return buffer
            nr_read += count
        return buffer


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` (not in ``os``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE: start write-out of dirty pages, do not wait

    def start_writeback(fd: int, offset: int, count: int) -> None:
        call(fd, offset, count, write)  # advisory: an error only means no head start

    return start_writeback


_start_writeback = _load_sync_file_range()


class DatasetFile:
    """A C-STORE data set being written to ``path`` as its fragments arrive.

    It stands where pynetdicom keeps its ``NamedTemporaryFile`` for a chunked receive
    (``_data_set_file``): pynetdicom calls ``write``, ``file.flush``, ``close`` and ``name``.
    Writes go straight to the file descriptor, from the received PDU's buffer, without copies.
    """

    #: Start the write-back of each this many bytes as soon as they are written, so that the
    #: fsync before the C-STORE response finds most of the file on disk already (Linux).
    WRITEBACK_BYTES = 512 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        # 0600 as tempfile's files: the archive holds patient data.
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        self._written = 0
        self._flushed = 0

    @property
    def file(self) -> DatasetFile:
        return self

    def write(self, data: bytes | memoryview) -> int:
        if not data:
            return 0
        if self._fd is None:
            raise ValueError("write to a closed data set file")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += len(data)
        if _start_writeback is not None and self._written - self._flushed >= self.WRITEBACK_BYTES:
            # Queues the pages for writing and returns; durability still comes from the fsync
            # in Archive.store.
            _start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written
        return len(data)

    def flush(self) -> None:
        """Nothing buffered here: every write went to the file descriptor."""

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class EventDUL(DULServiceProvider):
    """DUL provider whose idle wait is ``select()`` on the peer socket and a wake-up pair, and
    which writes C-STORE data sets straight from each P-DATA-TF PDU to a file in ``incoming``."""

    activity: threading.Event
    incoming: Path | None
    _wake_r: socket.socket
    _wake_w: socket.socket

    def _init_events(self, activity: threading.Event, incoming: Path | None = None) -> None:
        self.activity = activity
        self.incoming = incoming
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
            message = self.assoc.dimse.message  # a data set cut off by an abort
            if message is not None and isinstance(message._data_set_file, DatasetFile):
                message._data_set_file.close()  # the file stays for the stale-incoming sweep

    # -- C-STORE data sets straight to a file ------------------------------------------------
    def _read_pdu_data(self) -> None:
        """Read one PDU; a P-DATA-TF carrying a C-STORE data set is written to its file here.

        pynetdicom would copy each 128 KiB PDU five times on its way to the file (PDU buffer,
        ``bytes``, PDV slices, primitive, ``data[1:]``) and run its state machine and event
        dispatch per PDU. Here the data fragments are written from the receive buffer. Anything
        else, and any PDU we cannot vouch for, goes back to pynetdicom unread (see ``unread``),
        which then decodes it exactly as before.
        """
        transport = self.socket
        if (
            self.incoming is None
            or not isinstance(transport, FastSocket)
            or self.state_machine.current_state != "Sta6"
            or any(self.assoc.get_handlers(e) for e in _PER_PDU_EVENTS)
        ):
            super()._read_pdu_data()
            return
        try:
            head = transport.recv(6)
        except (OSError, TimeoutError) as exc:
            self._connection_lost(exc)
            return
        if len(head) < 6 or head[0] != 0x04:  # not a whole P-DATA-TF header
            transport.unread(head)
            super()._read_pdu_data()
            return
        length = int.from_bytes(head[2:6], "big")
        try:
            body = transport.recv(length)
        except (OSError, TimeoutError) as exc:
            self._connection_lost(exc)
            return
        pdvs = _split_pdvs(body) if len(body) == length else None
        if pdvs is None:  # short or malformed: pynetdicom reports it as it always has
            transport.unread(head + body)
            super()._read_pdu_data()
            return
        view = memoryview(body)
        for start, end in pdvs:
            self._receive_pdv(body[start], view[start + 1 : end])
        if not self.assoc.dimse.msg_queue.empty():
            self.activity.set()  # a message is complete: no state machine action here to do it

    def _connection_lost(self, exc: BaseException) -> None:
        """As pynetdicom's ``_read_pdu_data`` when a read fails: Evt17, transport closed."""
        DUL_LOGGER.error("Connection closed before the entire PDU was received")
        DUL_LOGGER.exception(exc)
        self.event_queue.put("Evt17")

    def _receive_pdv(self, context_id: int, pdv: memoryview) -> None:
        """One PDV: control header byte, then the fragment (PS3.8 E.2)."""
        dimse = self.assoc.dimse
        message = dimse.message
        control = pdv[0]
        if not control & 1 and isinstance(message, C_STORE_RQ):
            sink: Any = message._data_set_file
            if sink is None:
                sink = self._open_dataset_file(message)
            if isinstance(sink, DatasetFile):
                sink.write(pdv[1:])
                if control & 2:  # last fragment: let pynetdicom complete the message
                    sink.close()
                    dimse.receive_primitive(_p_data(context_id, b"\x02"))
                return
        dimse.receive_primitive(_p_data(context_id, pdv.tobytes()))

    def _open_dataset_file(self, message: DIMSEMessage) -> DatasetFile:
        """Create the data set's file with the File Meta Information pynetdicom would write."""
        command = message.command_set
        context = self.assoc._accepted_cx[cast(int, message.context_id)]
        sink = DatasetFile(cast(Path, self.incoming) / f"{uuid.uuid4().hex}.dcm")
        try:
            sop_class, sop_instance = command.AffectedSOPClassUID, command.AffectedSOPInstanceUID
            syntax = context.transfer_syntax[0]
            encoded = encoding.file_meta(sop_class, sop_instance, syntax)
            if encoded is None:  # not plain UIDs: let pydicom encode (and judge) them
                meta = DicomBytesIO()
                meta.write(encoding.PREAMBLE)
                write_file_meta_info(
                    meta,
                    create_file_meta(
                        sop_class_uid=sop_class,
                        sop_instance_uid=sop_instance,
                        transfer_syntax=syntax,
                    ),
                )
                encoded = meta.getvalue()
            sink.write(encoded)
        except BaseException:
            sink.close()
            sink.path.unlink(missing_ok=True)
            raise
        message._data_set_file = cast(Any, sink)
        message._data_set_path = sink.path
        return sink

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


#: Events pynetdicom triggers per received PDU; the direct path is taken only while no handler
#: is bound to them (usfmd binds none; pynetdicom's logging ones are unbound in server.py).
_PER_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)


def _split_pdvs(body: bytearray) -> list[tuple[int, int]] | None:
    """(start, end) of each PDV's context ID + control header + data in a P-DATA-TF body, or
    None if the items do not tile the body exactly (PS3.8 9.3.5: 4-byte length, then >= 2)."""
    pdvs: list[tuple[int, int]] = []
    offset, size = 0, len(body)
    while offset < size:
        if offset + 4 > size:
            return None
        item_length = int.from_bytes(body[offset : offset + 4], "big")
        start, end = offset + 4, offset + 4 + item_length
        if item_length < 2 or end > size:
            return None
        pdvs.append((start, end))
        offset = end
    return pdvs or None


def _p_data(context_id: int, pdv: bytes) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, pdv]]  # type: ignore[list-item]
    return primitive


class EventDIMSE(DIMSEServiceProvider):
    """DIMSE provider that sends a plain C-STORE Success response from pre-encoded bytes.

    pynetdicom turns each response primitive into a DIMSE message, a pydicom Dataset and its
    encoding (``send_msg``); for the one response every stored instance gets, the command set
    is a fixed layout (:func:`encoding.c_store_success`). The bytes still go out as a P-DATA
    primitive through the DUL and its state machine, exactly as pynetdicom's would. Any other
    message, or a bound ``EVT_DIMSE_SENT`` handler (which expects pynetdicom's message object),
    takes pynetdicom's path.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0x0000
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encoding.c_store_success(
                primitive.MessageIDBeingRespondedTo,
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
            )
            # One PDV (control header 0x03: command, last fragment) if it fits the peer's PDU.
            limit = self.maximum_pdu_size
            if command is not None and (limit == 0 or len(command) + 6 <= limit):
                self.dul.send_pdu(_p_data(context_id, b"\x03" + command))
                return
        super().send_msg(primitive, context_id)


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


def install(assoc: Association, incoming: Path | None = None) -> Association:
    """Switch a freshly created, not yet started acceptor association to the event-driven loops.

    With ``incoming``, C-STORE data sets are written to files there as they arrive
    (``event.dataset_path``), whatever pynetdicom's ``STORE_RECV_CHUNKED_DATASET``; the caller
    leaves that off so that pynetdicom itself creates no temporary file. A pynetdicom outside
    :data:`COPIED_FROM` keeps its own loops (correct, only slower).
    """
    if not supported() or assoc.is_alive():
        return assoc
    activity = threading.Event()
    assoc.__class__ = EventAssociation
    assoc.dimse.__class__ = EventDIMSE
    cast(EventAssociation, assoc)._activity = activity
    dul = assoc.dul
    dul.__class__ = EventDUL
    fast = type(dul.socket) is AssociationSocket
    if fast:
        dul.socket.__class__ = FastSocket
    cast(EventDUL, dul)._init_events(activity, incoming if fast else None)
    return assoc


__all__ = [
    "COPIED_FROM",
    "DatasetFile",
    "EventAssociation",
    "EventDIMSE",
    "EventDUL",
    "FastSocket",
    "IDLE_WAIT",
    "UPSTREAM_SOURCE",
    "install",
    "supported",
]
