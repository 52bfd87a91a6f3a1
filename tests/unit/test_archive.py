"""Archive: atomic durable store, UID-safe paths, quarantine notes, watermark, crash leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.errors import ArchiveError, DiskFullError
from daemon.receive import archive as archive_mod
from daemon.receive.archive import Archive, atomic_write_bytes, is_valid_uid


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    root = tmp_path / "archive"
    return Archive(root, tmp_path / "quarantine", root / ".incoming", min_free_bytes=0)


def _incoming(archive: Archive, data: bytes = b"DICM-ish") -> Path:
    path = archive.incoming / "partial.dcm"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.1.2", True),
        ("1.2.3", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("1.2.a", False),
        ("../etc/passwd", False),
        ("1..2", False),
        ("", False),
    ],
)
def test_uid_validation(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


def test_store_is_a_rename_with_fsyncs(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = archive_mod.fsync_path
    monkeypatch.setattr(archive_mod, "fsync_path", lambda p: (synced.append(str(p)), real(p)))
    received = _incoming(archive, b"x" * 1000)
    relative = Archive.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    size = archive.store(received, relative)
    final = archive.absolute(relative)
    assert size == 1000 and final.read_bytes() == b"x" * 1000
    assert not received.exists()
    # file before the rename, then every created directory's parent, then the final directory
    assert synced[0] == str(received)
    assert synced[-1] == str(final.parent)
    assert str(archive.root) in synced  # the study directory's creation was made durable


def test_relative_path_refuses_unsafe_uids() -> None:
    with pytest.raises(ArchiveError, match="not a valid DICOM UID"):
        Archive.relative_path("1.2", "../..", "1.3")


def test_quarantine_keeps_file_and_reason(archive: Archive) -> None:
    received = _incoming(archive, b"garbage")
    kept = archive.quarantine(received, "cannot parse dataset", {"calling_ae": "US1"})
    assert kept.read_bytes() == b"garbage"
    note = json.loads(kept.with_suffix(".json").read_text())
    assert note["reason"] == "cannot parse dataset" and note["calling_ae"] == "US1"
    assert kept.is_relative_to(archive.quarantine_root)


def test_watermark(tmp_path: Path) -> None:
    root = tmp_path / "a"
    full = Archive(root, tmp_path / "q", root / ".incoming", min_free_bytes=1 << 62)
    with pytest.raises(DiskFullError, match="watermark"):
        full.check_space()
    Archive(root, tmp_path / "q", root / ".incoming", min_free_bytes=0).check_space()


def test_discard_incoming_removes_unacknowledged(archive: Archive) -> None:
    _incoming(archive)
    (archive.incoming / "other.dcm").write_bytes(b"1")
    assert archive.discard_incoming() == 2
    assert list(archive.incoming.iterdir()) == []


def test_discard_stale_incoming_spares_receives_in_progress(archive: Archive) -> None:
    stale, live = archive.incoming / "aborted.dcm", archive.incoming / "arriving.dcm"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    now = live.stat().st_mtime
    os.utime(stale, (now - 900, now - 900))
    assert archive.discard_stale_incoming(600, now=now + 1) == 1
    assert not stale.exists() and live.exists()


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    atomic_write_bytes(target, b"{}")
    atomic_write_bytes(target, b'{"v": 2}')
    assert target.read_bytes() == b'{"v": 2}'
    assert os.listdir(target.parent) == ["state.json"]
