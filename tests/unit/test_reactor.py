"""daemon.receive.reactor: event-driven copies of pynetdicom's acceptor loops stay correct."""

from __future__ import annotations

import gc
import hashlib
import inspect
import socket
import tempfile
import threading
import time
from pathlib import Path

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from daemon.db.models import Instance
from daemon.receive import reactor, status

from helpers import ultrasound_files, wait_for

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def test_copied_loops_match_the_installed_pynetdicom():
    """A pynetdicom upgrade that changes either loop must fail here: redo the copies."""
    assert reactor.supported(), f"pynetdicom {pynetdicom.__version__} not in {reactor.COPIED_FROM}"
    upstream = {
        "DULServiceProvider.run_reactor": DULServiceProvider.run_reactor,
        "Association._run_reactor": Association._run_reactor,
        "DIMSEMessage.decode_msg": DIMSEMessage.decode_msg,
    }
    for name, function in upstream.items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
        assert digest == reactor.UPSTREAM_SOURCE[name], f"pynetdicom's {name} changed"


def test_fast_socket_reads_exactly_and_returns_short_on_close():
    left, right = socket.socketpair()
    fast = reactor.FastSocket.__new__(reactor.FastSocket)
    fast.socket = right
    payload = bytes(range(256)) * 1000  # larger than the socket buffer: arrives in pieces
    sender = threading.Thread(target=left.sendall, args=(payload,))
    sender.start()
    assert fast.recv(6) == payload[:6]
    assert fast.recv(len(payload) - 6) == payload[6:]
    sender.join()
    left.sendall(b"abc")
    left.close()
    assert fast.recv(10) == b"abc"  # peer gone: what arrived, like pynetdicom's recv
    right.close()


def _scu(network_timeout: float = 60) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = 20
    ae.network_timeout = network_timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context(US_IMAGE_STORAGE)
    return ae


def _server_association(daemon) -> Association:
    found = wait_for(lambda: daemon.server.ae.active_associations, 5, "server association")
    return found[0]  # type: ignore[index]


def _no_associations(daemon):
    return lambda: not daemon.server.ae.active_associations


def test_server_associations_run_event_driven_and_store(start_daemon):
    d = start_daemon()
    assoc = _scu().associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert assoc.is_established
    try:
        served = _server_association(d)
        assert isinstance(served, reactor.EventAssociation)
        assert isinstance(served.dul, reactor.EventDUL)
        assert isinstance(served.dul.socket, reactor.FastSocket)
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0
        path = next(
            p for p in ultrasound_files() if dcmread(p, stop_before_pixels=True).SOPClassUID
            == US_IMAGE_STORAGE and dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            == "1.2.840.10008.1.2.1"
        )  # fmt: skip
        assert assoc.send_c_store(Path(path)).Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    wait_for(_no_associations(d), 2, "released association gone")
    assert d.receiver.counters.stored == 1


def test_peer_abort_ends_the_association_at_once(start_daemon):
    d = start_daemon()
    assoc = _scu().associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert assoc.is_established
    _server_association(d)
    assoc.abort()
    wait_for(_no_associations(d), 2, "aborted association gone")


def _cpu_ticks(native_id: int | None) -> int:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_idle_association_does_not_spin(start_daemon):
    d = start_daemon()
    assoc = _scu().associate("127.0.0.1", d.server.port, ae_title="USFMD")
    try:
        served = _server_association(d)
        threads = (served.native_id, served.dul.native_id)
        before = sum(_cpu_ticks(t) for t in threads)
        time.sleep(1.0)
        used = sum(_cpu_ticks(t) for t in threads) - before
        assert used <= 10, f"idle association used {used} clock ticks in 1 s"
    finally:
        assoc.release()


def test_network_timeout_still_aborts_an_idle_association(start_daemon):
    d = start_daemon(dicom={"network_timeout": 0.5})
    assoc = _scu().associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert assoc.is_established
    wait_for(lambda: not assoc.is_established, 5, "idle association timed out by usfmd")
    wait_for(_no_associations(d), 2, "timed-out association gone")


def test_install_leaves_unknown_pynetdicom_alone(monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "4.0.0")
    assoc = Association(AE(), "acceptor")
    assert reactor.install(assoc) is assoc
    assert type(assoc) is Association and type(assoc.dul) is DULServiceProvider


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x00\x00\x00\x03\x01\x02x", [(4, 7)]),
        (b"\x00\x00\x00\x02\x01\x02\x00\x00\x00\x03\x03\x00y", [(4, 6), (10, 13)]),
        (b"\x00\x00\x00\x09\x01\x02x", None),  # item longer than the PDU
        (b"\x00\x00\x00\x01\x01", None),  # no room for the control header
        (b"\x00\x00\x00\x02\x01\x02\x00\x00", None),  # trailing bytes
        (b"", None),
    ],
)
def test_split_pdvs_accepts_only_exact_tilings(body: bytes, expected: object) -> None:
    assert reactor._split_pdvs(bytearray(body)) == expected


def test_small_pdus_are_written_straight_to_incoming(start_daemon):
    """A data set in many P-DATA-TF PDUs arrives byte-exact, via the archive's incoming folder,
    without pynetdicom's temporary files or a process-wide tempfile.tempdir."""
    before = tempfile.tempdir
    d = start_daemon(dicom={"max_pdu": 16384})  # ~90 PDUs for a 1.4 MB frame
    path = next(
        p for p in ultrasound_files() if dcmread(p, stop_before_pixels=True).SOPClassUID
        == US_IMAGE_STORAGE
    )  # fmt: skip
    sent = dcmread(path)
    ae = _scu()
    ae.add_requested_context(US_IMAGE_STORAGE, str(sent.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", d.server.port, ae_title="USFMD")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(Path(path)).Status == 0
    finally:
        assoc.release()
    assert tempfile.tempdir == before
    with d.db.read() as session:
        stored = session.scalars(select(Instance.path)).one()
    archived = dcmread(d.archive.absolute(stored))
    assert archived.SOPInstanceUID == sent.SOPInstanceUID
    assert archived.PixelData == sent.PixelData
    assert archived.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert d.archive.absolute(stored).stat().st_mode & 0o777 == 0o600
    assert not list(d.archive.incoming.iterdir())


def test_dataset_file_writes_everything_and_starts_write_back_early(tmp_path: Path) -> None:
    """Fragments land byte-exact, 0600; on Linux write-back starts every WRITEBACK_BYTES (the
    fsync before the response then finds most of the file on disk)."""
    chunks = [bytes([i]) * 65_536 for i in range(41)]  # 2.56 MiB in 64 KiB fragments
    sink = reactor.DatasetFile(tmp_path / "set.dcm")
    for chunk in chunks:
        assert sink.write(memoryview(chunk)) == len(chunk)
    assert sink.write(b"") == 0
    if reactor._start_writeback is not None:
        # Issued each time WRITEBACK_BYTES more were written: 5 times, a 64 KiB tail left.
        assert sink._flushed == 5 * reactor.DatasetFile.WRITEBACK_BYTES
    sink.close()
    sink.close()  # idempotent, as pynetdicom may close it again
    assert (tmp_path / "set.dcm").read_bytes() == b"".join(chunks)
    assert (tmp_path / "set.dcm").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="closed"):
        sink.write(b"x")


def _us_explicit_le() -> Path:
    return Path(
        next(
            p for p in ultrasound_files() if dcmread(p, stop_before_pixels=True).SOPClassUID
            == US_IMAGE_STORAGE and dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            == "1.2.840.10008.1.2.1"
        )
    )  # fmt: skip


def test_store_success_goes_out_pre_encoded_and_reads_as_pynetdicom_s(start_daemon, monkeypatch):
    """The Success response is sent from encoding.c_store_success; a pynetdicom requester decodes
    the same command set from it as from pynetdicom's own encoding. Failures keep pynetdicom's
    path (Error Comment and all)."""
    pre_encoded = []
    real = reactor.encoding.c_store_success

    def spy(*args: object) -> bytes | None:
        pre_encoded.append(args)
        return real(*args)

    monkeypatch.setattr(reactor.encoding, "c_store_success", spy)
    d = start_daemon()
    path = _us_explicit_le()
    sent = dcmread(path)
    received = []  # the requester's decoded response command sets
    assoc = _scu().associate(
        "127.0.0.1",
        d.server.port,
        ae_title="USFMD",
        evt_handlers=[(evt.EVT_DIMSE_RECV, lambda event: received.append(event.message))],
    )
    assert assoc.is_established
    try:
        assert isinstance(_server_association(d).dimse, reactor.EventDIMSE)
        assert assoc.send_c_store(path, msg_id=4242).Status == 0x0000
        command = received[-1].command_set
        assert command.CommandField == 0x8001 and command.CommandDataSetType == 0x0101
        assert command.MessageIDBeingRespondedTo == 4242
        assert command.AffectedSOPInstanceUID == sent.SOPInstanceUID
        assert command.AffectedSOPClassUID == US_IMAGE_STORAGE
        assert command.Status == 0x0000 and "ErrorComment" not in command
        assert pre_encoded == [(4242, US_IMAGE_STORAGE, sent.SOPInstanceUID)]
        no_pixels = dcmread(path)
        no_pixels.SOPInstanceUID = no_pixels.SOPInstanceUID + ".9"
        del no_pixels.PixelData
        refused = assoc.send_c_store(no_pixels)
        assert refused.Status == status.STORE_DATA_SET_MISMATCH
        assert refused.ErrorComment
        assert len(pre_encoded) == 1  # only Success is pre-encoded
    finally:
        assoc.release()


def test_a_bound_dimse_sent_handler_gets_pynetdicom_s_message(start_daemon, monkeypatch):
    """Whoever binds EVT_DIMSE_SENT expects pynetdicom's message object: no pre-encoding then."""
    pre_encoded = []
    monkeypatch.setattr(reactor.encoding, "c_store_success", lambda *a: pre_encoded.append(a))
    d = start_daemon()
    assoc = _scu().associate("127.0.0.1", d.server.port, ae_title="USFMD")
    seen: list[str] = []
    try:
        served = _server_association(d)
        served.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(type(event.message).__name__))
        assert assoc.send_c_store(_us_explicit_le()).Status == 0x0000
    finally:
        assoc.release()
    assert seen == ["C_STORE_RSP"] and pre_encoded == []


def test_server_start_freezes_start_up_objects(start_daemon):
    """pynetdicom's server forces full collections; start-up objects are kept out of them."""
    start_daemon()
    assert gc.get_freeze_count() > 0
