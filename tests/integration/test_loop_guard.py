"""Loop guard (DESIGN.md §4): what usfmd produced is stored when it comes back, never analysed.

Our objects arrive over the wire exactly as in production: sent by dcmtk's dcmsend, or
forwarded back by a PACS (Orthanc) that received them from usfmd's dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from daemon.db.index import find_instance
from daemon.db.models import Job, OutboxItem, OutboxState, Study, StudyState
from daemon.dispatch.dispatcher import destination_names
from daemon.dispatch.results import store_result
from daemon.service import Daemon

from dispatch_peers import make_sc, make_sr, orthanc
from helpers import dcmtk, free_port, run_peer, wait_for

pytestmark = pytest.mark.integration


def _send(d: Daemon, tmp_path: Path, *datasets: Dataset) -> None:
    files = []
    for n, ds in enumerate(datasets):
        path = tmp_path / f"send-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    r = run_peer([dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", str(d.server.port), *files])
    assert r.returncode == 0, r.stdout + r.stderr


def _jobs(d: Daemon) -> int:
    with d.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _study(d: Daemon, uid: str) -> Study:
    with d.db.read() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study is not None
        return study


def _stable(d: Daemon, uid: str) -> Callable[[], bool]:
    return lambda: _study(d, uid).state == StudyState.STABLE


@pytest.mark.parametrize(
    ("manufacturer", "contributing", "jobs"),
    [
        ("usfmd", None, 0),  # our heatmap
        ("Other AI", "usfmd", 0),  # derived from one of our results
        ("usfmd-phantom", None, 1),  # control: the same object from a scanner is analysed
    ],
)
def test_our_secondary_capture_is_stored_but_never_queued(
    db_url: str,
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
    manufacturer: str,
    contributing: str | None,
    jobs: int,
) -> None:
    d = start_daemon(database={"url": db_url})
    sc = make_sc(manufacturer=manufacturer, contributing=contributing)
    _send(d, tmp_path, sc)
    assert d.receiver.counters.stored == 1
    wait_for(_stable(d, sc.StudyInstanceUID), 15, "the study to become stable")
    with d.db.read() as session:
        instance = find_instance(session, sc.SOPInstanceUID)
        assert instance is not None and d.archive.absolute(instance.path).is_file()
        assert instance.analysable is (jobs == 1)
    assert _jobs(d) == jobs


def test_results_forwarded_back_by_the_pacs_are_not_analysed(
    db_url: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Scanner → usfmd → (analysis) → results → Orthanc → Orthanc forwards them to usfmd."""
    usfmd_port = free_port()
    with orthanc(tmp_path / "orthanc", usfmd_port=usfmd_port) as pacs:
        d = start_daemon(
            database={"url": db_url},
            dicom={"port": usfmd_port},
            dispatch={
                "destinations": [
                    {
                        "name": "orthanc",
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                ],
                "poll_seconds": 0.05,
            },
        )
        study = generate_uid()
        source = make_sc(study, manufacturer="usfmd-phantom")
        _send(d, tmp_path, source)
        wait_for(_stable(d, study), 15, "the source study to become stable")
        assert _jobs(d) == 1
        stable_at = _study(d, study).stable_at

        heatmap = make_sc(study)
        names = destination_names(d.settings)
        for ds in (make_sr(source), heatmap):
            store_result(d.db, d.archive, ds, names, datetime.now(UTC))
        assert d.dispatcher is not None
        d.dispatcher.wake()

        def delivered() -> bool:
            with d.db.read() as session:
                states = session.scalars(select(OutboxItem.state)).all()
            return list(states) == [OutboxState.SENT] * 2

        wait_for(delivered, 30, "the results to reach Orthanc")
        ids = [i for i in pacs.rest("GET", "/instances")]
        assert len(ids) == 2
        answer = pacs.rest("POST", "/modalities/usfmd/store", ids)  # the PACS forwards them back
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        wait_for(lambda: d.receiver.counters.duplicates == 2, 15, "both to arrive back")

    assert _jobs(d) == 1, "a result was queued for analysis"
    study_row = _study(d, study)
    assert (study_row.state, study_row.stable_at) == (StudyState.STABLE, stable_at)
