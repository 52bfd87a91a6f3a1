"""TLS contexts for DICOM connections (PS3.15 Annex B.9, BCP 195: TLS 1.2 or newer).

One certificate identifies usfmd both as a server (modalities calling in) and as a client (when
usfmd calls a peer back with a commitment report, or sends results), so it should carry both
serverAuth and clientAuth extended key usage.
"""

from __future__ import annotations

import ssl

from daemon.config import TLSSettings
from daemon.errors import ConfigError


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """For the listener: our certificate, optionally requiring client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """For associations we open: present our certificate, verify the peer's chain.

    The peer's certificate must chain to ``tls.ca_certificates``. Host names are not checked:
    DICOM peers are configured by address and their certificates rarely name it; the chain and
    the configured address together identify the peer.
    """
    if not tls.enabled or tls.ca_certificates is None:
        raise ConfigError(
            "calling a peer over TLS needs dicom.tls enabled with certificate, private_key "
            "and ca_certificates"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
