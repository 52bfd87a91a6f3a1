"""Shared test utilities: polling, ports, peers, the real ultrasound corpus."""

from __future__ import annotations

import functools
import glob
import os
import platform
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pydicom
from sqlalchemy import select

from daemon.db.engine import Database
from daemon.db.index import InstanceHeader, record_instance
from daemon.db.models import Study
from daemon.db.studies import mark_stable
from daemon.receive.archive import Archive

DCMTK = Path("/usr/bin")
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    msg: str = "",
    max_delay: float = 0.25,
) -> object:
    """Poll until ``predicate()`` is truthy; fail with ``msg`` after ``timeout`` seconds.

    The delay between polls grows to ``max_delay``: a timing measured with it is late by up to
    that much (benchmarks pass a small one)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {msg or predicate}")
        time.sleep(delay)
        delay = min(delay * 1.5, max_delay)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk(tool: str) -> str:
    """Full path of a dcmtk binary (pynetdicom's same-named venv scripts shadow it on PATH)."""
    path = DCMTK / tool
    if not path.exists():
        raise RuntimeError(f"{path} missing: install dcmtk (tests/run.sh does)")
    return str(path)


def run_peer(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=PEER_ENV, capture_output=True, text=True, timeout=timeout)


def _data_dirs() -> list[str]:
    import data_store  # the pydicom-data package

    return [
        os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"),
        os.path.join(os.path.dirname(data_store.__file__), "data"),
    ]


@functools.cache
def ultrasound_corpus() -> dict[str, Path]:
    """:func:`ultrasound_files` by file name, read without the corpus's known warnings (e.g. an
    implicit VR sequence in an explicit file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {path.name: path for path in ultrasound_files()}


#: Corpus files with a frame that is mostly colour, refused by ``pipeline.max_inpainted_fraction``
#: (0.25): file -> (frame, share its mask covers). A sector under a yellow colour map, and the
#: second frame of the OB files, whose sector is filled blue.
MOSTLY_COLOUR = {
    "ExplVR_BigEnd.dcm": (0, "95.7%"),
    "OBXXXX1A_2frame.dcm": (1, "37.6%"),
    "OBXXXX1A_expb_2frame.dcm": (1, "37.6%"),
    "OBXXXX1A_rle_2frame.dcm": (1, "37.6%"),
}


def ultrasound_files() -> tuple[Path, ...]:
    """Every ultrasound (Modality US) DICOM file shipped by pydicom and pydicom-data."""
    found = []
    for directory in _data_dirs():
        for name in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
            if not os.path.isfile(name):
                continue
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - the corpus holds many non-DICOM files
                continue
            if ds.get("Modality") == "US" and "PixelData" in pydicom.dcmread(name):
                found.append(Path(name))
    if len(found) < 20:
        raise RuntimeError(f"expected the pydicom + pydicom-data US corpus, found {len(found)}")
    return tuple(found)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def archive_stable(db: Database, archive: Archive, ds: pydicom.Dataset, now: datetime) -> str:
    """Store and index ``ds`` as receive does and make its study stable (queues its analyze
    job); return its archive-relative path."""
    relative = Archive.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path = archive.absolute(relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    header = InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    with db.write() as session:
        record_instance(
            session, header, path=relative, size_bytes=path.stat().st_size, calling_ae=None, now=now
        )
    with db.write() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == ds.StudyInstanceUID))
        assert study is not None and mark_stable(session, study, now) == 1
    return relative


def cpu_model() -> str:
    """The CPU's model name, for benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
