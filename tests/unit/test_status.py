"""Statuses: named constants only, each a valid value for the service that sends it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from daemon.receive import status

RECEIVE = Path(__file__).resolve().parents[2] / "daemon" / "receive"
HEX_STATUS = re.compile(r"\b0x[0-9A-Fa-f]{4}\b")


@pytest.mark.parametrize("module", ["handlers.py", "commitment.py", "server.py", "policy.py"])
def test_no_bare_hex_status_outside_status_module(module: str) -> None:
    source = (RECEIVE / module).read_text()
    assert HEX_STATUS.findall(source) == [], f"{module} must use daemon.receive.status names"


@pytest.mark.parametrize(
    "code",
    [
        status.SUCCESS,
        status.STORE_OUT_OF_RESOURCES,
        status.STORE_DATA_SET_MISMATCH,
        status.STORE_CANNOT_UNDERSTAND,
        status.PROCESSING_FAILURE,
    ],
)
def test_c_store_statuses_are_in_ps3_4_table_b2_1(code: int) -> None:
    # pynetdicom carries PS3.4 Table B.2-1 plus the general PS3.7 Annex C statuses.
    assert code in STORAGE_SERVICE_CLASS_STATUS or 0xC000 <= code <= 0xCFFF


def test_status_categories() -> None:
    assert 0xA700 <= status.STORE_OUT_OF_RESOURCES <= 0xA7FF  # Refused: Out of Resources
    assert 0xA900 <= status.STORE_DATA_SET_MISMATCH <= 0xA9FF  # Error: Data Set mismatch
    assert 0xC000 <= status.STORE_CANNOT_UNDERSTAND <= 0xCFFF  # Error: Cannot understand
    assert status.COMMIT_EVENT_ALL_SUCCESS == 1 and status.COMMIT_EVENT_FAILURES_EXIST == 2
