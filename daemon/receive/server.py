"""The DICOM listener: pynetdicom AE, presentation contexts, association policy and TLS.

Two things pynetdicom leaves to us are done here. The association policy (calling AE bound to a
host, loopback default) runs inside ACSE negotiation so that refusals are proper A-ASSOCIATE-RJ
PDUs. The TLS handshake runs in the connection's own thread, not the accept loop, so one slow or
hostile client cannot stall the others.
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from daemon.config import DicomSettings
from daemon.errors import ListenError
from daemon.receive import reactor, status
from daemon.receive.handlers import Receiver
from daemon.receive.policy import decide
from daemon.receive.sop_classes import (
    STORAGE_COMMITMENT_PUSH,
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    preferred_syntax,
)
from daemon.tls import server_context

log = logging.getLogger(__name__)


class _PolicyACSE(ACSE):
    """ACSE that applies usfmd's association policy before pynetdicom's own negotiation."""

    dicom: DicomSettings

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = str(self.assoc.requestor.address)
        rejection = decide(self.dicom, calling, called, host)
        if rejection is not None:
            log.warning(
                "association rejected: %s",
                rejection.why,
                extra={
                    "calling_ae": calling,
                    "called_ae": called,
                    "peer": host,
                    "reason": rejection.reason,
                },
            )
            self.requestor.ae_title = calling
            self.send_reject(rejection.result, rejection.source, rejection.reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()

    def send_accept(self) -> None:
        # pynetdicom picks, per context, the first syntax in *our* list that the requester
        # proposed; DICOM leaves the choice to the acceptor, and we follow the requester's
        # order instead so that files arrive in the syntax they are held in (see
        # preferred_syntax). Only the choice among syntaxes already found acceptable changes.
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        proposed = {cx.context_id: cx for cx in request.presentation_context_definition_list}
        supported = {cx.abstract_syntax: cx for cx in self.acceptor.supported_contexts}
        for context in self.assoc.accepted_contexts:
            rq = proposed.get(context.context_id)
            ours = supported.get(context.abstract_syntax)
            if rq is None or ours is None:
                continue
            choice = preferred_syntax(rq.transfer_syntax, ours.transfer_syntax)
            if choice is not None:
                context.transfer_syntax = [choice]
        super().send_accept()


class _RequestHandler(RequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        # Ack every segment at once: delayed ACKs cost ~40 ms per C-STORE response. TLS sockets
        # need it as much as plain ones (an SSLSocket is a socket.socket).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(self.server.ae.acse_timeout)
                sock.do_handshake()
                sock.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                log.warning(
                    "TLS handshake failed",
                    extra={"peer": self.client_address[0], "error": str(exc)[:200]},
                )
                _close_quietly(sock)
                return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        acse = _PolicyACSE(assoc)
        acse.dicom = self.server.dicom
        assoc.acse = acse
        _unbind_standard_logging(assoc)
        # Event-driven loops instead of 1 ms polling, data sets written straight to the
        # archive's incoming folder (see reactor).
        return reactor.install(assoc, self.server.incoming)


#: pynetdicom binds these to every association to log each PDU and DIMSE message at DEBUG/INFO;
#: each call builds an Event and log text, per 128 KiB PDU, even when nothing is logged.
_STANDARD_LOGGING = (
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
)


def _unbind_standard_logging(assoc: Association) -> None:
    """Drop pynetdicom's per-PDU logging handlers unless its logger would print them."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_LOGGING:
        assoc.unbind(event, handler)


class _Server(ThreadedAssociationServer):
    dicom: DicomSettings
    incoming: Path

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def build_ae(dicom: DicomSettings) -> AE:
    ae = AE(ae_title=dicom.ae_title)
    ae.maximum_associations = dicom.max_associations
    ae.maximum_pdu_size = dicom.max_pdu
    ae.acse_timeout = dicom.acse_timeout
    ae.dimse_timeout = dicom.dimse_timeout
    ae.network_timeout = dicom.network_timeout
    ae.require_called_aet = False  # our ACSE does it, with the loopback/host rules
    ae.add_supported_context(VERIFICATION)
    # PS3.4 J.3.1: we are the SCP; the requester may also ask us to take the SCU role for reports.
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def _freeze_start_up_objects() -> None:
    """Exclude what exists at the first start (modules, settings, engine) from collections.

    It lives as long as the process. pynetdicom's server forces a full ``gc.collect()`` every
    60 polls, which walked ~126k start-up objects in 150-190 ms with the GIL held, stalling
    every association mid-transfer; frozen, a collection only walks what came after. Once per
    process: later starts (tests) would only freeze their predecessors' leftovers.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()  # garbage now would otherwise be frozen for good
        gc.freeze()


class DicomServer:
    """Listens for associations until :meth:`stop`; each association runs in its own thread."""

    def __init__(self, dicom: DicomSettings, receiver: Receiver) -> None:
        from pynetdicom import _config

        # Each data set is streamed to a file instead of memory (large cines), straight into
        # the archive's incoming folder so that archiving is a rename on the same file system.
        # The event-driven associations do it themselves (reactor.install); pynetdicom's own
        # chunked receive is the fallback for a pynetdicom whose loops we have not checked, and
        # it writes where tempfile says, for the whole process.
        if reactor.supported():
            _config.STORE_RECV_CHUNKED_DATASET = False
        else:
            _config.STORE_RECV_CHUNKED_DATASET = True
            tempfile.tempdir = str(receiver.archive.incoming)
        self.dicom = dicom
        self.receiver = receiver
        self.ae = build_ae(dicom)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self.receiver.on_c_echo),
            (evt.EVT_C_STORE, self.receiver.on_c_store),
            (evt.EVT_N_ACTION, self.receiver.on_n_action),
        ]
        ssl_context = server_context(self.dicom.tls) if self.dicom.tls.enabled else None
        try:
            server = cast(
                _Server,
                self.ae.make_server(
                    (self.dicom.host, self.dicom.port),
                    evt_handlers=handlers,
                    ssl_context=ssl_context,
                    server_class=_Server,
                    request_handler=_RequestHandler,
                ),
            )
        except OSError as exc:  # port taken, address not on this host, no permission (< 1024)
            raise ListenError(
                f"cannot listen on {self.dicom.host}:{self.dicom.port} ({exc.strerror or exc}): "
                "another process may hold the port (another usfmd, a DICOM service); stop it "
                "or set dicom.host / dicom.port"
            ) from exc
        server.dicom = self.dicom
        server.incoming = self.receiver.archive.incoming
        self.ae._servers.append(server)  # so that server.shutdown() can unregister it
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dicom-listener",
            daemon=True,
        )
        _freeze_start_up_objects()
        self._thread.start()
        log.info(
            "DICOM listener started",
            extra={
                "ae_title": self.dicom.ae_title,
                "host": self.dicom.host,
                "port": self.port,
                "tls": ssl_context is not None,
            },
        )

    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace_seconds``, then abort."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        deadline = threading.Event()
        waited = 0.0
        while self.ae.active_associations and waited < grace_seconds:
            deadline.wait(0.1)
            waited += 0.1
        for assoc in self.ae.active_associations:
            assoc.abort()
        self._server = None
        log.info("DICOM listener stopped")


__all__ = ["DicomServer", "build_ae", "status"]
