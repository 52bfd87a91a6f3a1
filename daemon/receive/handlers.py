"""pynetdicom event handlers: C-ECHO, C-STORE and the Storage Commitment N-ACTION.

Everything a handler needs (archive, database, settings) is held by :class:`Receiver` and passed
in when the server binds the handlers. A handler never raises into pynetdicom: every failure is
logged (without patient data) and answered with a named status, and the association stays up.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.dimse_primitives import C_STORE, N_ACTION
from pynetdicom.events import Event

from daemon.config import Settings
from daemon.db.engine import Database
from daemon.db.index import InstanceHeader, count_duplicate, find_instance, record_instance
from daemon.db.models import CommitmentRequest, CommitmentState
from daemon.errors import ConformanceError, DiskFullError
from daemon.receive import commitment, status
from daemon.receive.archive import Archive
from daemon.receive.policy import known_ae
from daemon.receive.sop_classes import STORAGE_COMMITMENT_PUSH

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


class Receiver:
    """The state the DICOM handlers share; one per running server."""

    def __init__(self, settings: Settings, archive: Archive, db: Database) -> None:
        self.settings = settings
        self.archive = archive
        self.db = db
        self.counters = ReceiveCounters()
        # Reports are sent after the N-ACTION response has gone out (see on_dimse_sent).
        self._reports = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commitment")
        self._pending: dict[tuple[int, int], Callable[[], None]] = {}
        self._pending_lock = threading.Lock()

    # -- C-ECHO (PS3.7 §9.1.5, Verification Service Class PS3.4 Annex A) ----------------------
    def on_c_echo(self, event: Event) -> int:
        return status.SUCCESS

    # -- C-STORE (PS3.4 Annex B) -------------------------------------------------------------
    @_guarded(status.PROCESSING_FAILURE)
    def on_c_store(self, event: Event) -> Dataset:
        received = Path(event.dataset_path)
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

        try:
            header = self._read_header(received, request, str(event.context.transfer_syntax))
        except _Refusal as refusal:
            self.archive.quarantine(received, refusal.reason, context)
            self.counters.add("quarantined")
            return _answer(refusal.status, refusal.reason)

        if self._already_indexed(header.sop_instance_uid):
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
        size = self.archive.store(received, relative)
        with self.db.write() as session:
            is_new = record_instance(
                session,
                header,
                path=relative,
                size_bytes=size,
                calling_ae=calling_ae,
                now=datetime.now(UTC),
            )
        self.counters.add("stored" if is_new else "duplicates")
        return _answer(status.SUCCESS)

    def _already_indexed(self, sop_instance_uid: str) -> bool:
        with self.db.read() as session:
            existing = find_instance(session, sop_instance_uid)
            if existing is None or not self.archive.absolute(existing.path).is_file():
                return False
        with self.db.write() as session:
            count_duplicate(session, sop_instance_uid)
        return True

    @staticmethod
    def _read_header(path: Path, request: Any, transfer_syntax: str) -> InstanceHeader:
        try:
            ds = dcmread(path, stop_before_pixels=True)
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
        key = (id(assoc), int(request.MessageID or 0))
        job = functools.partial(
            self._send_report, assoc, calling_ae, peer_host, transaction_uid, refs
        )
        with self._pending_lock:
            self._pending[key] = job
        log.info(
            "storage commitment requested",
            extra={
                "calling_ae": calling_ae,
                "transaction_uid": transaction_uid,
                "instances": len(refs),
            },
        )
        return _answer(status.SUCCESS), None

    def on_dimse_sent(self, event: Event) -> None:
        """Start a commitment report only once its N-ACTION response is on the wire."""
        message = event.message
        if type(message).__name__ != "N_ACTION_RSP":
            return
        key = (id(event.assoc), int(message.command_set.MessageIDBeingRespondedTo))
        with self._pending_lock:
            job = self._pending.pop(key, None)
        if job is not None:
            self._reports.submit(job)

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
        peer = known_ae(self.settings.dicom, calling_ae, peer_host)
        mode = peer.commitment_report if peer else "auto"
        delivered, error = False, None
        try:
            if mode in ("auto", "same"):
                delivered = commitment.report_on(assoc, info, result.event_type)
            if not delivered and mode in ("auto", "new") and peer is not None:
                delivered = commitment.report_to(
                    peer,
                    peer_host,
                    self.settings.dicom.ae_title,
                    info,
                    result.event_type,
                    timeout=self.settings.dicom.dimse_timeout,
                )
            if not delivered:
                error = "requester closed the association and has no dicom.calling_aes port"
        except Exception as exc:  # noqa: BLE001 - background thread: record, never lose silently
            error = f"{type(exc).__name__}: {exc}"
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

    def close(self, wait: bool = True) -> None:
        self._reports.shutdown(wait=wait)


class _Refusal(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.status = code
        self.reason = reason
