"""Log formats: JSON lines carry the extra= context; pynetdicom is capped at WARNING."""

from __future__ import annotations

import json
import logging

import pytest

from daemon.logs import JsonFormatter, PlainFormatter, configure_logging


def _record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "daemon.x", "levelname": "INFO", "levelno": 20, "msg": "stored %d", "args": (3,)}
    )
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_with_context() -> None:
    line = JsonFormatter().format(_record(calling_ae="US1", sop_instance_uid="1.2.3"))
    entry = json.loads(line)
    assert entry["message"] == "stored 3"
    assert entry["calling_ae"] == "US1" and entry["sop_instance_uid"] == "1.2.3"
    assert entry["level"] == "INFO" and entry["time"].endswith("+00:00")


def test_plain_line_appends_context() -> None:
    line = PlainFormatter().format(_record(calling_ae="US1"))
    assert line.endswith("stored 3 calling_ae=US1")


def test_configure_is_idempotent_and_caps_pynetdicom() -> None:
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not getattr(h, "_usfmd", False)]
    configure_logging("DEBUG", json_format=True)
    configure_logging("INFO", json_format=False)
    ours = [h for h in root.handlers if getattr(h, "_usfmd", False)]  # removed by conftest
    assert len(ours) == 1 and len(root.handlers) == len(foreign) + 1
    assert logging.getLogger("pynetdicom").level == logging.WARNING


@pytest.mark.parametrize("fmt", [JsonFormatter(), PlainFormatter()])
def test_exceptions_are_formatted(fmt: logging.Formatter) -> None:
    try:
        raise OSError("disk gone")
    except OSError:
        import sys

        record = _record()
        record.exc_info = sys.exc_info()
    assert "disk gone" in fmt.format(record)
