"""C-ECHO SCU (PS3.7 §9.1.5): check that a peer answers, and how fast."""

from __future__ import annotations

import time

from pynetdicom import AE

from daemon.errors import UsfmdError
from daemon.receive.sop_classes import VERIFICATION


def echo(
    calling_ae: str, called_ae: str, host: str, port: int, timeout: float = 10.0
) -> tuple[int, float]:
    """Return the peer's C-ECHO status and the round trip in seconds; raise if no association."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise UsfmdError(f"cannot associate with {called_ae}@{host}:{port}: {why}")
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise UsfmdError(f"{called_ae}@{host}:{port} did not answer the C-ECHO")
    return int(rsp.Status), time.perf_counter() - started
