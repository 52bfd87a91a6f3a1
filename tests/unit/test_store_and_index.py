"""C-STORE: the file's fsync/rename overlaps the index statements, yet Success means both."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import event, func, select

from daemon.db.models import Instance
from daemon.receive import status
from daemon.receive.archive import Archive

from helpers import ultrasound_files

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def _us_file() -> Path:
    for path in ultrasound_files():
        ds = dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == US_IMAGE_STORAGE:
            return path
    raise AssertionError("no US Image Storage file in the corpus")


def _send(port: int, path: Path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(US_IMAGE_STORAGE, str(dcmread(path).file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="USFMD")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _rows(daemon) -> int:
    with daemon.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_commit_waits_for_the_durable_file(start_daemon, monkeypatch):
    d = start_daemon()
    marks: dict[str, float] = {}
    real_store = Archive.store

    def slow_store(self, received, relative):
        time.sleep(0.3)  # much longer than the index statements
        size = real_store(self, received, relative)
        marks["rows_when_stored"] = _rows(d)  # another connection: nothing committed yet
        marks["stored"] = time.monotonic()
        return size

    def on_commit(_conn) -> None:
        # Only the association's commits: the stability sweep commits on its own schedule.
        if threading.current_thread().name.startswith("AcceptorThread"):
            marks.setdefault("commit", time.monotonic())

    monkeypatch.setattr(Archive, "store", slow_store)
    event.listen(d.db.engine, "commit", on_commit)
    assert _send(d.server.port, _us_file()) == status.SUCCESS
    assert marks["rows_when_stored"] == 0
    assert marks["stored"] <= marks["commit"]
    assert _rows(d) == 1 and d.receiver.counters.stored == 1


def test_archive_failure_rolls_back_and_answers_failure(start_daemon, monkeypatch):
    d = start_daemon()
    helper_done = threading.Event()

    def failing_store(self, received, relative):
        time.sleep(0.1)
        helper_done.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Archive, "store", failing_store)
    assert _send(d.server.port, _us_file()) == status.PROCESSING_FAILURE
    assert helper_done.is_set()  # the answer came after the helper finished
    assert _rows(d) == 0 and d.receiver.counters.failures == 1
