"""The DICOM listener: Verification and Storage SCP (PS3.4 Annex A and B).

The C-STORE handler only stores: it checks the UIDs it needs for the file name, writes the peer's
encoded bytes atomically (``reader.spool``) and answers Success; it never decodes pixel data, runs a
model or opens a connection. Typed errors become a named DIMSE status here, at the edge.

Who gets in: with TLS configured the port speaks only TLS (``reader.tls``, PS3.15 B.9), and the
handshake runs in the association's thread before anything DICOM is read. When the A-ASSOCIATE-RQ
arrives, the allow-list (``reader.access``) is applied; a caller it refuses gets A-ASSOCIATE-RJ
"calling AE title not recognized" (PS3.8 9.3.4) and no presentation context is negotiated.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, cast

import structlog
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from reader import dimse, tls
from reader.access import AccessDecision, AccessPolicy, Verdict
from reader.assemble import CompletionTracker
from reader.associations import AssociationLog
from reader.audit import AuditTrail
from reader.config import NodeConfig
from reader.errors import ConfigError, InputRejected, OutOfResources, StorageError
from reader.intake import instance_ids, store_received
from reader.metrics import PROTOCOL_DIMSE, NodeMetrics, rejection_reason
from reader.receiver import tune_association
from reader.spool import Spool

__all__ = ["IMAGE_STORAGE_CLASSES", "TRANSFER_SYNTAXES", "StorageSCP"]

log = structlog.get_logger(__name__)

PRIORITY_HIGH = 0x0001  # C-STORE-RQ Priority (0000,0700): LOW 0x0002, MEDIUM 0x0000, HIGH 0x0001 (PS3.7)

IMAGE_STORAGE_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    PositronEmissionTomographyImageStorage,
)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def _handle_store(  # noqa: PLR0917 - pynetdicom passes a handler's arguments by position
        event: evt.Event, spool: Spool, tracker: CompletionTracker, associations: AssociationLog,
        metrics: NodeMetrics, audit: AuditTrail | None = None) -> int:
    """C-STORE: store atomically (``reader.intake``, as STOW-RS does), then answer; the association
    log, the metrics and the audit trail count the instance (in memory). Runs in the association's
    thread."""
    status, reason = _store(event, spool, tracker, metrics, audit)
    if status == dimse.SUCCESS:
        associations.stored(id(event.assoc))
    else:
        associations.refused(id(event.assoc), reason)
        metrics.instance_refused(reason)
    return status


def _store(event: evt.Event, spool: Spool, tracker: CompletionTracker, metrics: NodeMetrics,
           audit: AuditTrail | None) -> tuple[int, str]:
    """Store one instance; the DIMSE status and, when refused, the reason's name."""
    started = time.perf_counter()
    request = cast(C_STORE, event.request)
    try:
        ids = instance_ids(event.dataset, request.AffectedSOPInstanceUID)  # header parsed lazily
        data = event.encoded_dataset()
        store_received(spool, tracker, id(event.assoc), ids, data, stat=request.Priority == PRIORITY_HIGH)
    except OutOfResources as exc:
        log.warning("instance.refused", reason="out_of_resources", detail=str(exc))
        return dimse.OUT_OF_RESOURCES, "out_of_resources"
    except InputRejected as exc:
        log.warning("instance.rejected", reason=exc.reason, detail=exc.detail,
                    calling_ae=event.assoc.requestor.ae_title)
        return dimse.CANNOT_UNDERSTAND, exc.reason
    except StorageError as exc:
        log.error("instance.store_failed", detail=str(exc))
        return dimse.OUT_OF_RESOURCES, "storage_error"
    requestor = event.assoc.requestor
    metrics.instance_received(PROTOCOL_DIMSE, str(requestor.ae_title), len(data))
    if audit is not None:
        audit.instance_received(id(event.assoc), calling_ae=str(requestor.ae_title),
                                address=str(requestor.address), study_uid=ids.study_uid,
                                sop_class_uid=str(request.AffectedSOPClassUID), header=event.dataset)
    log.debug("instance.stored", study_uid=ids.study_uid, series_uid=ids.series_uid, sop_uid=ids.sop_uid,
              seconds=round(time.perf_counter() - started, 5))
    return dimse.SUCCESS, ""


def _handle_echo(event: evt.Event) -> int:
    return dimse.SUCCESS


def _handle_accepted(event: evt.Event, associations: AssociationLog, metrics: NodeMetrics,
                     audit: AuditTrail | None = None) -> None:
    calling_ae, address = str(event.assoc.requestor.ae_title), str(event.assoc.requestor.address)
    log.info("association.accepted", calling_ae=calling_ae, address=address)
    associations.opened(id(event.assoc), calling_ae, address)
    metrics.association_accepted(calling_ae)
    if audit is not None:
        audit.association_accepted(calling_ae, address)


def _handle_rejected(event: evt.Event, metrics: NodeMetrics) -> None:
    """pynetdicom rejected the association itself (too many associations, a called AE title...)."""
    sent = event.assoc.acceptor.primitive
    metrics.association_rejected(rejection_reason(getattr(sent, "result_source", None),
                                                  getattr(sent, "diagnostic", None)))


# A-ASSOCIATE-RJ (PS3.8 Table 9-21): rejected-permanent, DICOM UL service-user, calling AE not recognized
_RJ_PERMANENT = 0x01
_RJ_SOURCE_SERVICE_USER = 0x01
_RJ_CALLING_AE_NOT_RECOGNIZED = 0x03


def _handle_requested(event: evt.Event, policy: AccessPolicy, associations: AssociationLog,
                      metrics: NodeMetrics, audit: AuditTrail | None = None) -> None:
    """A-ASSOCIATE-RQ received: refuse callers the allow-list does not admit (fail closed)."""
    assoc = event.assoc
    address = str(assoc.requestor.address)
    try:
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        decision = policy.decide(str(request.calling_ae_title), address)
    except Exception:  # a handler error must refuse, not admit: pynetdicom would carry on
        log.exception("association.check_failed", address=address)
        decision = AccessDecision(Verdict.UNKNOWN_CALLING_AE, "", address)
    if decision.accepted:
        return
    log.warning("association.rejected", reason=decision.verdict.value, calling_ae=decision.calling_ae,
                address=address)
    associations.opened(id(assoc), decision.calling_ae, address, rejected=decision.verdict.value)
    metrics.association_rejected(decision.verdict.value)
    if audit is not None:
        audit.association_rejected(decision.calling_ae, address, decision.verdict.value)
    assoc.acse.send_reject(_RJ_PERMANENT, _RJ_SOURCE_SERVICE_USER, _RJ_CALLING_AE_NOT_RECOGNIZED)
    assoc.kill()  # as pynetdicom does after its own rejections: wait for the peer to close


def _handle_conn_open(event: evt.Event) -> None:
    """Transport open: finish the TLS handshake here, in the connection's own thread.

    On failure the connection is closed and the association given no time to wait for an
    A-ASSOCIATE-RQ, so a refused peer does not hold one of ``max_associations`` for the ACSE timeout.
    """
    transport = event.assoc.dul.socket
    if transport is None or transport.socket is None:
        return
    if not tls.handshake(transport.socket, str(event.assoc.requestor.address)):
        transport.close()
        event.assoc.acse_timeout = 0


def _handle_conn_open_tune(event: evt.Event) -> None:
    """Transport open, before the association's threads start: tune its receive path."""
    tune_association(event.assoc)


def _handle_ended(event: evt.Event, tracker: CompletionTracker, associations: AssociationLog,
                  audit: AuditTrail | None = None) -> None:
    tracker.association_ended(id(event.assoc))
    associations.ended(id(event.assoc))
    if audit is not None:
        audit.association_ended(id(event.assoc))  # the studies it delivered (once: later calls find none)


def _listen(ae: AE, address: tuple[str, int], handlers: list[Any], context: Any,
            reuse_port: bool) -> ThreadedAssociationServer:
    """Bind ``address`` and serve in a background thread; a port that cannot be bound (in use by
    another process without ``reuse_port`` on both sides, no permission) is a ConfigError."""
    server_class = SharedPortServer if reuse_port else ThreadedAssociationServer
    try:
        server = ae.make_server(address, evt_handlers=handlers, ssl_context=context,
                                server_class=server_class)
    except OSError as exc:
        hint = "" if reuse_port else " ([cluster] reuse_port = true on every receiver shares a port)"
        raise ConfigError("node.port", f"cannot listen on {address[0]}:{address[1]}: "
                                       f"{exc.strerror or exc}{hint}") from exc
    # as AE.start_server(block=False) does (it offers no server_class); AE.shutdown() and the
    # server's own shutdown() rely on the AE's list
    ae._servers.append(server)
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}",
                              daemon=True)
    thread.start()
    return server


class SharedPortServer(ThreadedAssociationServer):
    """An association server whose socket is bound with SO_REUSEPORT (``[cluster] reuse_port``):
    several processes listen on one port and the kernel spreads the connections between them."""

    def server_bind(self) -> None:
        """SO_REUSEPORT, then pynetdicom's own binding (which ignores ``allow_reuse_port``)."""
        cast("socket.socket", self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """The node's listening AE."""

    def __init__(self, config: NodeConfig, spool: Spool, tracker: CompletionTracker,
                 associations: AssociationLog | None = None, audit: AuditTrail | None = None, *,
                 metrics: NodeMetrics | None = None) -> None:
        """``metrics`` counts what arrives (a private set when not given)."""
        self._config = config
        self._spool = spool
        self._tracker = tracker
        self.associations = associations if associations is not None else AssociationLog()
        self._audit = audit
        self._metrics = metrics or NodeMetrics()
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Open the port and serve associations in background threads."""
        cfg = self._config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_bytes  # advertised to peers (PS3.8 D.1); 0 = no limit
        ae.acse_timeout = cfg.acse_timeout.total_seconds()
        ae.dimse_timeout = cfg.dimse_timeout.total_seconds()
        ae.network_timeout = cfg.network_timeout.total_seconds()
        policy = cfg.security.access
        if not policy.is_open:  # a second lock: pynetdicom's own check runs after _handle_requested
            ae.require_calling_aet = list(policy.ae_titles)
        ae.add_supported_context(Verification)
        for sop_class in IMAGE_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, _handle_requested, [policy, self.associations, self._metrics, self._audit]),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, _handle_store,
             [self._spool, self._tracker, self.associations, self._metrics, self._audit]),
            (evt.EVT_ACCEPTED, _handle_accepted, [self.associations, self._metrics, self._audit]),
            (evt.EVT_REJECTED, _handle_rejected, [self._metrics]),
            (evt.EVT_RELEASED, _handle_ended, [self._tracker, self.associations, self._audit]),
            (evt.EVT_ABORTED, _handle_ended, [self._tracker, self.associations, self._audit]),
            (evt.EVT_CONN_CLOSE, _handle_ended, [self._tracker, self.associations, self._audit]),
        ]
        context = None
        if cfg.security.tls is not None:
            context = tls.server_context(cfg.security.tls,
                                         handshake_timeout_s=cfg.network_timeout.total_seconds())
            handlers.append((evt.EVT_CONN_OPEN, _handle_conn_open))
        handlers.append((evt.EVT_CONN_OPEN, _handle_conn_open_tune))
        self._server = _listen(ae, (cfg.bind_address, cfg.port), handlers, context, cfg.cluster.reuse_port)
        log.info("scp.listening", ae_title=cfg.ae_title, address=cfg.bind_address, port=self.port,
                 tls=context is not None, allow_list=len(policy.callers), reuse_port=cfg.cluster.reuse_port)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        if self._server is None:
            return self._config.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        """True while the listening socket is open."""
        server = self._server
        return server is not None and server.socket is not None and server.socket.fileno() >= 0

    def stop(self) -> None:
        """Stop accepting, let current associations end, close the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("scp.stopped")
