"""pynetdicom event handlers: C-ECHO, C-STORE and the Storage Commitment N-ACTION.

Everything a handler needs (archive, database, settings) is held by :class:`Receiver` and passed
in when the server binds the handlers. A handler never raises into pynetdicom: every failure is
logged (without patient data) and answered with a named status, and the association stays up.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_STORE, N_ACTION
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

from daemon.config import Settings
from daemon.db.engine import Database
from daemon.db.index import InstanceHeader, count_duplicate, indexed_path, record_instance
from daemon.db.models import CommitmentRequest, CommitmentState
from daemon.errors import ConformanceError, DiskFullError
from daemon.receive import commitment, status
from daemon.receive.archive import Archive, fsync_path
from daemon.receive.header import HEAD_BYTES, read_header_fields
from daemon.receive.policy import known_ae
from daemon.receive.sop_classes import (
    ANALYSABLE_SOP_CLASSES,
    STORAGE_COMMITMENT_PUSH,
    STORAGE_SOP_CLASSES,
)
from daemon.tls import client_context

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: PS3.7 Annex C: Error Comment (0000,0902) is LO, at most 64 characters.
_ERROR_COMMENT_MAX = 64


def _answer(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


def _peer(event: Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), str(requestor.address)


@dataclass
class ReceiveCounters:
    """In-process counters for ``/metrics`` and tests (the DB holds the durable truth)."""

    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    refused_disk: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def _guarded(failure_status: int) -> Callable[[F], F]:
    """Turn any unexpected exception into ``failure_status``; the association survives.

    This is the one place a broad ``except`` is right: it is the boundary between a peer's bytes
    and our process, and pynetdicom would otherwise answer with its own non-standard status.
    """

    def wrap(handler: F) -> F:
        @functools.wraps(handler)
        def guarded(self: Receiver, event: Event, *args: Any) -> Any:
            try:
                return handler(self, event, *args)
            except Exception as exc:  # noqa: BLE001 - handler boundary, see docstring
                self.counters.add("failures")
                log.exception(
                    "handler failed; answering with a failure status",
                    extra={"handler": handler.__name__, "error": type(exc).__name__},
                )
                answer = _answer(failure_status, f"internal error: {type(exc).__name__}")
                if handler.__name__ == "on_n_action":
                    return answer, None
                return answer

        return guarded  # type: ignore[return-value]

    return wrap


def route_storage_classes() -> None:
    """Let pynetdicom hand every storage class we accept to :meth:`Receiver.on_c_store`.

    pynetdicom knows no service class for the retired US classes (PS3.4 B.5, ``...1.1.6`` and
    ``...1.1.3``) that older scanners still send: it accepts them in negotiation, then aborts the
    association at the first C-STORE. Registering them as storage classes is idempotent.
    """
    for uid in STORAGE_SOP_CLASSES:
        if uid_to_service_class(uid) is not StorageServiceClass:
            keyword = UID(uid).keyword or "Storage_" + uid.replace(".", "_")
            register_uid(uid, keyword, StorageServiceClass)


class Receiver:
    """The state the DICOM handlers share; one per running server."""

    def __init__(self, settings: Settings, archive: Archive, db: Database) -> None:
        route_storage_classes()
        self.settings = settings
        self.archive = archive
        self.db = db
        self.counters = ReceiveCounters()
        # Reports are sent after the N-ACTION response has gone out (see _report_after_response).
        self._reports = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commitment")
        # File I/O overlapped with each C-STORE's parsing and index statements: at most two
        # jobs at a time per association, the early flush and the store (see on_c_store).
        self._durability = ThreadPoolExecutor(
            max_workers=2 * settings.dicom.max_associations, thread_name_prefix="durable"
        )

    # -- C-ECHO (PS3.7 §9.1.5, Verification Service Class PS3.4 Annex A) ----------------------
    def on_c_echo(self, event: Event) -> int:
        return status.SUCCESS

    # -- C-STORE (PS3.4 Annex B) -------------------------------------------------------------
    @_guarded(status.PROCESSING_FAILURE)
    def on_c_store(self, event: Event) -> Dataset:
        received = self._received_file(event)
        calling_ae, peer_host = _peer(event)
        request = cast(C_STORE, event.request)
        context = {
            "calling_ae": calling_ae,
            "peer": peer_host,
            "sop_class_uid": str(request.AffectedSOPClassUID),
            "sop_instance_uid": str(request.AffectedSOPInstanceUID),
            "transfer_syntax_uid": str(event.context.transfer_syntax),
        }
        try:
            self.archive.check_space()
        except DiskFullError as exc:
            received.unlink(missing_ok=True)
            self.counters.add("refused_disk")
            log.error("refusing C-STORE: %s", exc, extra={"calling_ae": calling_ae})
            return _answer(status.STORE_OUT_OF_RESOURCES, "archive disk below free-space watermark")

        # Start writing the received bytes to disk now, while the header is parsed and checked:
        # on a disk whose flush of 1.4 MB takes milliseconds this is most of a C-STORE's time.
        # Archive.store fsyncs again before the rename (cheap once the data is on disk).
        flushing = self._in_helper(functools.partial(fsync_path, received))
        try:
            return self._archive_received(event, received, request, context, calling_ae, flushing)
        finally:
            wait_for_futures([flushing])  # a refused or duplicate file is no longer open

    def _archive_received(
        self,
        event: Event,
        received: Path,
        request: C_STORE,
        context: dict[str, str],
        calling_ae: str,
        flushing: Future[None],
    ) -> Dataset:
        try:
            header = self._read_header(received, request, str(event.context.transfer_syntax))
        except _Refusal as refusal:
            wait_for_futures([flushing])
            self.archive.quarantine(received, refusal.reason, context)
            self.counters.add("quarantined")
            return _answer(refusal.status, refusal.reason)

        if self._already_indexed(header.sop_instance_uid):
            wait_for_futures([flushing])
            received.unlink(missing_ok=True)
            self.counters.add("duplicates")
            log.info(
                "duplicate SOP instance acknowledged, first copy kept",
                extra={"calling_ae": calling_ae, "sop_instance_uid": header.sop_instance_uid},
            )
            return _answer(status.SUCCESS)

        relative = self.archive.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        is_new = self._store_and_index(received, relative, header, calling_ae)
        self.counters.add("stored" if is_new else "duplicates")
        return _answer(status.SUCCESS)

    def _received_file(self, event: Event) -> Path:
        """The file the data set was streamed to (see reactor); a data set pynetdicom kept in
        memory instead (an association outside the event-driven path) is written out first."""
        path = getattr(event.request, "_dataset_path", None)
        if isinstance(path, Path):
            return path
        target = self.archive.incoming / f"{uuid.uuid4().hex}.dcm"
        with open(target, "xb") as fh:
            fh.write(event.encoded_dataset(include_meta=True))
        return target

    def _in_helper(self, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job`` (file I/O) in a helper thread, returning once it has started.

        Waiting for the start matters: the helper then holds the GIL only until its first
        syscall, while without the wait the handler's Python code keeps the GIL and the helper
        starts only when the handler blocks (no overlap at all).
        """
        started = threading.Event()

        def run() -> Any:
            started.set()
            return job()

        future = self._durability.submit(run)
        started.wait()
        return future

    def _store_and_index(
        self, received: Path, relative: str, header: InstanceHeader, calling_ae: str
    ) -> bool:
        """Make the file durable and index it; True if the instance is new.

        The file's fsync, rename and directory fsync (I/O, in a helper thread) overlap the index
        statements (CPU, here). The transaction commits only once the file is durable, and the
        C-STORE response waits for the commit: what we acknowledge is on disk and indexed. If
        archiving fails, the transaction rolls back and the handler answers a failure.
        """
        size = received.stat().st_size
        stored = self._in_helper(functools.partial(self.archive.store, received, relative))
        try:
            with self.db.write() as session:
                is_new = record_instance(
                    session,
                    header,
                    path=relative,
                    size_bytes=size,
                    calling_ae=calling_ae,
                    now=datetime.now(UTC),
                )
                stored.result()  # raises if archiving failed: no commit
        finally:
            wait_for_futures([stored])  # never answer while the file is still being written
        return is_new

    def _already_indexed(self, sop_instance_uid: str) -> bool:
        with self.db.engine.connect() as conn:  # one Core SELECT: no ORM session per C-STORE
            path = indexed_path(conn, sop_instance_uid)
        if path is None or not self.archive.absolute(path).is_file():
            return False
        with self.db.write() as session:
            count_duplicate(session, sop_instance_uid)
        return True

    @staticmethod
    def _read_header(path: Path, request: Any, transfer_syntax: str) -> InstanceHeader:
        ds: Dataset | dict[str, Any]
        try:
            with open(path, "rb") as fp:
                # The common case without pydicom (see daemon.receive.header), else pydicom.
                plain = read_header_fields(fp.read(HEAD_BYTES), transfer_syntax)
                if plain is not None:
                    ds, pixel_offset = plain
                    fp.seek(pixel_offset)
                else:
                    fp.seek(0)
                    ds = read_partial(fp, stop_when=_at_pixel_data)
                pixel_problem = _pixel_data_problem(
                    fp, os.fstat(fp.fileno()).st_size, transfer_syntax
                )
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError) as exc:
            reason = f"cannot parse dataset: {type(exc).__name__}"
            raise _Refusal(status.STORE_CANNOT_UNDERSTAND, reason) from exc
        try:
            header = InstanceHeader.from_dataset(ds, transfer_syntax)
        except ConformanceError as exc:
            raise _Refusal(status.STORE_DATA_SET_MISMATCH, str(exc)) from exc
        except (ValueError, TypeError, KeyError) as exc:
            reason = f"cannot read header: {type(exc).__name__}"
            raise _Refusal(status.STORE_CANNOT_UNDERSTAND, reason) from exc
        # PS3.4 B.2.3: the dataset must be the instance the command announces.
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise _Refusal(status.STORE_DATA_SET_MISMATCH, "SOP Instance UID differs from command")
        if header.sop_class_uid != str(request.AffectedSOPClassUID):
            raise _Refusal(status.STORE_DATA_SET_MISMATCH, "SOP Class UID differs from command")
        if pixel_problem == _NO_PIXEL_DATA:
            # PS3.3 C.7.6.3: Pixel Data is Type 1 in every image class we accept (not in SR/PDF).
            if header.sop_class_uid in ANALYSABLE_SOP_CLASSES:
                raise _Refusal(status.STORE_DATA_SET_MISMATCH, pixel_problem)
        elif pixel_problem is not None:
            raise _Refusal(status.STORE_CANNOT_UNDERSTAND, pixel_problem)
        return header

    # -- Storage Commitment N-ACTION (PS3.4 J.3.2) -------------------------------------------
    @_guarded(status.PROCESSING_FAILURE)
    def on_n_action(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        request = cast(N_ACTION, event.request)
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return _answer(status.INVALID_OBJECT_INSTANCE, "only Storage Commitment"), None
        if request.ActionTypeID != status.COMMIT_ACTION_REQUEST:
            return _answer(status.NO_SUCH_ACTION_TYPE, "Action Type must be 1"), None
        try:
            transaction_uid, refs = commitment.parse_request(event.action_information)
        except (ValueError, AttributeError) as exc:
            return _answer(status.INVALID_ARGUMENT_VALUE, str(exc)), None
        calling_ae, peer_host = _peer(event)
        assoc = event.assoc
        job = functools.partial(
            self._send_report, assoc, calling_ae, peer_host, transaction_uid, refs
        )
        self._report_after_response(assoc, int(request.MessageID or 0), job)
        log.info(
            "storage commitment requested",
            extra={
                "calling_ae": calling_ae,
                "transaction_uid": transaction_uid,
                "instances": len(refs),
            },
        )
        return _answer(status.SUCCESS), None

    def _report_after_response(self, assoc: Any, message_id: int, job: Callable[[], None]) -> None:
        """Start ``job`` once our successful N-ACTION response is queued for the wire.

        PS3.4 J.3.3: the report follows the N-ACTION response. pynetdicom fires EVT_DIMSE_SENT
        before it queues a message's PDUs, and marks the association paused while a handler
        runs, so a report started from that event could queue its PDUs ahead of the response:
        the peer then decodes neither (seen with pynetdicom requesters). Wrapping this
        association's ``send_msg`` starts the report strictly after the response is queued.
        """
        dimse = assoc.dimse
        send_msg = dimse.send_msg

        def send_then_report(primitive: Any, context_id: int) -> None:
            send_msg(primitive, context_id)
            if (
                isinstance(primitive, N_ACTION)
                and primitive.MessageIDBeingRespondedTo == message_id
            ):
                dimse.send_msg = send_msg
                if primitive.Status == status.SUCCESS:
                    self._reports.submit(self._run_report, job)

        dimse.send_msg = send_then_report

    @staticmethod
    def _run_report(job: Callable[[], None]) -> None:
        # A pool thread's exception would sit unread in its Future: log it instead.
        try:
            job()
        except Exception:  # noqa: BLE001 - background thread boundary
            log.exception("storage commitment report failed before it could be recorded")

    def _send_report(
        self,
        assoc: Any,
        calling_ae: str,
        peer_host: str,
        transaction_uid: str,
        refs: list[commitment.Reference],
    ) -> None:
        now = datetime.now(UTC)
        with self.db.read() as session:
            result = commitment.evaluate(session, self.archive, transaction_uid, refs)
        info = commitment.build_event_information(result, self.settings.dicom.ae_title)
        try:
            error = self._deliver(assoc, calling_ae, peer_host, info, result.event_type)
        except Exception as exc:  # noqa: BLE001 - background thread: record, never lose silently
            error = f"{type(exc).__name__}: {exc}"
        delivered = error is None
        with self.db.write() as session:
            session.add(
                CommitmentRequest(
                    transaction_uid=transaction_uid,
                    calling_ae=calling_ae,
                    state=CommitmentState.REPORTED if delivered else CommitmentState.UNDELIVERABLE,
                    committed=len(result.committed),
                    failed=len(result.failed),
                    requested_at=now,
                    reported_at=datetime.now(UTC) if delivered else None,
                    last_error=error,
                )
            )
        extra = {
            "calling_ae": calling_ae,
            "transaction_uid": transaction_uid,
            "committed": len(result.committed),
            "failed": len(result.failed),
        }
        if delivered:
            log.info("storage commitment reported", extra=extra)
        else:
            log.error("storage commitment report undeliverable: %s", error, extra=extra)

    def _deliver(
        self, assoc: Any, calling_ae: str, peer_host: str, info: Dataset, event_type: int
    ) -> str | None:
        """Send the report the ways :func:`commitment.delivery_order` allows; None once delivered,
        otherwise why every way failed."""
        peer = known_ae(self.settings.dicom, calling_ae, peer_host)
        port = peer.port if peer is not None else None
        mode = peer.commitment_report if peer is not None else "auto"
        problems = []
        for way in commitment.delivery_order(mode, can_call_back=port is not None):
            if way == "same":
                timeout = self.settings.dicom.dimse_timeout
                if commitment.report_on(assoc, info, event_type, timeout):
                    return None
                problems.append("the requesting association was closed or refused the report")
            elif peer is not None and port is not None:
                dimse_timeout = self.settings.dicom.dimse_timeout
                our_ae = self.settings.dicom.ae_title
                tls = client_context(self.settings.dicom.tls) if peer.tls else None
                if commitment.report_to(
                    peer, peer_host, our_ae, info, event_type, dimse_timeout, tls
                ):
                    return None
                problems.append(f"a new association to port {port} failed or refused the report")
        if port is None:
            problems.append("no dicom.calling_aes port to call the requester back")
        return "; ".join(problems)

    def close(self, wait: bool = True) -> None:
        self._reports.shutdown(wait=wait)
        self._durability.shutdown(wait=wait)


_PIXEL_DATA = 0x7FE00010
# PS3.5 §7.5 and A.4: encapsulated Pixel Data is a run of Items ended by a Sequence Delimiter.
_ITEM, _SEQUENCE_DELIMITER, _UNDEFINED_LENGTH = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_NO_PIXEL_DATA = "Pixel Data missing or unreadable"
_TRUNCATED = "Pixel Data shorter than its encoded length"


def _at_pixel_data(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) == _PIXEL_DATA


def _pixel_data_problem(fp: BinaryIO, size: int, transfer_syntax: str) -> str | None:
    """Why the top-level Pixel Data at ``fp`` is absent or cut short, or None if it is whole.

    ``fp`` stands where header reading stopped, before (7FE0,0010). pydicom reads a truncated
    dataset, or one that turns to garbage after its header, without complaint; acknowledging
    it would let a modality delete its only good copy once we commit to it (PS3.4 J.3).
    """
    syntax = UID(transfer_syntax)
    if syntax == DeflatedExplicitVRLittleEndian:
        return None  # parsed from an inflated copy: file positions say nothing
    order = "<" if syntax.is_little_endian else ">"
    head = fp.read(8)
    if len(head) < 8 or _tag(head, order) != _PIXEL_DATA:
        return _NO_PIXEL_DATA
    if syntax.is_implicit_VR:
        length = struct.unpack(order + "L", head[4:])[0]
    else:  # OB/OW: VR, 2 reserved bytes, then a 32-bit length (PS3.5 §7.1.2)
        tail = fp.read(4)
        if len(tail) < 4:
            return _TRUNCATED
        length = struct.unpack(order + "L", tail)[0]
    if length != _UNDEFINED_LENGTH:
        return None if fp.tell() + length <= size else _TRUNCATED
    while True:  # encapsulated: always little endian
        item = fp.read(8)
        if len(item) < 8:
            return _TRUNCATED
        if _tag(item, "<") == _SEQUENCE_DELIMITER:
            return None
        length = struct.unpack("<L", item[4:])[0]
        if _tag(item, "<") != _ITEM or fp.tell() + length > size:
            return _TRUNCATED
        fp.seek(length, os.SEEK_CUR)


def _tag(raw: bytes, order: str) -> int:
    group, element = struct.unpack(order + "HH", raw[:4])
    return int(group) << 16 | int(element)


class _Refusal(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.status = code
        self.reason = reason
