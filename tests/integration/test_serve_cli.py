"""`usfmd serve` as operators run it: a subprocess on env configuration, checked with dcmtk and
the CLI, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from helpers import MOSTLY_COLOUR, dcmtk, free_port, run_peer, ultrasound_files, wait_for

USFMD = [sys.executable, "-m", "daemon.cli"]


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("USFMD_")},
        "USFMD_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "USFMD_STORAGE__MIN_FREE_SPACE": "0",
        "USFMD_DICOM__PORT": str(port),
        "USFMD_STUDY__STABLE_SECONDS": "0.5",
        "USFMD_STUDY__SWEEP_INTERVAL_SECONDS": "0.2",
        "USFMD_LOGGING__JSON": "true",
    }


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*USFMD, *args], env=env, capture_output=True, text=True, timeout=60)


def test_serve_receive_status_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, port)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*USFMD, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "DICOM listener started" in log_path.read_text(), 30, "listener up")
        echo = _cli(env, "echo", f"USFMD@127.0.0.1:{port}", "--calling-ae", "CLI")
        assert echo.returncode == 0 and "status 0x0000" in echo.stdout, echo.stderr
        cleanable = [f for f in ultrasound_files() if f.name not in MOSTLY_COLOUR]
        files = [str(f) for f in cleanable[:3]]
        sent = run_peer([dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", str(port), *files])
        assert sent.returncode == 0, sent.stderr

        def analysed() -> dict | None:
            result = _cli(env, "status", "--json")
            report = json.loads(result.stdout) if result.returncode == 0 else {}
            return report if report.get("jobs") == {"awaiting_model": 3} else None

        # serve's own workers clean every instance; with no model imported, nothing is
        # concluded: each job waits for a model.
        report = wait_for(analysed, 60, "jobs analysed up to the model stage")
        assert isinstance(report, dict)
        assert report["instances"]["total"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert "signal received, shutting down" in messages and "usfmd stopped" in messages


def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    env = {**_env(tmp_path, free_port()), "USFMD_DICOM__AE_TITLE": "BAD\\TITLE"}
    result = _cli(env, "serve")
    assert result.returncode == 2
    assert "dicom.ae_title" in result.stderr and "backslash" in result.stderr


def test_serve_on_a_taken_port_says_so_and_exits(tmp_path: Path) -> None:
    """Another process holds the port: one clear line and exit status 2, not a traceback."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = _cli(_env(tmp_path, port), "serve")
    assert result.returncode == 2, result.stderr
    assert f"usfmd: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "dicom.port" in result.stderr and "Traceback" not in result.stderr
