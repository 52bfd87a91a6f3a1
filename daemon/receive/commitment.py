"""Storage Commitment Push Model SCP (PS3.4 Annex J): confirm what is durably archived.

A modality asks with N-ACTION (Action Type 1) which instances we hold; we answer the N-ACTION at
once and then send the result as an N-EVENT-REPORT: on a new association that we open to the
requester (PS3.4 J.3.3, with SCP/SCU role selection) when we know where it listens, otherwise on
the requesting association while it is still open (see :func:`delivery_order`). An instance is
committed only if its row exists — rows are written after the file is fsynced — and its file is
still in the archive.
"""

from __future__ import annotations

import logging
import queue
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Literal, cast

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_RELEASE
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.config import KnownAE
from daemon.db.models import Instance
from daemon.receive import status
from daemon.receive.archive import Archive
from daemon.receive.sop_classes import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

log = logging.getLogger(__name__)

#: The two ways a report can travel: on the requesting association, or on a new one we open.
Way = Literal["same", "new"]


@dataclass(frozen=True, slots=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class CommitmentResult:
    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...] = field(default=())

    @property
    def event_type(self) -> int:
        return (
            status.COMMIT_EVENT_FAILURES_EXIST if self.failed else status.COMMIT_EVENT_ALL_SUCCESS
        )


def parse_request(action_information: Dataset | None) -> tuple[str, list[Reference]]:
    """Read the N-ACTION dataset (PS3.4 Table J.3-1); raise ``ValueError`` naming what is wrong."""
    if action_information is None:
        raise ValueError("N-ACTION carries no Action Information dataset")
    transaction_uid = str(action_information.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise ValueError("Transaction UID (0008,1195) is missing")
    items = action_information.get("ReferencedSOPSequence")
    if not items:
        raise ValueError("Referenced SOP Sequence (0008,1199) is missing or empty")
    refs = []
    for item in items:
        class_uid = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        instance_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not class_uid or not instance_uid:
            raise ValueError("a Referenced SOP Sequence item lacks its SOP Class or Instance UID")
        refs.append(Reference(class_uid, instance_uid))
    return transaction_uid, refs


def evaluate(
    session: Session, archive: Archive, transaction_uid: str, refs: Sequence[Reference]
) -> CommitmentResult:
    """Decide, per referenced instance, whether we hold it durably."""
    uids = [ref.sop_instance_uid for ref in refs]
    rows = {
        row.sop_instance_uid: row
        for row in session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids)))
    }
    committed: list[Reference] = []
    failed: list[tuple[Reference, int]] = []
    for ref in refs:
        row = rows.get(ref.sop_instance_uid)
        if row is None or not archive.absolute(row.path).is_file():
            failed.append((ref, status.COMMIT_NO_SUCH_OBJECT_INSTANCE))
        elif row.sop_class_uid != ref.sop_class_uid:
            failed.append((ref, status.COMMIT_CLASS_INSTANCE_CONFLICT))
        else:
            committed.append(ref)
    return CommitmentResult(transaction_uid, tuple(committed), tuple(failed))


def build_event_information(result: CommitmentResult, retrieve_ae: str) -> Dataset:
    """The N-EVENT-REPORT Event Information (PS3.4 Table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = result.transaction_uid
    if result.committed:
        ds.RetrieveAETitle = retrieve_ae
        items = []
        for ref in result.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            items.append(item)
        ds.ReferencedSOPSequence = DicomSequence(items)
    if result.failed:
        failed_items = []
        for ref, reason in result.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            item.FailureReason = reason
            failed_items.append(item)
        ds.FailedSOPSequence = DicomSequence(failed_items)
    return ds


def delivery_order(mode: Literal["auto", "same", "new"], can_call_back: bool) -> tuple[Way, ...]:
    """Which associations to try for the report, in order.

    PS3.4 J.3.3.1.2-3: every SCU must accept the report on a different association, whereas one
    sent on the requesting association "may fail because the SCU is free to release at any time".
    The race is real: requesters such as Orthanc release right after the N-ACTION response and
    the report crosses their A-RELEASE-RQ; Orthanc (dcmtk) then drops the connection, and a
    pynetdicom requester ignores the report (see :func:`report_on`). So ``auto`` calls back
    whenever the requester has a configured port, keeping the requesting association as a
    fallback, and as the only way when there is no port.
    """
    if mode == "same":
        return ("same",)
    if mode == "new":
        return ("new",)
    return ("new", "same") if can_call_back else ("same",)


def _succeeded(rsp_status: Dataset | None) -> bool:
    return rsp_status is not None and rsp_status.get("Status") == status.SUCCESS


#: Message ID of our N-EVENT-REPORT on the requesting association (the only request we invoke).
_REPORT_MESSAGE_ID = 1


def _release_requested(assoc: Association) -> bool:
    primitive = assoc.dul.peek_next_pdu()
    return isinstance(primitive, A_RELEASE) and primitive.result is None


def report_on(assoc: Association, event_info: Dataset, event_type: int, timeout: float) -> bool:
    """Send the report on the requesting association; True when the peer answered Success.

    pynetdicom's ``send_n_event_report`` holds the association's reactor until the response or
    the DIMSE timeout. A requester is "free to release at any time" (PS3.4 J.3.3.1.2, Note 1):
    if its A-RELEASE-RQ crosses our report it can no longer answer (no P-DATA in Sta7, PS3.8
    Table 9-10), and with the reactor held nobody answers its release either, so it ends in an
    abort after its own timeout. Here the wait also watches for that A-RELEASE-RQ and, seeing it,
    gives up at once and lets the reactor answer the release (this reaches into pynetdicom 3.0's
    reactor handshake exactly as its own ``send_*()`` methods do).
    """
    context = next(
        (cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH),
        None,
    )
    if not assoc.is_established or context is None or _release_requested(assoc):
        return False
    syntax = context.transfer_syntax[0]
    request = N_EVENT_REPORT()
    request.MessageID = _REPORT_MESSAGE_ID
    request.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
    request.AffectedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
    request.EventTypeID = event_type
    encoded = encode(event_info, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise ValueError("cannot encode the N-EVENT-REPORT Event Information")
    request.EventInformation = BytesIO(encoded)

    deadline = time.monotonic() + timeout
    assoc._reactor_checkpoint.clear()  # the reactor must not take our response off the queue
    try:
        while not assoc._is_paused:
            if not assoc.is_established or time.monotonic() > deadline:
                return False
            time.sleep(0.0001)
        assoc.dimse.send_msg(request, cast(int, context.context_id))
        while time.monotonic() < deadline:
            try:
                _, response = assoc.dimse.msg_queue.get(timeout=0.05)
            except queue.Empty:
                response = None
            if isinstance(response, N_EVENT_REPORT):
                return (
                    response.MessageIDBeingRespondedTo == _REPORT_MESSAGE_ID
                    and response.Status == status.SUCCESS
                )
            if _release_requested(assoc) or assoc.acse.is_aborted() or not assoc.dul.is_alive():
                return False
        assoc.abort()  # DIMSE timeout: abort, as pynetdicom's own send_*() methods do
        return False
    finally:
        assoc._reactor_checkpoint.set()


def report_to(
    peer: KnownAE,
    host: str,
    our_ae_title: str,
    event_info: Dataset,
    event_type: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Open an association to the requester, taking the SCP role (PS3.4 J.3.3), and report.

    ``tls`` is the client context to use when the peer is configured for TLS.
    """
    if peer.port is None:
        return False
    ae = AE(ae_title=our_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    address = peer.host or host
    assoc = ae.associate(
        address,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=[role],
        tls_args=(tls, address) if tls is not None else None,
    )
    if not assoc.is_established:
        return False
    try:
        rsp_status, _ = assoc.send_n_event_report(
            event_info, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        return _succeeded(rsp_status)
    finally:
        if assoc.is_established:
            assoc.release()
