"""The ``analyze`` job end to end: dcmtk sends a phantom study and a real JPEG cine to an
in-process daemon with worker processes; every instance is decoded, scrubbed and inpainted, and
— no model version being active — its job waits for a model, which ``usfmd status`` shows. Both
index backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from sqlalchemy import func, select

from daemon.db.models import Instance, Job, JobResult, JobState
from daemon.db.studies import ANALYZE
from daemon.service import Daemon
from pipelines.phantom import make_cine, make_phantom
from pipelines.phantom.dicom import write_phantom

from helpers import dcmtk, run_peer, ultrasound_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

USFMD = [sys.executable, "-m", "daemon.cli"]


def _phantom_study(directory: Path) -> dict[str, int]:
    """Three instances of one phantom study; returns file name -> number of frames."""
    directory.mkdir()
    head = make_phantom(31, "head", style="grey")
    files = {
        "head-raw.dcm": ([head], ExplicitVRLittleEndian),
        "head-jpeg.dcm": ([head], JPEGBaseline8Bit),
        "heart-cine.dcm": (make_cine(31, 5, "heart"), JPEGBaseline8Bit),
    }
    for name, (frames, syntax) in files.items():
        write_phantom(directory / name, frames, transfer_syntax=syntax)
    return {name: len(frames) for name, (frames, _) in files.items()}


def _job_states(daemon: Daemon) -> dict[str, int]:
    with daemon.db.read() as session:
        rows = session.execute(
            select(Job.state, func.count()).where(Job.kind == ANALYZE).group_by(Job.state)
        ).all()
    return {state.value: count for state, count in rows}


def _status(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    settings = daemon.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("USFMD_")}
    env["USFMD_STORAGE__DATA_DIR"] = str(settings.storage.data_dir)
    env["USFMD_DATABASE__URL"] = settings.database_url
    return subprocess.run(
        [*USFMD, "status", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_sent_study_is_cleaned_and_awaits_a_model(
    tmp_path: Path, db_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    frames = _phantom_study(tmp_path / "phantom")
    (cine,) = [p for p in ultrasound_files() if p.name == "color3d_jpeg_baseline.dcm"]
    daemon = start_daemon(database={"url": db_url}, queue={"workers": 2, "poll_seconds": 0.1})
    port = str(daemon.settings.dicom.port)
    files = [str(p) for p in sorted((tmp_path / "phantom").iterdir())] + [str(cine)]
    sent = run_peer([dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", port, *files])
    assert sent.returncode == 0, sent.stderr

    wait_for(
        lambda: _job_states(daemon) == {JobState.AWAITING_MODEL.value: 4},
        180,
        "four analyze jobs awaiting a model",
    )
    with daemon.db.read() as session:
        rows = session.execute(
            select(Instance.path, Instance.number_of_frames, JobResult.payload)
            .join(Job, Job.instance_pk == Instance.id)
            .join(JobResult, JobResult.job_pk == Job.id)
        ).all()
    assert len(rows) == 4
    reports = {Path(path).name: (n, payload) for path, n, payload in rows}
    for n, payload in reports.values():
        stages = payload["stages"]
        assert payload["awaiting"] == "no active model version for any task"
        assert stages["frames"] == n and stages["ms_per_frame"]["total"] > 0
        assert stages["band"]["method"] == "detected"
    expected = sorted([*frames.values(), 120])
    assert sorted(n for n, _ in reports.values()) == expected
    phantom = [p for n, p in reports.values() if p["stages"]["rows"] == 600]
    assert len(phantom) == 3 and all(p["stages"]["band"]["rows"] > 0 for p in phantom)
    # The single frames carry calipers: something was inpainted.
    assert all(p["stages"]["masked_fraction"]["max"] > 0 for n, p in reports.values() if n == 1)

    as_json = _status(daemon, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["jobs"] == {"awaiting_model": 4}
    plain = _status(daemon)
    assert plain.returncode == 0 and "awaiting_model" in plain.stdout
