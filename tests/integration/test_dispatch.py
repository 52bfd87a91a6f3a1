"""The dispatcher against real Storage SCPs: Orthanc, dcmtk's storescp (plain and TLS), and a
pynetdicom peer that counts overlapping associations and answers chosen statuses.

Each test runs the daemon in-process (the same code as ``usfmd serve``) with its dispatcher, on
both database backends where the database matters, and keeps all traffic on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from daemon.config import load_settings
from daemon.db.index import find_instance
from daemon.db.models import OutboxItem, OutboxState
from daemon.dispatch import outbox, scu
from daemon.dispatch.dispatcher import Dispatcher, destination_names
from daemon.dispatch.outbox import RetryPolicy
from daemon.dispatch.results import store_result
from daemon.service import Daemon, open_archive, open_database

from dispatch_peers import (
    SECONDARY_CAPTURE,
    make_pki,
    make_sc,
    make_sr,
    orthanc,
    storage_peer,
    storescp,
    write_ct_only_profile,
)
from helpers import free_port, wait_for

pytestmark = pytest.mark.integration


def destination(name: str, port: int, ae_title: str = "PACS", **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


def dispatch_section(*destinations: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "destinations": list(destinations),
        "poll_seconds": 0.05,
        "backoff_base_seconds": 0.2,
        "backoff_max_seconds": 2,
        "connect_timeout": 5,
        "acse_timeout": 5,
        "dimse_timeout": 10,
        "lease_seconds": 30,
        **extra,
    }


def now() -> datetime:
    return datetime.now(UTC)


def produce(d: Daemon, *datasets: Any) -> list[str]:
    """What a worker does with its results: archive, index, queue for every destination."""
    names = destination_names(d.settings)
    uids = [store_result(d.db, d.archive, ds, names, now()).sop_instance_uid for ds in datasets]
    if d.dispatcher is not None:
        d.dispatcher.wake()
    return uids


def items(d: Daemon) -> list[OutboxItem]:
    with d.db.read() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def all_in(d: Daemon, state: OutboxState, count: int) -> Callable[[], bool]:
    return lambda: [i.state for i in items(d)] == [state] * count


def test_results_reach_orthanc_once_even_after_forced_redispatch(
    db_url: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        d = start_daemon(
            database={"url": db_url},
            dispatch=dispatch_section(destination("orthanc", pacs.dicom_port, "ORTHANC")),
        )
        study = generate_uid()
        heatmap, second = make_sc(study), make_sc(study)
        uids = produce(d, make_sr(heatmap), heatmap, second)
        wait_for(all_in(d, OutboxState.SENT, 3), 30, "three results sent to Orthanc")
        assert sorted(pacs.sop_instance_uids()) == sorted(uids)
        first_sent = {i.id: i.sent_at for i in items(d)}
        assert {i.last_status for i in items(d)} == {0x0000}

        # Forced re-dispatch of everything already delivered, and the producer storing the same
        # results again: the same archived files (same UIDs) go out; nothing new is made.
        assert outbox.retry(d.db, now(), ids=list(first_sent)) == 3
        again = produce(d, heatmap, second)
        assert again == uids[1:]
        wait_for(all_in(d, OutboxState.SENT, 3), 30, "the re-dispatch")
        assert all(i.sent_at > first_sent[i.id] and i.attempts == 1 for i in items(d))
        held = pacs.sop_instance_uids()
        assert sorted(held) == sorted(uids), "Orthanc holds a duplicate or a new UID"
        studies = pacs.rest("GET", "/studies")
        assert len(studies) == 1
        tags = pacs.rest("GET", f"/studies/{studies[0]}")["MainDicomTags"]
        assert tags["StudyInstanceUID"] == study


def test_destination_down_then_up_is_retried_with_backoff(
    db_url: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    d = start_daemon(
        database={"url": db_url},
        dispatch=dispatch_section(destination("pacs", port), max_attempts=50),
    )
    (uid,) = produce(d, make_sc())
    wait_for(lambda: items(d)[0].attempts >= 3, 30, "three failed attempts")
    row = items(d)[0]
    assert row.state in (OutboxState.FAILED, OutboxState.SENDING)
    assert "no connection" in (row.last_error or "") and row.last_status is None
    if row.state == OutboxState.FAILED:
        # base 0.2 s doubling: the wait after attempt n is 0.2 * 2^(n-1), capped at 2 s.
        delay = (row.not_before - row.updated_at).total_seconds()
        assert delay == pytest.approx(min(2.0, 0.2 * 2 ** (row.attempts - 1)), abs=0.01)

    with storescp(port, tmp_path / "received", "+B"):
        wait_for(all_in(d, OutboxState.SENT, 1), 30, "delivery once the PACS is up")
    row = items(d)[0]
    assert row.attempts >= 4 and row.last_error is None and row.last_status == 0
    (received,) = (tmp_path / "received").iterdir()
    archived = d.archive.absolute(_path_of(d, uid))
    assert pydicom.dcmread(received) == pydicom.dcmread(archived)  # bit-preserving peer


def _path_of(d: Daemon, uid: str) -> str:
    with d.db.read() as session:
        instance = find_instance(session, uid)
        assert instance is not None
        return instance.path


@pytest.mark.parametrize("refusal", ["called AE title", "SOP class not accepted", "status 0xA700"])
def test_refusing_destination_goes_dead_after_max_attempts(
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
    refusal: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    settings = dispatch_section(destination("pacs", port, "PACS"), max_attempts=3)
    if refusal == "called AE title":
        peer = storage_peer(port=port, ae_title="NOT_PACS", require_called_aet=True)
        expected = "rejected by PACS@127.0.0.1"
    elif refusal == "SOP class not accepted":
        config, profile = write_ct_only_profile(tmp_path / "ct-only.cfg")
        peer = storescp(port, tmp_path / "out", "-xf", config, profile)  # type: ignore[assignment]
        expected = "accepted no presentation context for SOP Class 1.2.840.10008.5.1.4.1.1.7"
    else:
        peer = storage_peer(port=port, answer=0xA700)
        expected = "status 0xA700 (Failure: Refused: Out of Resources)"
    with peer:
        d = start_daemon(dispatch=settings)
        produce(d, make_sc())
        wait_for(all_in(d, OutboxState.DEAD, 1), 30, f"dead letter after {refusal}")
    row = items(d)[0]
    assert row.attempts == 3 and expected in (row.last_error or ""), row.last_error
    assert row.last_status == (0xA700 if refusal == "status 0xA700" else None)
    for text in (row.last_error, caplog.text):  # no patient data in the row or the logs
        assert "Dispatch^Test" not in text and "PID-DISPATCH" not in text
    assert "object not accepted" in caplog.text or "destination unreachable" in caplog.text


def test_storage_warnings_count_as_delivered(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    with storage_peer(answer=0xB007) as peer:
        d = start_daemon(dispatch=dispatch_section(destination("pacs", peer.port, "PEER")))
        (uid,) = produce(d, make_sc())
        wait_for(all_in(d, OutboxState.SENT, 1), 30, "a warning to count as stored")
    assert items(d)[0].last_status == 0xB007 and peer.received == [uid]


def test_converted_when_only_implicit_little_endian_is_accepted(
    start_daemon: Callable[..., Daemon],
) -> None:
    with storage_peer(syntaxes=[ImplicitVRLittleEndian]) as peer:
        d = start_daemon(dispatch=dispatch_section(destination("pacs", peer.port, "PEER")))
        uids = produce(d, make_sc(), make_sr(make_sc()))
        wait_for(all_in(d, OutboxState.SENT, 2), 30, "both sent in Implicit VR LE")
    assert sorted(peer.received) == sorted(uids)


def test_associations_per_destination_limited_across_processes(
    db_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    """Two dispatchers (as on two hosts) share one database: still at most 2 associations,
    each carrying a full batch."""
    with storage_peer(hold=0.15) as peer:
        d = start_daemon(
            database={"url": db_url},
            dispatch=dispatch_section(
                destination("pacs", peer.port, "PEER", max_associations=2),
                batch_size=2,
                enabled=False,  # this test runs the dispatchers itself
            ),
        )
        assert d.dispatcher is None
        study = generate_uid()
        uids = produce(d, *[make_sc(study) for _ in range(12)])
        hosts = [Dispatcher(d.settings, d.db, d.archive.root, name=f"host-{x}:4242") for x in "ab"]
        for dispatcher in hosts:
            dispatcher.start()
        try:
            wait_for(all_in(d, OutboxState.SENT, 12), 60, "twelve results sent")
        finally:
            for dispatcher in hosts:
                dispatcher.stop()
    assert peer.max_open == 2, f"{peer.max_open} simultaneous associations"
    assert sorted(peer.received) == sorted(uids), "an object was lost or sent twice"
    assert peer.associations == 6  # 12 objects in batches of 2
    assert {i.lease_owner for i in items(d)} == {None}


def test_tls_destination(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    tls = {
        "enabled": True,
        "ca_certificates": str(pki.ca),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
        "server_name": "localhost",
    }
    anonymous = {"enabled": True, "ca_certificates": str(pki.ca)}
    server = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), "-rc"]
    with storescp(port, tmp_path / "received", *server):
        d = start_daemon(
            dispatch=dispatch_section(
                destination("tls", port, tls=tls),
                destination("no-client-cert", port, tls=anonymous),
                max_attempts=2,
            )
        )
        (uid,) = produce(d, make_sc())
        wait_for(
            lambda: (
                {i.destination: i.state for i in items(d)}
                == {"tls": OutboxState.SENT, "no-client-cert": OutboxState.DEAD}
            ),
            30,
            "TLS delivery, and refusal without a client certificate",
        )
    assert [p.name for p in (tmp_path / "received").iterdir()] == [f"SC.{uid}"]
    refused = next(i for i in items(d) if i.destination == "no-client-cert")
    assert "TLS" in (refused.last_error or ""), refused.last_error


def test_stop_aborts_after_drain_and_gives_objects_back(
    db_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    with storage_peer(hold=60) as peer:  # a PACS that never answers in time
        d = start_daemon(
            database={"url": db_url},
            dispatch=dispatch_section(destination("pacs", peer.port, "PEER"), drain_seconds=0.5),
        )
        produce(d, make_sc(), make_sc())
        wait_for(lambda: peer.entered >= 1, 30, "a C-STORE to hang at the peer")
        started = time.monotonic()
        d.stop()
        assert time.monotonic() - started < 8, "stop did not abort the hanging association"
    states = [(i.state, i.attempts, i.lease_owner) for i in items(d)]
    assert states == [(OutboxState.PENDING, 0, None)] * 2, states


def test_objects_of_a_crashed_sender_go_out_when_its_lease_expires(
    db_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    with storage_peer() as peer:
        d = start_daemon(
            database={"url": db_url},
            dispatch=dispatch_section(destination("pacs", peer.port, "PEER", max_associations=1)),
        )
        assert d.dispatcher is not None
        d.dispatcher.stop(0)  # claim as a process that then dies, then let a live one run
        (uid,) = produce(d, make_sc())
        t = now()
        crashed = outbox.claim(
            d.db,
            "pacs",
            "crashed-host:1:pacs:0",
            t,
            lease_seconds=1,
            max_associations=1,
            limit=5,
            policy=RetryPolicy(5, 0.2, 2),
        )
        assert len(crashed) == 1
        live = Dispatcher(d.settings, d.db, d.archive.root, name="live-host:1")
        live.start()
        try:
            wait_for(all_in(d, OutboxState.SENT, 1), 30, "delivery after lease expiry")
        finally:
            live.stop()
    row = items(d)[0]
    assert row.attempts == 2 and peer.received == [uid]
    assert (row.sent_at or t) >= t + timedelta(seconds=0.9)  # not before the lease ran out


def test_usfmd_serve_sigterm_leaves_nothing_sending(tmp_path: Path) -> None:
    """The real command: SIGTERM while a C-STORE hangs → clean exit, objects back to pending."""
    with storage_peer(hold=60) as peer:
        dispatch = dispatch_section(destination("pacs", peer.port, "PEER"), drain_seconds=0.5)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("USFMD_")},
            "USFMD_STORAGE__DATA_DIR": str(tmp_path / "data"),
            "USFMD_STORAGE__MIN_FREE_SPACE": "0",
            "USFMD_DICOM__PORT": str(free_port()),
            "USFMD_QUEUE__WORKERS": "0",
            "USFMD_DISPATCH__DESTINATIONS": json.dumps(dispatch.pop("destinations")),
            "USFMD_DISPATCH__POLL_SECONDS": "0.05",
            "USFMD_DISPATCH__DRAIN_SECONDS": "0.5",
            "USFMD_LOGGING__JSON": "true",
        }
        settings = load_settings(
            None,
            storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
            dispatch={"destinations": json.loads(env["USFMD_DISPATCH__DESTINATIONS"])},
        )
        db, archive = open_database(settings), open_archive(settings)
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: "dispatcher started" in log_path.read_text(), 30, "serve up")
            for ds in (make_sc(), make_sc()):
                store_result(db, archive, ds, ["pacs"], now())
            wait_for(lambda: peer.entered >= 1, 30, "a C-STORE to hang at the peer")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        with db.read() as session:
            rows = session.execute(select(OutboxItem.state, OutboxItem.attempts)).all()
        db.dispose()
    assert sorted(rows) == [(OutboxState.PENDING, 0)] * 2, rows
    messages = [json.loads(x)["message"] for x in log_path.read_text().splitlines() if x[:1] == "{"]
    assert "aborted associations at shutdown" in messages and "usfmd stopped" in messages


def test_usfmd_worker_dispatch_only_host(tmp_path: Path) -> None:
    """`usfmd worker --dispatch --processes 0`: a host that only sends results."""
    with storage_peer() as peer:
        destinations = [destination("pacs", peer.port, "PEER")]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("USFMD_")},
            "USFMD_STORAGE__DATA_DIR": str(tmp_path / "data"),
            "USFMD_STORAGE__MIN_FREE_SPACE": "0",
            "USFMD_DISPATCH__DESTINATIONS": json.dumps(destinations),
            "USFMD_DISPATCH__POLL_SECONDS": "0.05",
        }
        settings = load_settings(
            None,
            storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
            dispatch={"destinations": destinations},
        )
        db, archive = open_database(settings), open_archive(settings)
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "worker", "--dispatch", "--processes", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            uid = store_result(db, archive, make_sc(), ["pacs"], now()).sop_instance_uid
            wait_for(lambda: peer.received == [uid], 30, "the dispatch-only host to send it")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        with db.read() as session:
            assert session.scalars(select(OutboxItem.state)).all() == [OutboxState.SENT]
        db.dispose()


def test_scu_socket_disables_nagle() -> None:
    """Delayed ACKs would cost ~40 ms per C-STORE (DESIGN.md §7)."""
    with storage_peer() as peer:
        settings = load_settings(
            None, dispatch=dispatch_section(destination("pacs", peer.port, "PEER"))
        )
        target = settings.dispatch.destinations[0]
        contexts = scu.proposed_contexts(
            [
                outbox.ClaimedItem(
                    1, "pacs", "1.2.3", SECONDARY_CAPTURE, ExplicitVRLittleEndian, "x", 1
                )
            ]
        )
        assoc = scu.open_association(target, "USFMD", contexts, settings.dispatch)
        try:
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()
