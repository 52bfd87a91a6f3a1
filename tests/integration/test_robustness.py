"""The receiver under stress and misuse: parallel senders, re-sends, a full disk, bad datasets,
dropped associations, a failing handler, and logs that must not carry patient data."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from daemon.config import Settings
from daemon.db.models import Instance, Job, Patient, Series, Study, StudyState
from daemon.logs import JsonFormatter
from daemon.receive import status
from daemon.service import Daemon

from helpers import PEER_ENV, dcmtk, run_peer, ultrasound_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
StartDaemon = Callable[..., Daemon]


def corpus_file(name: str) -> Path:
    return next(f for f in ultrasound_files() if f.name == name)


def us_image(study_uid: str | None = None, size: int = 16, **attributes: object) -> Dataset:
    """A small valid US image; ``attributes`` override or add elements by keyword."""
    ds = Dataset()
    ds.SOPClassUID = US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "ROBUST-1"
    ds.PatientName = "Robust^Test"
    ds.Modality = "US"
    ds.Manufacturer = "TestVendor"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(i % 256 for i in range(size * size))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_copies(source: Path, directory: Path, count: int, study_uid: str) -> list[str]:
    """``count`` copies of ``source`` in one new study and series; returns their SOP UIDs."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    directory.mkdir(parents=True)
    uids = []
    for _ in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


@contextmanager
def association(d: Daemon, ae_title: str = "ROBUST") -> Iterator[Association]:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(US_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(US_MULTIFRAME, JPEGBaseline8Bit)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert assoc.is_established, "association refused"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store(assoc: Association, dataset: Dataset | Path) -> Dataset:
    answer = assoc.send_c_store(dataset)
    assert "Status" in answer, "no C-STORE response"
    return answer


def count(d: Daemon, model: type) -> int:
    with d.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def instances(d: Daemon) -> dict[str, Instance]:
    with d.db.read() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def archived_files(d: Daemon) -> list[Path]:
    """Every file in the archive except the partial receives under ``.incoming``."""
    return [p for p in d.archive.root.rglob("*.dcm") if d.archive.incoming not in p.parents]


def still_serves(d: Daemon) -> None:
    """A fresh association echoes and stores: the daemon survived whatever came before."""
    ds = us_image()
    with association(d, "AFTERWARDS") as assoc:
        assert assoc.send_c_echo().Status == status.SUCCESS
        assert store(assoc, ds).Status == status.SUCCESS
    assert ds.SOPInstanceUID in instances(d)


def no_associations(d: Daemon) -> Callable[[], bool]:
    return lambda: d.server.active_associations() == 0


# -- (a) parallel senders ------------------------------------------------------------------------
def test_four_parallel_storescu_all_stored(start_daemon: StartDaemon, tmp_path: Path) -> None:
    d = start_daemon()
    source = corpus_file("US1_UNCR.dcm")  # 0.9 MB, Explicit VR Little Endian
    studies = {f"SENDER{i}": generate_uid() for i in range(4)}
    sent = {ae: write_copies(source, tmp_path / ae, 20, study) for ae, study in studies.items()}
    # An idle association stays open throughout: it must neither block the senders nor be dropped.
    with association(d, "IDLE") as idle:
        senders = [
            subprocess.Popen(
                [dcmtk("storescu"), "-xe", "-aet", ae, "-aec", "USFMD", "127.0.0.1"]
                + [str(d.server.port), str(tmp_path / ae)]
                + ["--scan-directories"],
                env=PEER_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for ae in studies
        ]
        for proc in senders:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert idle.send_c_echo().Status == status.SUCCESS

    stored = instances(d)
    assert d.receiver.counters.stored == 80 and len(stored) == 80
    with d.db.read() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Study.calling_ae,
                func.count(Instance.id),
                func.min(Instance.received_at),
                func.max(Instance.received_at),
            )
            .join(Instance, Instance.study_pk == Study.id)
            .group_by(Study.id)
        ).all()
    assert {(uid, ae, n) for uid, ae, n, _, _ in rows} == {
        (study, ae, 20) for ae, study in studies.items()
    }
    for ae, uids in sent.items():
        assert {stored[u].calling_ae for u in uids} == {ae}
    # Served side by side, not one after the other: all four receive windows share an instant.
    assert max(r[3] for r in rows) < min(r[4] for r in rows), rows


# -- (b) duplicates ------------------------------------------------------------------------------
def test_duplicate_sop_instance_is_acknowledged_once(
    start_daemon: StartDaemon, db_url: str
) -> None:
    d = start_daemon(database={"url": db_url})
    ds = us_image()
    uid = ds.SOPInstanceUID
    with association(d) as assoc:
        assert store(assoc, ds).Status == status.SUCCESS
        assert store(assoc, ds).Status == status.SUCCESS
    with association(d, "OTHER") as assoc:
        assert store(assoc, ds).Status == status.SUCCESS
    assert instances(d)[uid].duplicates == 2
    assert [count(d, model) for model in (Instance, Series, Study, Patient)] == [1, 1, 1, 1]
    assert len(archived_files(d)) == 1
    assert (d.receiver.counters.stored, d.receiver.counters.duplicates) == (1, 2)

    wait_for(lambda: count(d, Job) == 1, timeout=10, msg="the one analyze job")
    with association(d) as assoc:  # a re-send after stability re-opens nothing
        assert store(assoc, ds).Status == status.SUCCESS
    assert instances(d)[uid].duplicates == 3
    with d.db.read() as session:
        assert session.scalar(select(Study.state)) == StudyState.STABLE
    assert d.sweep_once() == (0, 0)
    assert count(d, Job) == 1
    assert not any(d.archive.incoming.iterdir())


# -- (c) disk watermark --------------------------------------------------------------------------
def test_full_disk_refuses_with_out_of_resources(start_daemon: StartDaemon) -> None:
    d = start_daemon(storage={"min_free_space": "1PB"})
    with association(d) as assoc:
        answer = store(assoc, us_image())
        assert answer.Status == status.STORE_OUT_OF_RESOURCES == 0xA700
        assert "watermark" in answer.ErrorComment
        assert assoc.send_c_echo().Status == status.SUCCESS  # refused, not dropped
    assert archived_files(d) == []
    assert not any(d.archive.incoming.iterdir())
    assert not any(d.archive.quarantine_root.rglob("*"))
    assert (count(d, Instance), count(d, Study), count(d, Patient)) == (0, 0, 0)
    assert d.receiver.counters.refused_disk == 1


# -- (d) datasets that cannot be indexed ---------------------------------------------------------
def file_with_dataset(
    path: Path,
    sop_uid: str,
    dataset_bytes: bytes,
    sop_class: str = US_IMAGE,
    syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """A Part 10 file whose meta header is valid and whose dataset is ``dataset_bytes``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(buffer), meta)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes)
    return path


@dataclass(frozen=True)
class BadCase:
    command_uid: str  # the SOP Instance UID the C-STORE command announces
    payload: Dataset | Path  # what the SCU sends (a Path: its dataset bytes, unparsed)
    dataset: bytes  # the dataset bytes the daemon receives and must keep
    status: int
    reason: str  # text the refusal and the quarantine note must quote


def bad_case(name: str, tmp_path: Path) -> BadCase:
    mismatch, cannot = status.STORE_DATA_SET_MISMATCH, status.STORE_CANNOT_UNDERSTAND
    good = us_image(size=64)
    body = encode(good, False, True) or b""
    uid, path = good.SOPInstanceUID, tmp_path / f"{name}.dcm"
    garbage = bytes((i * 151 + 7) % 256 for i in range(8192))
    if name == "no_study_uid":
        del good.StudyInstanceUID
        return BadCase(uid, good, encode(good, False, True) or b"", mismatch, "StudyInstanceUID")
    if name == "all_garbage":
        file_with_dataset(path, uid, garbage)
        return BadCase(uid, path, garbage, mismatch, "SOPClassUID is missing")
    if name == "uid_mismatch":  # a valid dataset; the meta header (so the command) lies
        other = generate_uid()
        file_with_dataset(path, other, body)
        return BadCase(other, path, body, mismatch, "differs from command")
    if name == "garbage_after_header":  # every header element fine, then noise, no Pixel Data
        cut = body[: body.index(b"\xe0\x7f\x10\x00")] + garbage
        file_with_dataset(path, uid, cut)
        return BadCase(uid, path, cut, mismatch, "Pixel Data missing")
    if name == "truncated_native":
        file_with_dataset(path, uid, body[:-1000])
        return BadCase(uid, path, body[:-1000], cannot, "Pixel Data shorter")
    # Encapsulated: a 30-frame JPEG cine whose last fragment and delimiter never arrived.
    source = corpus_file("examples_ybr_color.dcm")
    meta, offset = split_dataset(source)
    cine = source.read_bytes()[offset:-5000]
    uid = str(meta.MediaStorageSOPInstanceUID)
    file_with_dataset(path, uid, cine, US_MULTIFRAME, JPEGBaseline8Bit)
    return BadCase(uid, path, cine, cannot, "Pixel Data shorter")


BAD_CASES = [
    "no_study_uid",
    "all_garbage",
    "uid_mismatch",
    "garbage_after_header",
    "truncated_native",
    "truncated_encapsulated",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_dataset_is_refused_and_quarantined(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    d = start_daemon()
    bad = bad_case(case, tmp_path)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    with association(d, "BROKEN") as assoc:
        answer = store(assoc, bad.payload)
    assert (answer.Status, bad.reason in answer.get("ErrorComment", "")) == (bad.status, True)

    kept = sorted(d.archive.quarantine_root.rglob("*.dcm"))
    notes = sorted(d.archive.quarantine_root.rglob("*.json"))
    assert len(kept) == len(notes) == 1 and kept[0].stem == notes[0].stem
    note = json.loads(notes[0].read_text())
    assert bad.reason in note["reason"]
    assert (note["sop_instance_uid"], note["calling_ae"]) == (bad.command_uid, "BROKEN")
    assert kept[0].read_bytes().endswith(bad.dataset)  # kept as received, behind a meta header
    assert archived_files(d) == [] and count(d, Instance) == 0 and count(d, Study) == 0
    assert d.receiver.counters.quarantined == 1
    still_serves(d)


# -- (e) dropped associations --------------------------------------------------------------------
def send_partial_store(assoc: Association, dataset: Dataset, fraction: float) -> None:
    """Send the C-STORE-RQ command and the first ``fraction`` of its P-DATA, then drop the TCP
    connection without A-ABORT: a scanner that lost power or network mid-transfer."""
    context = assoc.accepted_contexts[0]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(encode(dataset, False, True) or b"")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context.context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    for pdu_bytes in pdus[: int(len(pdus) * fraction)]:
        sock.sendall(pdu_bytes)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_abort_keeps_acknowledged_and_drops_partial(
    start_daemon: StartDaemon, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    d = start_daemon(settings)
    study = generate_uid()
    acknowledged = [us_image(study) for _ in range(3)]
    with association(d) as assoc:
        for ds in acknowledged:
            assert store(assoc, ds).Status == status.SUCCESS
        assoc.abort()
    wait_for(no_associations(d), timeout=10, msg="aborted association gone")
    expected = {ds.SOPInstanceUID for ds in acknowledged}
    assert set(instances(d)) == expected
    for ds in acknowledged:
        archived = pydicom.dcmread(d.archive.absolute(instances(d)[ds.SOPInstanceUID].path))
        assert archived.PixelData == ds.PixelData
    assert not any(d.archive.incoming.iterdir())

    # A 1 MB instance cut off after half its fragments: nothing indexed, nothing archived.
    big = us_image(study, size=1024)
    ae = AE(ae_title="CUTOFF")
    ae.add_requested_context(US_IMAGE, ExplicitVRLittleEndian)
    cut = ae.associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert cut.is_established
    send_partial_store(cut, big, 0.5)
    wait_for(no_associations(d), timeout=10, msg="dropped connection noticed")
    assert set(instances(d)) == expected
    assert len(archived_files(d)) == 3
    partial = list(d.archive.incoming.iterdir())  # pynetdicom leaves the partial receive here
    assert len(partial) <= 1 and all(p.stat().st_size < len(big.PixelData) for p in partial)
    still_serves(d)

    # A restart discards the unacknowledged leftovers and keeps everything acknowledged.
    d.stop()
    again = start_daemon(settings)
    assert not any(again.archive.incoming.iterdir())
    assert expected < set(instances(again)) and big.SOPInstanceUID not in instances(again)
    still_serves(again)


def test_killed_storescu_mid_cine(start_daemon: StartDaemon, tmp_path: Path) -> None:
    d = start_daemon()
    cine = corpus_file("color3d_jpeg_baseline.dcm")  # 120 frames, 6 MB, JPEG Baseline
    args = [dcmtk("storescu"), "-xy", "--repeat", "200", "-aet", "CINE", "-aec", "USFMD"]
    sender = subprocess.Popen(
        args + ["127.0.0.1", str(d.server.port), str(cine)],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it once one copy is acknowledged and the next one is streaming in.
        wait_for(
            lambda: d.receiver.counters.stored == 1 and any(d.archive.incoming.iterdir()),
            timeout=30,
            msg="first cine stored and another in flight",
        )
    finally:
        sender.kill()
        sender.wait(10)
    assert sender.returncode != 0
    wait_for(no_associations(d), timeout=10, msg="killed sender's association gone")

    original = pydicom.dcmread(cine)
    (row,) = instances(d).values()
    assert (row.sop_instance_uid, row.number_of_frames) == (original.SOPInstanceUID, 120)
    archived = pydicom.dcmread(d.archive.absolute(row.path))
    assert archived.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert archived.PixelData == original.PixelData
    assert len(archived_files(d)) == 1
    still_serves(d)


# -- (f) a failing handler -----------------------------------------------------------------------
def test_handler_exception_fails_one_store_not_the_association(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = start_daemon()
    real_store = d.archive.store
    calls: list[str] = []

    def flaky_store(received: Path, relative: str) -> int:
        calls.append(relative)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real_store(received, relative)

    monkeypatch.setattr(d.archive, "store", flaky_store)
    first, second = us_image(), us_image()
    with association(d) as assoc:
        failed = store(assoc, first)
        assert failed.Status == status.PROCESSING_FAILURE == 0x0110
        assert failed.ErrorComment == "internal error: OSError"
        assert assoc.is_established
        assert store(assoc, second).Status == status.SUCCESS
        assert store(assoc, first).Status == status.SUCCESS  # the retry of the failed one
    assert len(calls) == 3
    assert set(instances(d)) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert (d.receiver.counters.failures, d.receiver.counters.stored) == (1, 2)
    assert not any(d.archive.incoming.iterdir())


# -- (g) no patient data in the logs -------------------------------------------------------------
PHI = {"PatientName": "Quixotl^Zebulon", "PatientID": "PHI-8675309", "PatientBirthDate": "19230419"}


def test_no_phi_in_logs(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Everything, third-party loggers included (another test may have capped them at WARNING).
    for name in (None, "daemon", "pynetdicom", "apscheduler"):
        caplog.set_level(logging.DEBUG, logger=name)
    d = start_daemon()
    good = us_image(**PHI)
    refused = us_image(**PHI)
    del refused.StudyInstanceUID
    files = []
    for name, ds in (("good", good), ("refused", refused)):
        files.append(tmp_path / f"{name}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    for _ in range(2):  # the second round is a duplicate and a second refusal
        run_peer(
            [dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", str(d.server.port)]
            + [str(f) for f in files]
        )
    wait_for(lambda: count(d, Job) == 1, timeout=10, msg="stable study with its job")
    with d.db.read() as session:  # the daemon did see the patient data
        assert session.scalar(select(Patient.name)) == PHI["PatientName"]
    assert (d.receiver.counters.stored, d.receiver.counters.duplicates) == (1, 1)
    assert d.receiver.counters.quarantined == 2

    # The records that carry context were produced, so the check below did look at them.
    messages = {(r.name, r.getMessage()) for r in caplog.records}
    assert ("daemon.receive.archive", "quarantined a refused dataset") in messages
    assert ("daemon.receive.handlers", "duplicate SOP instance acknowledged, first copy kept") in (
        messages
    )
    assert any(name.startswith("pynetdicom") for name, _ in messages)
    formatter = JsonFormatter()
    for record in caplog.records:
        rendered = formatter.format(record) + repr(vars(record))
        for keyword, value in PHI.items():
            for form in (value, value.replace("^", " ")):
                assert form not in rendered, f"{keyword} in log record from {record.name}"
