"""Results and Storage SCP peers for the outbox, dispatcher and loop-guard tests.

Results are built with highdicom exactly as usfmd's report builders do (Manufacturer ``usfmd``).
Peers: a pynetdicom Storage SCP that counts simultaneous associations and answers a chosen
status, dcmtk's storescp, and Orthanc (DESIGN.md §7), all on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from helpers import PEER_ENV, dcmtk, free_port, wait_for
from orthanc_peer import Orthanc, run_orthanc

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def make_sc(
    study_uid: str | None = None,
    manufacturer: str = "usfmd",
    patient_id: str = "PID-DISPATCH-1",
    size: int = 32,
    contributing: str | None = None,
) -> Dataset:
    """A small RGB Secondary Capture, as a heatmap result is (highdicom ``SCImage``)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[: size // 2, : size // 2] = (255, 64, 0)
    equipment = None
    if contributing is not None:
        equipment = [
            hd.ContributingEquipment(
                manufacturer=contributing,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
            )
        ]
    return hd.sc.SCImage(
        pixels,
        "RGB",
        8,
        "PATIENT",
        study_uid or generate_uid(),
        generate_uid(),
        900,
        generate_uid(),
        1,
        manufacturer,
        patient_id=patient_id,
        patient_name="Dispatch^Test",
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=equipment,
    )


def make_sr(evidence: Dataset) -> Dataset:
    """A TID 1500 Comprehensive 3D SR with one qualitative finding, in ``evidence``'s study."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="finding 1"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding, value=hd.sr.CodedConcept("X1", "99USFMD", "test finding")
            )
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid()
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("P5-B3121", "SRT", "Fetal echocardiography"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="usfmd",
    )


# -- a pynetdicom Storage SCP that watches how it is used ---------------------------------------


@dataclass
class StoragePeer:
    """Stores nothing to disk; records what arrived and how many associations overlapped."""

    port: int
    ae_title: str = "PEER"
    #: Status every C-STORE is answered with.
    answer: int = 0x0000
    #: Each C-STORE waits this long for ``gate`` (a slow PACS); set ``gate`` to let all through.
    hold: float = 0.0
    gate: threading.Event = field(default_factory=threading.Event)
    #: Reject associations not addressed to ``ae_title`` (PS3.8 reason 7).
    require_called_aet: bool = False
    received: list[str] = field(default_factory=list)
    #: C-STOREs that reached the handler (before ``hold``).
    entered: int = 0
    open_now: int = 0
    max_open: int = 0
    associations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def _opened(self, event: Event) -> None:
        with self.lock:
            self.open_now += 1
            self.associations += 1
            self.max_open = max(self.max_open, self.open_now)

    def _closed(self, event: Event) -> None:
        with self.lock:
            self.open_now -= 1

    def _store(self, event: Event) -> int:
        with self.lock:
            self.entered += 1
        if self.hold:
            self.gate.wait(self.hold)
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.answer

    def start(self, syntaxes: list[str] | None = None) -> StoragePeer:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 64
        ae.require_called_aet = self.require_called_aet
        for sop_class in (SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR):
            if syntaxes is None:
                ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
            else:
                ae.add_supported_context(sop_class, syntaxes)
        handlers = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ESTABLISHED, self._opened),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
        ]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        self.gate.set()
        if self.server is not None:
            self.server.shutdown()


@contextmanager
def storage_peer(**kwargs: Any) -> Iterator[StoragePeer]:
    syntaxes = kwargs.pop("syntaxes", None)
    peer = StoragePeer(port=kwargs.pop("port", None) or free_port(), **kwargs).start(syntaxes)
    try:
        yield peer
    finally:
        peer.stop()


# -- dcmtk storescp -----------------------------------------------------------------------------


@contextmanager
def storescp(port: int, out: Path, *args: str, ae_title: str = "PACS") -> Iterator[Path]:
    """dcmtk's storescp on ``port`` writing into ``out``; killed afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"storescp-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", ae_title, "-od", str(out), *args, str(port)],
            env=PEER_ENV,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _listening(port, process, log), 10, f"storescp on port {port}")
        yield out
    finally:
        process.kill()
        process.wait(timeout=10)


def _listening(port: int, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"storescp exited: {log.read_text()[-2000:]}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def write_ct_only_profile(path: Path) -> tuple[str, str]:
    """A storescp association profile that accepts CT Image Storage only."""
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[CTOnly]\n"
        "PresentationContext1 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[CTOnly]\nPresentationContexts = CTOnly\n"
    )
    return str(path), "CTOnly"


# -- Orthanc ----------------------------------------------------------------------------------


@contextmanager
def orthanc(directory: Path, usfmd_port: int | None = None) -> Iterator[Orthanc]:
    """Orthanc 1.10 as the PACS (DESIGN.md §7); knows usfmd as modality ``usfmd``."""
    with run_orthanc(directory, usfmd={"Port": usfmd_port or 11112}) as peer:
        yield peer


# -- a throw-away PKI (openssl CLI), as tests/integration/test_security.py makes it ------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", ca_key, "-out", ca, "-subj", "/CN=usfmd-dispatch-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    issued = []
    for name, ext in (
        ("server", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        key, csr, crt = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "crt"))
        (directory / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/CN={name}")  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-days", "2", "-out", crt, "-extfile", directory / f"{name}.ext")  # fmt: skip
        issued += [crt, key]
    return Pki(ca, *issued)
