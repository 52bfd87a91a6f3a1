"""Storage Commitment Push Model SCP (PS3.4 Annex J): confirm what is durably archived.

A modality asks with N-ACTION (Action Type 1) which instances we hold; we answer the N-ACTION at
once and then send the result as an N-EVENT-REPORT, on the same association if the requester keeps
it open, otherwise on a new association that we open to the requester (PS3.4 J.3.3, with SCP/SCU
role selection). An instance is committed only if its row exists — rows are written after the
file is fsynced — and its file is still in the archive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.config import KnownAE
from daemon.db.models import Instance
from daemon.receive import status
from daemon.receive.archive import Archive
from daemon.receive.sop_classes import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

log = logging.getLogger(__name__)


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


def _succeeded(rsp_status: Dataset | None) -> bool:
    return rsp_status is not None and rsp_status.get("Status") == status.SUCCESS


def report_on(assoc: Association, event_info: Dataset, event_type: int) -> bool:
    """Send the report on an open association; True when the peer answered Success."""
    if not assoc.is_established:
        return False
    rsp_status, _ = assoc.send_n_event_report(
        event_info, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
    )
    return _succeeded(rsp_status)


def report_to(
    peer: KnownAE,
    host: str,
    our_ae_title: str,
    event_info: Dataset,
    event_type: int,
    timeout: float,
) -> bool:
    """Open an association to the requester, taking the SCP role (PS3.4 J.3.3), and report."""
    if peer.port is None:
        return False
    ae = AE(ae_title=our_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate(peer.host or host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
    if not assoc.is_established:
        return False
    try:
        return report_on(assoc, event_info, event_type)
    finally:
        if assoc.is_established:
            assoc.release()
