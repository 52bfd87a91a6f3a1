"""Storage Commitment Push Model SCP (PS3.4 Annex J) against pynetdicom and a real Orthanc.

A requester sends N-ACTION (Action Type 1) naming instances; usfmd answers at once and reports
with N-EVENT-REPORT (Event Type 1: all committed, 2: failures exist): on a new association to
the requester's configured port, taking the SCP role (PS3.4 J.3.3), or, for a requester without
a port (or ``commitment_report = "same"``), on the requesting association while it is open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from sqlalchemy import select

from daemon.db.models import CommitmentRequest, CommitmentState
from daemon.receive import status
from daemon.receive.sop_classes import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

from helpers import dcmtk, free_port, run_peer, ultrasound_files, wait_for
from orthanc_peer import Orthanc, run_orthanc

pytestmark = pytest.mark.integration

SCU_AE = "MODALITY"


@dataclass(frozen=True)
class Ref:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Report:
    on_requestor: bool  # True: on the association that carried the N-ACTION
    assoc: Association
    event_type: int
    info: Dataset


@dataclass
class Reports:
    """N-EVENT-REPORTs the test SCU received, on any association."""

    items: list[Report] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self, event: Event) -> tuple[int, None]:
        with self.lock:
            self.items.append(
                Report(
                    event.assoc.is_requestor,
                    event.assoc,
                    int(event.request.EventTypeID),
                    event.event_information,
                )
            )
        return status.SUCCESS, None

    def wait_one(self, timeout: float = 15) -> Report:
        wait_for(lambda: self.items, timeout, "the storage commitment N-EVENT-REPORT")
        assert len(self.items) == 1, f"expected one report, got {len(self.items)}"
        return self.items[0]


def _store(port: int, files: list[Path]) -> list[Ref]:
    r = run_peer(
        [dcmtk("dcmsend"), "-aet", SCU_AE, "-aec", "USFMD", "127.0.0.1", str(port)]
        + [str(f) for f in files]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    refs = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        refs.append(Ref(str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return refs


def _action_information(transaction_uid: str, refs: list[Ref]) -> Dataset:
    """N-ACTION Action Information (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _scu() -> AE:
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    return ae


def _associate(port: int, reports: Reports | None) -> Association:
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler)] if reports is not None else []
    assoc = _scu().associate("127.0.0.1", port, ae_title="USFMD", evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def _request(assoc: Association, transaction_uid: str, refs: list[Ref]) -> int:
    rsp, _ = assoc.send_n_action(
        _action_information(transaction_uid, refs),
        status.COMMIT_ACTION_REQUEST,
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_INSTANCE,
    )
    return int(rsp.Status)


def _listen(port: int, reports: Reports) -> Any:
    """The requester's own SCP, where a report on a new association arrives (PS3.4 J.3.3)."""
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    # usfmd proposes the SCP role for itself (SCP/SCU Role Selection, PS3.7 D.3.3.4).
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)]
    )


def _uids(info: Dataset, keyword: str) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in info.get(keyword, [])}


def _row(daemon: Any, transaction_uid: str) -> CommitmentRequest | None:
    with daemon.db.read() as session:
        row = session.scalars(
            select(CommitmentRequest).where(CommitmentRequest.transaction_uid == transaction_uid)
        ).one_or_none()
        if row is not None:
            session.expunge(row)
        return row


def _reported_row(daemon: Any, transaction_uid: str) -> CommitmentRequest:
    row = wait_for(lambda: _row(daemon, transaction_uid), 10, "the commitment_requests row")
    assert isinstance(row, CommitmentRequest)
    return row


# -- pynetdicom as the requester --------------------------------------------------------------


def test_report_on_same_association_all_committed(start_daemon, db_url):
    d = start_daemon(database={"url": db_url})
    port = d.server.port
    refs = _store(port, list(ultrasound_files()[:2]))
    reports = Reports()
    transaction_uid = generate_uid()

    assoc = _associate(port, reports)
    try:
        assert _request(assoc, transaction_uid, refs) == status.SUCCESS
        report = reports.wait_one()
    finally:
        assoc.release()

    assert report.on_requestor and report.assoc is assoc
    assert report.event_type == status.COMMIT_EVENT_ALL_SUCCESS
    assert report.info.TransactionUID == transaction_uid
    assert report.info.RetrieveAETitle == "USFMD"
    assert _uids(report.info, "ReferencedSOPSequence") == {r.sop_instance_uid for r in refs}
    assert "FailedSOPSequence" not in report.info

    row = _reported_row(d, transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.REPORTED, 2, 0)
    assert row.calling_ae == SCU_AE and row.reported_at is not None and row.last_error is None


def test_report_lists_unknown_and_conflicting_instances_as_failed(start_daemon, db_url):
    d = start_daemon(database={"url": db_url})
    port = d.server.port
    (stored,) = _store(port, [ultrasound_files()[0]])
    unknown = Ref(stored.sop_class_uid, generate_uid())
    wrong_class = Ref("1.2.840.10008.5.1.4.1.1.7", stored.sop_instance_uid)
    reports = Reports()
    transaction_uid = generate_uid()

    assoc = _associate(port, reports)
    try:
        assert _request(assoc, transaction_uid, [stored, unknown, wrong_class]) == status.SUCCESS
        report = reports.wait_one()
    finally:
        assoc.release()

    assert report.event_type == status.COMMIT_EVENT_FAILURES_EXIST
    assert _uids(report.info, "ReferencedSOPSequence") == {stored.sop_instance_uid}
    # PS3.4 J.3.3.1.2: a Failure Reason (0008,1197) for each failed instance.
    reasons = {
        (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)): item.FailureReason
        for item in report.info.FailedSOPSequence
    }
    assert reasons == {
        (unknown.sop_class_uid, unknown.sop_instance_uid): 0x0112,
        (wrong_class.sop_class_uid, wrong_class.sop_instance_uid): 0x0119,
    }
    row = _reported_row(d, transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.REPORTED, 1, 2)


def test_report_on_new_association_when_requester_releases(start_daemon, db_url):
    """The requester releases right after the N-ACTION response and waits on its own port.

    It would still answer a report on the requesting association (the handler is bound there
    too), so the report only arrives on a new association if usfmd leaves the releasing
    association alone instead of racing the requester's A-RELEASE-RQ.
    """
    listen_port = free_port()
    d = start_daemon(
        database={"url": db_url},
        dicom={"calling_aes": [{"ae_title": SCU_AE, "port": listen_port}]},
    )
    port = d.server.port
    refs = _store(port, list(ultrasound_files()[:2]))
    reports = Reports()
    server = _listen(listen_port, reports)
    transaction_uid = generate_uid()
    try:
        assoc = _associate(port, reports)
        assert _request(assoc, transaction_uid, refs) == status.SUCCESS
        assoc.release()
        assert assoc.is_released
        report = reports.wait_one()
    finally:
        server.shutdown()

    assert not report.on_requestor, "report was sent on the association the requester released"
    assert report.event_type == status.COMMIT_EVENT_ALL_SUCCESS
    assert report.info.TransactionUID == transaction_uid
    assert _uids(report.info, "ReferencedSOPSequence") == {r.sop_instance_uid for r in refs}
    row = _reported_row(d, transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.REPORTED, 2, 0)


@pytest.mark.parametrize(
    ("mode", "listening", "on_requestor"),
    [
        ("auto", True, False),  # a port is configured: call back, as every SCU must accept
        ("new", True, False),
        ("same", True, True),
        ("auto", False, True),  # nobody answers on the port: fall back to the open association
    ],
)
def test_delivery_while_requester_waits(start_daemon, mode, listening, on_requestor):
    listen_port = free_port()
    d = start_daemon(
        dicom={
            "calling_aes": [{"ae_title": SCU_AE, "port": listen_port, "commitment_report": mode}]
        }
    )
    port = d.server.port
    refs = _store(port, [ultrasound_files()[0]])
    reports = Reports()
    server = _listen(listen_port, reports) if listening else None
    transaction_uid = generate_uid()
    try:
        assoc = _associate(port, reports)
        try:
            assert _request(assoc, transaction_uid, refs) == status.SUCCESS
            report = reports.wait_one()
            assert assoc.is_established
        finally:
            assoc.release()
    finally:
        if server is not None:
            server.shutdown()
    assert report.on_requestor is on_requestor
    assert report.event_type == status.COMMIT_EVENT_ALL_SUCCESS
    row = _reported_row(d, transaction_uid)
    assert row.state == CommitmentState.REPORTED and row.last_error is None


def test_report_undeliverable_is_recorded(start_daemon):
    """Requester gone and no port to call back: the row says so instead of losing it silently."""
    d = start_daemon()
    port = d.server.port
    refs = _store(port, [ultrasound_files()[0]])
    transaction_uid = generate_uid()
    assoc = _associate(port, reports=None)
    assert _request(assoc, transaction_uid, refs) == status.SUCCESS
    assoc.release()

    row = _reported_row(d, transaction_uid)
    assert row.state == CommitmentState.UNDELIVERABLE and row.reported_at is None
    assert row.last_error and "port" in row.last_error


# The scripted requester's own DUL thread then refuses to send the report's response in Sta7
# (InvalidEventError, as PS3.8 Table 9-10 says it must): that is the requester, not usfmd.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_release_crossing_the_report_is_answered_at_once(start_daemon, caplog):
    """The requester asks to release while our report is on the wire (PS3.4 J.3.3.1.2 Note 1).

    A scripted requester sends A-RELEASE-RQ from its report handler instead of answering, as
    a requester that released right after the N-ACTION response would. usfmd must stop waiting
    for the report's response and answer the release, not hold it until the DIMSE timeout and
    the requester's abort.
    """
    caplog.set_level(logging.INFO, logger="pynetdicom")
    d = start_daemon(dicom={"dimse_timeout": 60})
    port = d.server.port
    refs = _store(port, [ultrasound_files()[0]])
    transaction_uid = generate_uid()
    released = threading.Event()

    def release_instead_of_answering(event: Event) -> tuple[int, None]:
        event.assoc.acse.send_release(is_response=False)  # A-RELEASE-RQ: now in Sta7
        released.set()
        return status.SUCCESS, None  # cannot go out any more: no P-DATA in Sta7

    assoc = _scu().associate(
        "127.0.0.1",
        port,
        ae_title="USFMD",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, release_instead_of_answering)],
    )
    assert assoc.is_established
    try:
        assert _request(assoc, transaction_uid, refs) == status.SUCCESS
        wait_for(released.is_set, 10, "the report to reach the requester")
        row = wait_for(lambda: _row(d, transaction_uid), 5, "the report attempt to end")
        wait_for(lambda: d.server.active_associations() == 0, 5, "usfmd to answer the release")
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")]
    finally:
        if assoc.is_alive():  # the scripted requester never finishes its own release
            assoc.abort()
    assert isinstance(row, CommitmentRequest)
    assert row.state == CommitmentState.UNDELIVERABLE and row.committed == 1
    assert messages.count("Association Released") == 2  # the C-STORE one, then this one
    assert not [m for m in messages if "abort" in m.lower() and "Association" in m], messages


@pytest.mark.parametrize(
    ("action_type", "information", "expected"),
    [
        (2, "valid", status.NO_SUCH_ACTION_TYPE),
        (1, "no transaction", status.INVALID_ARGUMENT_VALUE),
        (1, "no references", status.INVALID_ARGUMENT_VALUE),
    ],
)
def test_malformed_n_action_refused(start_daemon, action_type, information, expected):
    d = start_daemon()
    ref = Ref("1.2.840.10008.5.1.4.1.1.6.1", generate_uid())
    ds = _action_information(generate_uid(), [ref])
    if information == "no transaction":
        del ds.TransactionUID
    elif information == "no references":
        del ds.ReferencedSOPSequence
    assoc = _associate(d.server.port, Reports())
    try:
        rsp, _ = assoc.send_n_action(
            ds, action_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assert int(rsp.Status) == expected
        assert assoc.is_established  # a refused request does not cost the association
    finally:
        assoc.release()


# -- Orthanc as the requester -----------------------------------------------------------------


@pytest.fixture
def orthanc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc 1.10 (DESIGN.md §7) knowing usfmd as modality ``usfmd``; killed at teardown.

    Indirect parameters are merged into that modality's entry.
    """
    modality = {"Port": free_port(), **getattr(request, "param", {})}
    with run_orthanc(tmp_path / "orthanc", usfmd=modality, verbose=True) as peer:
        yield peer


def test_orthanc_storage_commitment(start_daemon, orthanc, db_url, caplog):
    caplog.set_level(logging.INFO, logger="pynetdicom")
    d = start_daemon(
        database={"url": db_url},
        dicom={
            "port": orthanc.usfmd_port,
            "calling_aes": [{"ae_title": "ORTHANC", "port": orthanc.dicom_port}],
        },
    )
    files = list(ultrasound_files()[:2])
    orthanc_ids = [orthanc.rest("POST", "/instances", raw=f.read_bytes())["ID"] for f in files]
    # Orthanc sends them to usfmd (C-STORE from AE ORTHANC).
    orthanc.rest("POST", "/modalities/usfmd/store", orthanc_ids)
    wait_for(lambda: d.receiver.counters.stored == 2, 15, "usfmd to archive both instances")

    refs = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        refs.append({"SOPClassUID": str(ds.SOPClassUID), "SOPInstanceUID": str(ds.SOPInstanceUID)})

    def commit(instances: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        answer = orthanc.rest(
            "POST", "/modalities/usfmd/storage-commitment", {"DicomInstances": instances}
        )
        transaction_uid = answer["ID"]

        def settled() -> dict[str, Any] | None:
            report = orthanc.rest("GET", f"/storage-commitment/{transaction_uid}")
            return None if report["Status"] == "Pending" else report

        report = wait_for(settled, 15, "Orthanc to receive the commitment report")
        assert isinstance(report, dict)
        return transaction_uid, report

    transaction_uid, report = commit(refs)
    assert report["Status"] == "Success", report
    assert {i["SOPInstanceUID"] for i in report["Success"]} == {r["SOPInstanceUID"] for r in refs}
    assert report["Failures"] == []
    row = _reported_row(d, transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.REPORTED, 2, 0)
    assert row.calling_ae == "ORTHANC"

    unknown = {"SOPClassUID": refs[0]["SOPClassUID"], "SOPInstanceUID": generate_uid()}
    transaction_uid, report = commit([refs[0], unknown])
    assert report["Status"] == "Failure", report
    assert [i["SOPInstanceUID"] for i in report["Success"]] == [refs[0]["SOPInstanceUID"]]
    assert [(i["SOPInstanceUID"], i["FailureReason"]) for i in report["Failures"]] == [
        (unknown["SOPInstanceUID"], 0x0112)
    ]
    row = _reported_row(d, transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.REPORTED, 1, 1)

    # Orthanc releases right after the N-ACTION response and takes the report on a new
    # association (its DICOM port): the requesting association must end in a clean release.
    aborted = [r.getMessage() for r in caplog.records if "abort" in r.getMessage().lower()]
    assert aborted == [], aborted


@pytest.mark.parametrize("orthanc", [{"AllowStorageCommitment": False}], indirect=True)
def test_orthanc_refusing_reports_leaves_request_undeliverable(start_daemon, orthanc):
    """Orthanc takes the report only from a modality allowed storage commitment (the default).

    With the permission off it refuses the N-EVENT-REPORT; usfmd records why instead of
    claiming delivery, and Orthanc's side stays Pending.
    """
    d = start_daemon(
        dicom={
            "port": orthanc.usfmd_port,
            "calling_aes": [{"ae_title": "ORTHANC", "port": orthanc.dicom_port}],
        }
    )
    (ref,) = _store(d.server.port, [ultrasound_files()[0]])
    answer = orthanc.rest(
        "POST",
        "/modalities/usfmd/storage-commitment",
        {
            "DicomInstances": [
                {"SOPClassUID": ref.sop_class_uid, "SOPInstanceUID": ref.sop_instance_uid}
            ]
        },
    )
    row = _reported_row(d, answer["ID"])
    assert row.state == CommitmentState.UNDELIVERABLE and row.committed == 1
    assert row.last_error and f"port {orthanc.dicom_port}" in row.last_error
    assert orthanc.rest("GET", f"/storage-commitment/{answer['ID']}")["Status"] == "Pending"
