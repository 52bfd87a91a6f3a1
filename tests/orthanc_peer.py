"""Orthanc as the tests' PACS (DESIGN.md §7): one runner for every test and benchmark.

Orthanc 1.10 starts in well under a second from a JSON configuration; it listens on loopback
only, with a REST API behind basic authentication.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import PEER_ENV, free_port, wait_for

USER, PASSWORD = "tester", "secret"


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log: Path
    #: Where its modality ``usfmd`` is expected to listen (None: no such modality).
    usfmd_port: int | None = None

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            method=method,
            data=data,
            headers={
                "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            },
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"null")

    def sop_instance_uids(self) -> list[str]:
        """Every SOP Instance UID Orthanc holds (one entry per stored instance)."""
        found = []
        for orthanc_id in self.rest("GET", "/instances"):
            tags = self.rest("GET", f"/instances/{orthanc_id}/simplified-tags")
            found.append(tags["SOPInstanceUID"])
        return found


def binary() -> str:
    found = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(found).exists():
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    return found


@contextmanager
def run_orthanc(
    directory: Path,
    *,
    usfmd: dict[str, Any] | None = None,
    max_pdu: int = 131072,
    verbose: bool = False,
    **extra: Any,
) -> Iterator[Orthanc]:
    """Run Orthanc in ``directory`` until the block ends (killed: its storage is temporary).

    ``usfmd`` adds usfmd as the modality ``usfmd`` (``AET``/``Host``/``Port`` and any other
    Orthanc modality keys, merged over AE title USFMD on 127.0.0.1); ``extra`` goes into the
    configuration as it is (e.g. ``StableAge``).
    """
    dicom_port, http_port = free_port(), free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "Name": "TestPACS",
        "StorageDirectory": str(directory / "db"),
        "IndexDirectory": str(directory / "db"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "MaximumPduLength": max_pdu,
        **extra,
    }
    usfmd_port = None
    if usfmd is not None:
        modality = {"AET": "USFMD", "Host": "127.0.0.1", "Port": 11112, **usfmd}
        usfmd_port = int(modality["Port"])
        config["DicomModalities"] = {"usfmd": modality}
    (directory / "orthanc.json").write_text(json.dumps(config))
    log = directory / "orthanc.log"
    args = [binary(), *(["--verbose"] if verbose else []), str(directory / "orthanc.json")]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=directory, env=PEER_ENV, stdout=out, stderr=subprocess.STDOUT
        )
    peer = Orthanc(dicom_port, http_port, process, log, usfmd_port)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {log.read_text()[-2000:]}")
        try:
            return bool(peer.rest("GET", "/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for(ready, 15, "Orthanc's REST API")
        yield peer
    finally:
        process.kill()
        process.wait(timeout=10)
