"""Who may talk to usfmd: association policy on the wire (PS3.8 §9.3.4) and DICOM TLS (PS3.15 B.9).

Every rejection is checked as the peer sees it: the A-ASSOCIATE-RJ result, source and reason that
pynetdicom decodes, and what dcmtk's echoscu prints. TLS runs against a CA, server and client
certificates made with the ``openssl`` CLI for each test module.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import select

from daemon.db.models import CommitmentRequest, CommitmentState
from daemon.receive import status
from daemon.receive.sop_classes import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    VERIFICATION,
)

from helpers import dcmtk, free_port, run_peer, ultrasound_files, wait_for

pytestmark = pytest.mark.integration

LOCAL = ("127.0.0.1", 0)
SECOND_LOOPBACK = ("127.0.0.2", 0)  # Linux routes all of 127.0.0.0/8 to lo


def _scu(ae_title: str = "MODALITY", storage: bool = False) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    if storage:
        ds = dcmread(ultrasound_files()[0], stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae


def _associate(
    port: int,
    calling: str = "MODALITY",
    called: str = "USFMD",
    bind: tuple[str, int] = LOCAL,
    tls: ssl.SSLContext | None = None,
) -> tuple[Association, list[str]]:
    """Associate; also return the events the requestor saw (EVT_REJECTED, EVT_ACCEPTED)."""
    seen: list[str] = []
    handlers = [
        (evt.EVT_REJECTED, lambda event: seen.append("rejected")),
        (evt.EVT_ACCEPTED, lambda event: seen.append("accepted")),
    ]
    assoc = _scu(calling).associate(
        "127.0.0.1",
        port,
        ae_title=called,
        bind_address=bind,
        tls_args=(tls, "localhost") if tls is not None else None,
        evt_handlers=handlers,
    )
    return assoc, seen


def _echo_ok(assoc: Association) -> bool:
    try:
        if not assoc.is_established:
            return False
        rsp = assoc.send_c_echo()
        return rsp is not None and rsp.get("Status") == status.SUCCESS
    finally:
        if assoc.is_established:
            assoc.release()


def _assert_rejected(assoc: Association, seen: list[str], result: int, source: int, reason: int):
    assert assoc.is_rejected and not assoc.is_established
    assert seen == ["rejected"]
    rj = assoc.acceptor.primitive  # the A-ASSOCIATE-RJ the daemon sent (PS3.8 Table 9-21)
    assert (rj.result, rj.result_source, rj.diagnostic) == (result, source, reason)


def _echoscu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return run_peer([dcmtk("echoscu"), "-to", "10", "-ta", "10", *args, "127.0.0.1", str(port)])


# -- association policy ------------------------------------------------------------------------


def test_unknown_calling_ae_rejected_permanently_by_service_user(start_daemon):
    d = start_daemon(
        dicom={"accept_any_from_loopback": False, "calling_aes": [{"ae_title": "VOLUSON"}]}
    )
    port = d.server.port

    assoc, seen = _associate(port, calling="INTRUDER")
    _assert_rejected(
        assoc,
        seen,
        status.REJECTED_PERMANENT,
        status.SOURCE_SERVICE_USER,
        status.REASON_CALLING_AE_NOT_RECOGNIZED,
    )

    r = _echoscu(port, "-aet", "INTRUDER", "-aec", "USFMD")
    assert r.returncode != 0
    out = (r.stdout + r.stderr).lower()
    assert "rejected" in out and "calling ae title not recognized" in out, out

    # The listed AE is accepted, by both peers; the listener survived the rejections.
    assert _echo_ok(_associate(port, calling="VOLUSON")[0])
    assert _echoscu(port, "-aet", "VOLUSON", "-aec", "USFMD").returncode == 0


def test_host_bound_ae_accepted_only_from_its_address(start_daemon):
    d = start_daemon(
        dicom={
            "accept_any_from_loopback": False,
            "calling_aes": [{"ae_title": "BOUND", "host": "127.0.0.2"}],
        }
    )
    port = d.server.port

    assert _echo_ok(_associate(port, calling="BOUND", bind=SECOND_LOOPBACK)[0])

    assoc, seen = _associate(port, calling="BOUND", bind=LOCAL)
    _assert_rejected(
        assoc,
        seen,
        status.REJECTED_PERMANENT,
        status.SOURCE_SERVICE_USER,
        status.REASON_CALLING_AE_NOT_RECOGNIZED,
    )


def test_wrong_called_ae_rejected_with_reason_7(start_daemon):
    d = start_daemon()
    port = d.server.port
    assoc, seen = _associate(port, called="NOT_USFMD")
    _assert_rejected(
        assoc,
        seen,
        status.REJECTED_PERMANENT,
        status.SOURCE_SERVICE_USER,
        status.REASON_CALLED_AE_NOT_RECOGNIZED,
    )
    r = _echoscu(port, "-aec", "NOT_USFMD")
    assert r.returncode != 0
    assert "called ae title not recognized" in (r.stdout + r.stderr).lower()


def test_any_calling_ae_accepted_from_loopback_by_default(start_daemon):
    d = start_daemon()
    port = d.server.port
    for calling, bind in (("ANYONE", LOCAL), ("SOMEONE_ELSE", SECOND_LOOPBACK)):
        assert _echo_ok(_associate(port, calling=calling, bind=bind)[0]), calling
    assert _echoscu(port, "-aet", "WHOEVER", "-aec", "USFMD").returncode == 0


def test_too_many_associations_rejected_transiently(start_daemon):
    d = start_daemon(dicom={"max_associations": 1})
    port = d.server.port
    first, _ = _associate(port)
    assert first.is_established
    try:
        second, seen = _associate(port)
        # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local limit.
        _assert_rejected(
            second,
            seen,
            status.REJECTED_TRANSIENT,
            status.SOURCE_SERVICE_PROVIDER_PRESENTATION,
            status.REASON_LOCAL_LIMIT_EXCEEDED,
        )
    finally:
        first.release()
    wait_for(lambda: d.server.active_associations() == 0, 10, "first association to end")
    assert _echo_ok(_associate(port)[0])


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the daemon does not trust
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, ca: str, extensions: str) -> tuple[Path, Path]:
    key, csr, crt = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", directory / f"{ca}.crt",
             "-CAkey", directory / f"{ca}.key", "-CAcreateserial", "-days", "2",
             "-out", crt, "-extfile", ext)  # fmt: skip
    return crt, key


def _make_ca(directory: Path, name: str) -> Path:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", directory / f"{name}.key", "-out", directory / f"{name}.crt",
             "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return directory / f"{name}.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "usfmd-test-ca")
    _make_ca(directory, "stranger-ca")
    server = _issue(
        directory,
        "server",
        "usfmd-test-ca",
        # usfmd's one certificate also identifies it when it calls peers back (daemon/tls.py).
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    # A modality is a client (C-STORE) and a server (receiving commitment reports).
    both = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth,serverAuth\n"
    client = _issue(directory, "modality", "usfmd-test-ca", both)
    stranger = _issue(directory, "stranger", "stranger-ca", client_ext)
    return Pki(ca, *server, *client, *stranger)


def _tls_section(pki: Pki, require_client_certificate: bool = True) -> dict[str, object]:
    return {
        "enabled": True,
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": require_client_certificate,
    }


def _client_context(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A client that verifies the daemon's certificate (and host name) against our CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def _store_one(assoc: Association) -> int:
    try:
        rsp = assoc.send_c_store(dcmread(ultrasound_files()[0]))
        return int(rsp.Status)
    finally:
        assoc.release()


def _associate_storage(port: int, tls: ssl.SSLContext) -> Association:
    return _scu(storage=True).associate(
        "127.0.0.1", port, ae_title="USFMD", tls_args=(tls, "localhost")
    )


def test_tls_client_certificate_echo_and_store(start_daemon, pki):
    d = start_daemon(dicom={"tls": _tls_section(pki)})
    port = d.server.port
    good = _client_context(pki, (pki.client_cert, pki.client_key))

    assert _echo_ok(_associate(port, tls=good)[0])
    assoc = _associate_storage(port, good)
    assert assoc.is_established
    assert _store_one(assoc) == status.SUCCESS
    assert d.receiver.counters.stored == 1


@pytest.mark.parametrize("client", ["no certificate", "untrusted CA"])
def test_tls_refuses_client_without_trusted_certificate(start_daemon, pki, client, caplog):
    d = start_daemon(dicom={"tls": _tls_section(pki)})
    port = d.server.port
    cert = None if client == "no certificate" else (pki.stranger_cert, pki.stranger_key)

    assoc, seen = _associate(port, tls=_client_context(pki, cert))
    assert not assoc.is_established and "accepted" not in seen
    wait_for(lambda: "TLS handshake failed" in caplog.text, 10, "the daemon to refuse it")
    # The daemon keeps serving: the next good client echoes.
    good = _client_context(pki, (pki.client_cert, pki.client_key))
    assert _echo_ok(_associate(port, tls=good)[0])


def test_tls_without_required_client_certificate(start_daemon, pki):
    d = start_daemon(dicom={"tls": _tls_section(pki, require_client_certificate=False)})
    assert _echo_ok(_associate(d.server.port, tls=_client_context(pki, None))[0])


def test_plain_tcp_against_tls_port_fails_without_hanging_listener(start_daemon, pki, caplog):
    d = start_daemon(dicom={"tls": _tls_section(pki), "acse_timeout": 30})
    port = d.server.port
    good = _client_context(pki, (pki.client_cert, pki.client_key))

    # A silent TCP client: its handshake waits in its own thread, not in the accept loop.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assoc, seen = _associate(port)  # plain DICOM: the handshake reads it as garbage
        assert not assoc.is_established and "accepted" not in seen
        assert _echo_ok(_associate(port, tls=good)[0])
        r = _echoscu(port, "-aec", "USFMD")
        assert r.returncode != 0
        assert _echo_ok(_associate(port, tls=good)[0])
    # Each refused connection is logged — the silent one once it hangs up — before the test
    # ends (a handler thread logging after it would write to a closed capture stream).
    wait_for(lambda: caplog.text.count("TLS handshake failed") >= 3, 10, "three refusals logged")


def test_tls_dcmtk_echoscu(start_daemon, pki):
    help_text = run_peer([dcmtk("echoscu"), "--help"]).stdout
    if "+tls" not in help_text:
        pytest.skip("this dcmtk build has no TLS support")
    d = start_daemon(dicom={"tls": _tls_section(pki)})
    port = d.server.port
    client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]

    r = _echoscu(port, *client, "-aec", "USFMD")
    assert r.returncode == 0, r.stdout + r.stderr
    # Anonymous TLS (no client certificate) is refused when certificates are required.
    r = _echoscu(port, "+tla", "+cf", str(pki.ca), "-aec", "USFMD")
    assert r.returncode != 0


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_server_sockets_disable_nagle(start_daemon, pki, transport):
    """Delayed ACKs cost ~40 ms per C-STORE response (DESIGN.md §7); TLS connections too."""
    sections = {"tls": _tls_section(pki)} if transport == "tls" else {}
    d = start_daemon(dicom=sections)
    tls = _client_context(pki, (pki.client_cert, pki.client_key)) if transport == "tls" else None
    assoc, _ = _associate(d.server.port, tls=tls)
    try:
        assert assoc.is_established
        (acceptor,) = wait_for(lambda: d.server.ae.active_associations, 5, "the acceptor")
        sock = acceptor.dul.socket.socket
        assert isinstance(sock, ssl.SSLSocket) is (transport == "tls")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def _modality_listener(pki: Pki, port: int, tls: bool, reports: list[Dataset]) -> Any:
    """A modality's own SCP waiting for the commitment report, optionally behind TLS that
    requires a client certificate from our CA."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        context.load_verify_locations(cafile=str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append(event.event_information)
        return status.SUCCESS, None

    return ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )


@pytest.mark.parametrize("modality_tls", [True, False])
def test_commitment_report_calls_back_over_tls(start_daemon, pki, modality_tls):
    """With ``tls = true`` for a calling AE, the report goes over TLS with our certificate:
    a TLS modality receives it, a plain one cannot, and the request is recorded undeliverable."""
    listen_port = free_port()
    peer = {"ae_title": "MODALITY", "port": listen_port, "commitment_report": "new", "tls": True}
    d = start_daemon(dicom={"tls": _tls_section(pki), "calling_aes": [peer]})
    good = _client_context(pki, (pki.client_cert, pki.client_key))
    reports: list[Dataset] = []
    server = _modality_listener(pki, listen_port, modality_tls, reports)
    try:
        ae = _scu()
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        port = d.server.port
        assoc = ae.associate("127.0.0.1", port, ae_title="USFMD", tls_args=(good, "localhost"))
        assert assoc.is_established
        request = Dataset()
        request.TransactionUID = generate_uid()
        unknown = Dataset()  # not archived: reported as failed, which is all we need here
        unknown.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
        unknown.ReferencedSOPInstanceUID = generate_uid()
        request.ReferencedSOPSequence = [unknown]
        rsp, _ = assoc.send_n_action(
            request, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assoc.release()
        assert rsp.Status == status.SUCCESS
        row = wait_for(
            lambda: _commitment_row(d, request.TransactionUID), 20, "the commitment outcome"
        )
    finally:
        server.shutdown()
    if modality_tls:
        assert row.state == CommitmentState.REPORTED, row.last_error
        assert [str(r.TransactionUID) for r in reports] == [request.TransactionUID]
    else:
        assert row.state == CommitmentState.UNDELIVERABLE and reports == []


def _commitment_row(d: Any, transaction_uid: str) -> CommitmentRequest | None:
    with d.db.read() as session:
        row = session.scalars(
            select(CommitmentRequest).where(
                CommitmentRequest.transaction_uid == transaction_uid,
                CommitmentRequest.state != CommitmentState.PENDING,
            )
        ).one_or_none()
        if row is not None:
            session.expunge(row)
        return row
