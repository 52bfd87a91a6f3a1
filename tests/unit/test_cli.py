"""The usfmd command: config errors exit 2 naming the key; db and status work on a fresh dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from daemon.cli import main
from daemon.db.migrate import head_revision


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USFMD_STORAGE__DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_bad_config_exits_2_naming_key(
    data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USFMD_DICOM__PORT", "0")
    assert main(["config", "check"]) == 2
    assert "dicom.port" in capsys.readouterr().err


def test_db_upgrade_then_status_json(data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    head = head_revision(create_engine("sqlite://"))
    assert head is not None and head >= "0002"
    assert f"revision: {head} (head {head})" in out
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["instances"]["total"] == 0 and report["jobs"] == {}


def test_db_downgrade_needs_revision(data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "downgrade"]) == 2
    assert "needs a revision" in capsys.readouterr().err


def test_echo_rejects_malformed_peer(data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["echo", "not-a-peer"]) == 2
    assert "AE@host:port" in capsys.readouterr().err


def test_config_show_hides_secrets(
    data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USFMD_DATABASE__URL", "postgresql+psycopg://u:hunter2@127.0.0.1/x")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and '"ae_title": "USFMD"' in out
