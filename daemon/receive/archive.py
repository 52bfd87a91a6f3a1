"""Durable file archive: what is acknowledged survives a crash or a power cut.

A received file becomes durable in four steps: fsync the partial file, create missing parent
directories (each fsynced into its parent), ``os.replace`` onto the final name, fsync the final
directory. Partial receives live in ``<archive>/.incoming`` on the same file system, so the rename
is atomic; whatever is left there after a crash was never acknowledged and is removed at start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.errors import ArchiveError, DiskFullError

log = logging.getLogger(__name__)

# PS3.5 §9.1: UID components are digits separated by periods, at most 64 characters.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID.match(value))


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (directories make renames and creations durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(directory: Path) -> None:
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another association created it at the same moment
        fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temporary file, fsync, rename, directory fsync."""
    _makedirs_durable(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class Archive:
    """The files of every accepted instance, laid out ``<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path, quarantine: Path, incoming: Path, min_free_bytes: int) -> None:
        self.root = root.resolve()
        self.quarantine_root = quarantine.resolve()
        self.incoming = incoming.resolve()
        self.min_free_bytes = min_free_bytes
        for directory in (self.root, self.quarantine_root, self.incoming):
            _makedirs_durable(directory)

    def discard_incoming(self) -> int:
        """Remove partial receives left by a crash; none of them was ever acknowledged."""
        count = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        return count

    def discard_stale_incoming(self, idle_seconds: float, now: float | None = None) -> int:
        """Remove partial receives untouched for ``idle_seconds``: an association that aborted
        mid-dataset leaves its chunk file behind (pynetdicom does not delete it), and such a
        dataset was never acknowledged. A receive in progress writes at least once per network
        timeout, so a threshold well above it never removes live data."""
        now = time.time() if now is None else now
        count = 0
        for leftover in self.incoming.iterdir():
            try:
                if now - leftover.stat().st_mtime > idle_seconds:
                    leftover.unlink()
                    count += 1
            except FileNotFoundError:
                continue  # archived or discarded meanwhile
        return count

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def check_space(self) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise DiskFullError(
                f"archive file system has {free} bytes free, below the watermark of "
                f"{self.min_free_bytes} (storage.min_free_space)"
            )

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
        for value in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(value):
                raise ArchiveError(f"{value!r} is not a valid DICOM UID (PS3.5 §9.1)")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def store(self, received: Path, relative: str) -> int:
        """Make ``received`` durable at ``relative``; return its size. ``received`` is consumed."""
        fsync_path(received)
        final = self.root / relative
        _makedirs_durable(final.parent)
        try:
            os.replace(received, final)
        except OSError as exc:
            if exc.errno != 18:  # EXDEV: partial file on another file system
                raise
            shutil.copyfile(received, final.with_suffix(".copy"))
            fsync_path(final.with_suffix(".copy"))
            os.replace(final.with_suffix(".copy"), final)
            received.unlink()
        fsync_path(final.parent)
        return final.stat().st_size

    def quarantine(self, received: Path, reason: str, context: dict[str, Any]) -> Path:
        """Keep a refused file with a JSON note saying why, for an operator to inspect."""
        now = datetime.now(UTC)
        day = self.quarantine_root / now.strftime("%Y%m%d")
        name = f"{now.strftime('%H%M%S')}-{uuid.uuid4().hex[:12]}"
        _makedirs_durable(day)
        target = day / f"{name}.dcm"
        fsync_path(received)
        os.replace(received, target)
        note = {"reason": reason, "received_at": now.isoformat(), **context}
        atomic_write_bytes(day / f"{name}.json", json.dumps(note, indent=2).encode())
        log.warning("quarantined a refused dataset", extra={"file": str(target), "reason": reason})
        return target
