"""Storage SCU: one association to one destination, the archived files sent as they are.

Pure parts (which contexts to propose, how a response is judged) are functions of their inputs;
:func:`open_association` and :func:`send` are the thin network shell around pynetdicom.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from daemon.config import Destination, DestinationTLS, DispatchSettings
from daemon.dispatch.outbox import ClaimedItem, Delivery

log = logging.getLogger(__name__)

#: PS3.7 Annex C.1: Success.
SUCCESS: Final = 0x0000
#: PS3.4 Annex B.2.3, Table B.2-1: the Storage SCP stored the object but tells us something.
#: Each still means "stored", so the object counts as delivered.
ACCEPTED_WARNINGS: Final[dict[int, str]] = {
    0xB000: "Coercion of Data Elements",
    0xB007: "Data Set does not match SOP Class",
    0xB006: "Elements Discarded",
}
#: PS3.5 §10.1: every AE supports Implicit VR Little Endian; Explicit VR Little Endian is the
#: other uncompressed syntax nearly every PACS takes. Proposed for each SOP class as a fallback.
FALLBACK_SYNTAXES: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: PS3.8 §9.3.2.2: at most 128 presentation contexts (odd IDs 1-255) per association.
MAX_CONTEXTS: Final = 128

# Send archived files straight from disk (no decode and re-encode): the bytes that reach the
# PACS are the bytes we archived. pynetdicom's switch is process-wide; usfmd sends C-STOREs only
# from here.
_config.STORE_SEND_CHUNKED_DATASET = True


class AssociationFailed(Exception):
    """No association: refused connection, timeout, A-ASSOCIATE-RJ, abort, TLS failure."""


def judge(status: int | None) -> tuple[bool, str | None]:
    """Whether a C-STORE response means "stored" (PS3.4 B.2.3), and the error if it does not.

    Success and the three Table B.2-1 warnings are accepted; any failure, any status the table
    does not define for C-STORE, and no response at all are not.
    """
    if status is None:
        return False, "no C-STORE response (timeout, abort or invalid response)"
    if status == SUCCESS or status in ACCEPTED_WARNINGS:
        return True, None
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", "not a C-STORE status"))
    return False, f"status 0x{status:04X} ({meaning[0]}: {meaning[1]})"


def proposed_contexts(items: Iterable[ClaimedItem]) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax), plus one uncompressed fallback per class.

    Separate contexts, not one with several syntaxes: the acceptor picks one syntax per context
    (PS3.8 §9.3.3.2), and the stored syntax is what we want whenever it is taken.
    """
    pairs: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for item in items:
        pairs[(item.sop_class_uid, item.transfer_syntax_uid)] = None
        classes[item.sop_class_uid] = None
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    contexts += [build_context(sop_class, list(FALLBACK_SYNTAXES)) for sop_class in classes]
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS} allowed "
            "(PS3.8 §9.3.2.2): lower dispatch.batch_size"
        )
    return contexts


def client_tls_context(tls: DestinationTLS) -> ssl.SSLContext:
    """Client-side context per PS3.15 Annex B.9 (BCP 195): TLS 1.2+, the server verified."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(tls.ca_certificates) if tls.ca_certificates is not None else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def _connected(opened: threading.Event) -> Callable[[Event], None]:
    def on_open(event: Event) -> None:
        opened.set()
        # Without it every C-STORE request waits for a delayed ACK (~40 ms, DESIGN.md §7).
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    return on_open


def _why_not(assoc: Association, connected: bool, where: str, tls: bool) -> str:
    primitive = assoc.acceptor.primitive
    if assoc.is_rejected and primitive is not None:
        # PS3.8 Table 9-21: result, source, reason/diagnostic.
        return (
            f"association rejected by {where} (result {primitive.result}, source "
            f"{primitive.result_source}, reason {primitive.diagnostic})"
        )
    if not connected:
        return f"no connection to {where} (refused, unreachable, timed out or TLS failed)"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association in which no context was accepted (PS3.8 §9.3.3.2).
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return f"{where} accepted no presentation context for SOP Class {', '.join(classes)}"
    # TLS 1.3: a server that refuses our client certificate says so after the handshake.
    hint = " (TLS: the peer may have refused our certificate)" if tls else ""
    return f"association with {where} aborted or timed out during negotiation{hint}"


def open_association(
    destination: Destination,
    calling_ae: str,
    contexts: list[PresentationContext],
    dispatch: DispatchSettings,
) -> Association:
    """Associate with ``destination``; raise :class:`AssociationFailed` saying why not."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = dispatch.connect_timeout
    ae.acse_timeout = dispatch.acse_timeout
    ae.dimse_timeout = dispatch.dimse_timeout
    ae.network_timeout = dispatch.network_timeout
    tls_args = None
    if destination.tls.enabled:
        server_name = destination.tls.server_name or destination.host
        tls_args = (client_tls_context(destination.tls), server_name)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    opened = threading.Event()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, _connected(opened))],
        )
    except (OSError, ssl.SSLError) as exc:  # name resolution, socket creation
        raise AssociationFailed(f"cannot connect to {where}: {type(exc).__name__}: {exc}") from exc
    if not assoc.is_established:
        raise AssociationFailed(_why_not(assoc, opened.is_set(), where, tls_args is not None))
    return assoc


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one object goes over the association: its file as stored, or converted."""

    path: Path
    convert_to: UID | None


def _plan(assoc: Association, item: ClaimedItem, archive_root: Path) -> _Plan | str:
    path = archive_root / item.path
    accepted = [
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class_uid and cx.as_scu
    ]
    syntaxes = [UID(cx.transfer_syntax[0]) for cx in accepted]
    if UID(item.transfer_syntax_uid) in syntaxes:
        return _Plan(path, None)
    for fallback in FALLBACK_SYNTAXES:
        if fallback in syntaxes:
            return _Plan(path, fallback)
    return (
        f"no presentation context accepted for SOP Class {item.sop_class_uid} "
        f"in {item.transfer_syntax_uid} or an uncompressed syntax"
    )


def _converted(path: Path, syntax: UID) -> Dataset:
    """The archived object in an uncompressed syntax the peer accepted (same SOP Instance)."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()  # decoded pixels; PS3.5 §8: a syntax change keeps the SOP Instance UID
    ds.file_meta.TransferSyntaxUID = syntax
    # pydicom re-encodes every element on write; tell pynetdicom the dataset now is in `syntax`
    # (it refuses a dataset whose recorded encoding differs from its file meta).
    ds.set_original_encoding(
        syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set
    )
    return ds


def _mark_reactor_running(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0's ``send_*()`` handshake with its reactor thread.

    ``send_c_store`` pauses the reactor (it waits for ``_is_paused``), sends, takes the response
    and resumes it, leaving ``_is_paused`` True until the reactor thread wakes up. A next send
    that comes before that wake-up sees the stale True, sends while the reactor is about to run
    an iteration, and the reactor can take our response off the queue ("Received unexpected
    C-STORE service message"; the same symptom with C-FIND: pynetdicom issue #875): the send
    then waits out the DIMSE timeout. Seen here under CPU load: 2 of ~2,100 back-to-back
    C-STOREs to storescp, and up to 44 of 200 with a busy thread in the process; none in 7,400
    with this. Marking the reactor running makes the next send wait until it has really paused
    again. ``kill()`` sets the flag itself on a dead association.
    """
    if assoc.is_established and assoc.is_alive():
        assoc._is_paused = False


def send(assoc: Association, item: ClaimedItem, archive_root: Path, message_id: int) -> Delivery:
    """C-STORE one archived object and judge the response (never raises for peer behaviour)."""
    plan = _plan(assoc, item, archive_root)
    if isinstance(plan, str):
        return Delivery(item, False, None, plan)
    if not plan.path.is_file():
        return Delivery(item, False, None, f"archived file {item.path} is missing")
    try:
        payload: Path | Dataset = (
            plan.path if plan.convert_to is None else _converted(plan.path, plan.convert_to)
        )
        response = assoc.send_c_store(payload, msg_id=message_id)
        _mark_reactor_running(assoc)
    except (OSError, RuntimeError) as exc:  # reading the file; the association ended
        return Delivery(item, False, None, f"{type(exc).__name__}: {exc}"[:500])
    except (ValueError, AttributeError) as exc:
        # Encoding errors may quote element values (patient data): keep the type only.
        return Delivery(item, False, None, f"cannot encode the object ({type(exc).__name__})")
    code = response.get("Status")
    status = int(code) if code is not None else None
    accepted, error = judge(status)
    if not accepted and "ErrorComment" in response:
        # The peer's Error Comment may quote patient data: DEBUG only, never stored.
        log.debug("destination error comment", extra={"comment": str(response.ErrorComment)})
    return Delivery(item, accepted, status, error)
