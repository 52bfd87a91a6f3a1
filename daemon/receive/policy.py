"""Who may associate: a pure decision over calling/called AE titles and the peer's address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from daemon.config import DicomSettings, KnownAE
from daemon.receive import status


@dataclass(frozen=True, slots=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 Table 9-21) and the reason we log."""

    result: int
    source: int
    reason: int
    why: str


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _same_host(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a.split("%")[0]), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
        first = first.ipv4_mapped
    return first == second


def known_ae(dicom: DicomSettings, calling_ae: str, peer_host: str) -> KnownAE | None:
    """The configured entry matching this AE title (and, where bound, this host)."""
    for ae in dicom.calling_aes:
        if ae.ae_title == calling_ae and (ae.host is None or _same_host(peer_host, ae.host)):
            return ae
    return None


def decide(
    dicom: DicomSettings, calling_ae: str, called_ae: str, peer_host: str
) -> Rejection | None:
    """Return ``None`` to accept, or the rejection to send.

    Called AE first (PS3.8 §9.3.4: called-AE-title-not-recognized), then the calling AE: listed
    entries (optionally bound to an address) are accepted, anyone else only from loopback when
    ``accept_any_from_loopback`` is on.
    """
    calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
    if dicom.require_called_ae_title and called_ae != dicom.ae_title:
        return Rejection(
            status.REJECTED_PERMANENT,
            status.SOURCE_SERVICE_USER,
            status.REASON_CALLED_AE_NOT_RECOGNIZED,
            f"called AE title {called_ae!r} is not ours ({dicom.ae_title!r})",
        )
    if known_ae(dicom, calling_ae, peer_host) is not None:
        return None
    if dicom.accept_any_from_loopback and is_loopback(peer_host):
        return None
    listed = any(ae.ae_title == calling_ae for ae in dicom.calling_aes)
    why = (
        f"calling AE title {calling_ae!r} is listed for another host, not {peer_host}"
        if listed
        else f"calling AE title {calling_ae!r} from {peer_host} is not in dicom.calling_aes"
    )
    return Rejection(
        status.REJECTED_PERMANENT,
        status.SOURCE_SERVICE_USER,
        status.REASON_CALLING_AE_NOT_RECOGNIZED,
        why,
    )
