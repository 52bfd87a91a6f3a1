"""Association policy: a table of callers, called titles and addresses."""

from __future__ import annotations

import pytest

from daemon.config import DicomSettings, KnownAE
from daemon.receive import status
from daemon.receive.policy import decide, is_loopback

LISTED = DicomSettings(
    accept_any_from_loopback=False,
    calling_aes=(KnownAE(ae_title="VOLUSON"), KnownAE(ae_title="BOUND", host="10.0.0.7")),
)


@pytest.mark.parametrize(
    ("dicom", "calling", "called", "host", "reason"),
    [
        (DicomSettings(), "ANYONE", "USFMD", "127.0.0.1", None),
        (DicomSettings(), "ANYONE", "USFMD", "::1", None),
        (DicomSettings(), "ANYONE", "USFMD", "::ffff:127.0.0.1", None),
        (DicomSettings(), "ANYONE", "USFMD", "10.0.0.9", status.REASON_CALLING_AE_NOT_RECOGNIZED),
        (DicomSettings(), "ANYONE", "OTHER", "127.0.0.1", status.REASON_CALLED_AE_NOT_RECOGNIZED),
        (LISTED, "VOLUSON", "USFMD", "10.9.9.9", None),
        (LISTED, "ANYONE", "USFMD", "127.0.0.1", status.REASON_CALLING_AE_NOT_RECOGNIZED),
        (LISTED, "BOUND", "USFMD", "10.0.0.7", None),
        (LISTED, "BOUND", "USFMD", "10.0.0.8", status.REASON_CALLING_AE_NOT_RECOGNIZED),
        (LISTED, "voluson", "USFMD", "10.9.9.9", status.REASON_CALLING_AE_NOT_RECOGNIZED),
        (DicomSettings(require_called_ae_title=False), "X", "OTHER", "127.0.0.1", None),
    ],
)
def test_decide(
    dicom: DicomSettings, calling: str, called: str, host: str, reason: int | None
) -> None:
    rejection = decide(dicom, calling, called, host)
    if reason is None:
        assert rejection is None
    else:
        assert rejection is not None
        assert (rejection.result, rejection.source, rejection.reason) == (
            status.REJECTED_PERMANENT,
            status.SOURCE_SERVICE_USER,
            reason,
        )


def test_rejection_explains_host_binding() -> None:
    rejection = decide(LISTED, "BOUND", "USFMD", "10.0.0.8")
    assert rejection is not None and "another host" in rejection.why


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("10.0.0.1", False), ("x", False)],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected
