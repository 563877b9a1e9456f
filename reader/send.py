"""C-STORE SCU: send result files to a destination on one association and classify the outcome.

PS3.4 Annex B (Storage Service Class, SCU behaviour), PS3.7 Annex C (status codes), PS3.8 9.3.4
(A-ASSOCIATE-RJ result, source and reason). Every failure ends as one of the typed errors of
``reader.errors``: :class:`~reader.errors.TransientSendError` when a later attempt can succeed
(connection refused, timeout, abort, association rejected for load, ``0xA7xx``, ``0x0110``) and
:class:`~reader.errors.PermanentSendError` when it cannot (AE title not recognised, SOP class or
transfer syntax not accepted, ``0xA9xx``, ``0xCxxx``, ``0x0122``, ``0x0124``...).

The AE is built per call and pynetdicom's process-global ``_config`` is left alone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from reader import dimse
from reader.errors import ConfigError, PermanentSendError, StorageError, TransientSendError
from reader.requestor import keep_responses_for_caller
from reader.tls import TlsClientConfig, client_context

__all__ = ["Destination", "SendReport", "StoreSCU", "validate_ae_title"]

log = structlog.get_logger(__name__)

_AE_TITLE_MAX = 16
_PORT_MAX = 65535
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255

# PS3.8 Table 9-21: A-ASSOCIATE-RJ (result, source, reason/diag.)
_RESULT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_SOURCE_ACSE = 0x02
_PERMANENT_REASONS = frozenset(
    {
        (_SOURCE_SERVICE_USER, 0x02),  # application context name not supported
        (_SOURCE_SERVICE_USER, 0x03),  # calling AE title not recognized
        (_SOURCE_SERVICE_USER, 0x07),  # called AE title not recognized
        (_SOURCE_ACSE, 0x02),  # protocol version not supported
    }
)


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """Return ``value`` without padding spaces if it is a valid AE title (PS3.5 6.2, VR AE).

    Raise ValueError unless it has 1 to 16 characters of the default repertoire, is not all spaces,
    and has no backslash and no control characters.
    """
    title = value.strip(" ")
    if not 1 <= len(title) <= _AE_TITLE_MAX:
        raise ValueError(f"{what} must be 1 to {_AE_TITLE_MAX} characters (spaces trimmed), got {value!r}")
    bad = [c for c in title if c == "\\" or not c.isascii() or not c.isprintable()]
    if bad:
        raise ValueError(f"{what} {value!r} contains forbidden characters {sorted(set(bad))!r}")
    return title


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP to send to: its AE title, TCP address and, when set, TLS (PS3.15 B.9).

    ``tls`` is not part of the ``AE@HOST:PORT`` text form; a send ticket finds it again through
    the configured destination with the same address (``reader.dispatch``).
    """

    ae_title: str
    host: str
    port: int
    tls: TlsClientConfig | None = None

    def __post_init__(self) -> None:
        validate_ae_title(self.ae_title, "destination AE title")
        if self.ae_title != self.ae_title.strip(" "):
            raise ValueError(f"destination AE title {self.ae_title!r} has padding spaces")
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"destination host must be a non-empty name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= _PORT_MAX:
            raise ValueError(f"destination port must be an integer 1..{_PORT_MAX}, got {self.port!r}")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT`` (an IPv6 host goes in brackets: ``AE@[::1]:104``)."""
        ae, at, address = text.rpartition("@")
        host, colon, port_text = address.rpartition(":")
        if not at or not colon:
            raise ValueError(f"destination must look like AE@HOST:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port_text.isdigit():
            raise ValueError(f"destination port must be a number, got {port_text!r} in {text!r}")
        return cls(ae_title=validate_ae_title(ae, "destination AE title"), host=host, port=int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class SendReport:
    """The outcome of one successful :meth:`StoreSCU.send`.

    ``sent`` lists the SOP Instance UIDs the destination stored, in send order, including those
    answered with a warning status; ``warnings`` repeats the latter with their status code.
    """

    destination: Destination
    sent: tuple[str, ...]
    warnings: tuple[tuple[str, int], ...]
    seconds: float


@dataclass(frozen=True)
class _FileMeta:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _read_meta(path: Path) -> _FileMeta:
    """Read the File Meta Information (PS3.10 7.1) of ``path`` without reading its data set."""
    try:
        meta = read_file_meta_info(path)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    except InvalidDicomError as exc:
        raise PermanentSendError(f"{path} is not a DICOM file: {exc}") from exc
    values = {
        kw: str(meta.get(kw, "")).strip()
        for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    }
    missing = [kw for kw, value in values.items() if not value]
    if missing:
        raise PermanentSendError(f"{path} lacks file meta elements {', '.join(missing)}")
    return _FileMeta(
        path,
        values["MediaStorageSOPClassUID"],
        values["MediaStorageSOPInstanceUID"],
        values["TransferSyntaxUID"],
    )


def _seconds(value: timedelta, name: str) -> float:
    seconds = value.total_seconds()
    if seconds <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return seconds


class StoreSCU:
    """Storage SCU (PS3.4 B.2) that sends a batch of files to one destination per association."""

    def __init__(
        self,
        calling_ae: str,
        *,
        acse_timeout: timedelta = timedelta(seconds=30),
        dimse_timeout: timedelta = timedelta(seconds=60),
        network_timeout: timedelta = timedelta(seconds=60),
        max_pdu: int = 0,
    ) -> None:
        """``max_pdu`` is the largest PDU we accept in bytes; 0 means unlimited (PS3.8 D.1).

        ``acse_timeout`` also bounds the TCP connect.
        """
        self._calling_ae = validate_ae_title(calling_ae, "calling AE title")
        self._acse_s = _seconds(acse_timeout, "acse_timeout")
        self._dimse_s = _seconds(dimse_timeout, "dimse_timeout")
        self._network_s = _seconds(network_timeout, "network_timeout")
        if max_pdu < 0:
            raise ValueError(f"max_pdu must be 0 (unlimited) or a positive byte count, got {max_pdu}")
        self._max_pdu = max_pdu

    def send(self, destination: Destination, files: Sequence[Path]) -> SendReport:
        """C-STORE every file to ``destination`` on one association; raise a SendError on the first failure.

        Presentation contexts are exactly the (SOP class, transfer syntax) pairs of the files, read
        from their file meta. Each is proposed on its own, so a peer that accepts one transfer syntax
        of a SOP class and not another rejects only that context. If any file has no accepted context
        nothing is sent (PermanentSendError). The association is released in every case.
        """
        started = time.monotonic()
        metas = [_read_meta(Path(f)) for f in files]
        if not metas:
            return SendReport(destination, (), (), 0.0)
        pairs = list(dict.fromkeys((m.sop_class_uid, m.transfer_syntax_uid) for m in metas))
        if len(pairs) > _MAX_CONTEXTS:
            raise PermanentSendError(
                f"{len(pairs)} SOP class/transfer syntax pairs exceed the {_MAX_CONTEXTS} presentation "
                "contexts of one association"
            )

        assoc = self._associate(destination, pairs)
        try:
            log.info(
                "send.association",
                destination_ae=destination.ae_title,
                host=destination.host,
                port=destination.port,
                tls=destination.tls is not None,
                contexts=len(pairs),
                count=len(metas),
                seconds=round(time.monotonic() - started, 4),
            )
            self._check_contexts(assoc, destination, metas)
            sent: list[str] = []
            warnings: list[tuple[str, int]] = []
            for meta in metas:
                code = self._store(assoc, destination, meta)
                if dimse.classify(code) == dimse.StatusCategory.WARNING:
                    warnings.append((meta.sop_instance_uid, code))
                sent.append(meta.sop_instance_uid)
        finally:
            if assoc.is_established:
                assoc.release()
        # No event here: the dispatcher logs the one ``result.sent`` of a ticket, with this report.
        return SendReport(destination, tuple(sent), tuple(warnings), time.monotonic() - started)

    # -- association ----------------------------------------------------------------------------------

    def _associate(self, destination: Destination, pairs: list[tuple[str, str]]) -> Association:
        ae = AE(ae_title=self._calling_ae)
        ae.acse_timeout = self._acse_s
        ae.connection_timeout = self._acse_s
        ae.dimse_timeout = self._dimse_s
        ae.network_timeout = self._network_s
        ae.maximum_pdu_size = self._max_pdu
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
        tls_args = None
        if destination.tls is not None:
            try:  # loaded per association, so renewed certificates are picked up without a restart
                context = client_context(destination.tls, key=f"destination {destination}")
            except ConfigError as exc:
                raise TransientSendError(f"TLS settings for {destination} do not load: {exc}") from exc
            tls_args = (context, destination.tls.server_name or destination.host)
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            max_pdu=self._max_pdu,
            tls_args=tls_args,
        )
        if assoc.is_established:
            # pynetdicom never sets TCP_NODELAY; without it each C-STORE waits on Nagle (~4x slower).
            transport = assoc.dul.socket
            if transport is not None and transport.socket is not None:
                transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep_responses_for_caller(assoc)  # or a late reactor may take a C-STORE response
            return assoc
        if assoc.is_rejected:
            raise _rejection_error(destination, assoc.acceptor.primitive)
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            raise PermanentSendError(
                f"{destination} accepted none of the {len(pairs)} proposed presentation contexts",
                dimse.SOP_CLASS_NOT_SUPPORTED,
            )
        what = "refused, timed out or aborted" + (", or the TLS handshake failed" if tls_args else "")
        raise TransientSendError(f"no association with {destination}: connection {what}")

    def _check_contexts(self, assoc: Association, destination: Destination, metas: list[_FileMeta]) -> None:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        refused = sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in metas} - accepted)
        if refused:
            raise PermanentSendError(
                f"{destination} refused presentation contexts (SOP class, transfer syntax) {refused}",
                dimse.SOP_CLASS_NOT_SUPPORTED,
            )

    # -- C-STORE ------------------------------------------------------------------------------------

    def _store(self, assoc: Association, destination: Destination, meta: _FileMeta) -> int:
        """C-STORE one file; return its success or warning status, raise a SendError on failure."""
        try:
            response = assoc.send_c_store(meta.path)
        except RuntimeError as exc:  # association released or aborted under us
            raise TransientSendError(f"association with {destination} lost: {exc}") from exc
        except (AttributeError, ValueError) as exc:  # no context for the data set, or cannot encode it
            raise PermanentSendError(f"cannot send {meta.path} to {destination}: {exc}") from exc
        status = response.get("Status") if response else None
        if status is None:
            # An A-ABORT carries no reason we can trust (Orthanc aborts on an unauthorised store too),
            # so both an abort and a DIMSE timeout are retried.
            what = "association aborted" if assoc.is_aborted else "DIMSE timeout or abort"
            raise TransientSendError(f"no C-STORE response from {destination} ({what})")
        code = int(status)
        category = dimse.classify(code)
        if category == dimse.StatusCategory.TRANSIENT_FAILURE:
            raise TransientSendError(f"{destination} answered {dimse.describe(code)}", code)
        if category == dimse.StatusCategory.PERMANENT_FAILURE:
            raise PermanentSendError(f"{destination} answered {dimse.describe(code)}", code)
        if category == dimse.StatusCategory.WARNING:
            log.warning("send.warning_status", destination_ae=destination.ae_title, status=f"0x{code:04X}")
        return code


def _rejection_error(
    destination: Destination, primitive: A_ASSOCIATE | None
) -> TransientSendError | PermanentSendError:
    """Classify an A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21) by its source and reason.

    Calling/called AE title not recognised, application context or protocol version not supported are
    permanent; no reason given, temporary congestion and local limit exceeded are transient, even
    when the peer marks the rejection "permanent".
    """
    if primitive is None:
        return TransientSendError(f"{destination} rejected the association without a readable reason")
    result, source, diagnostic = primitive.result, primitive.result_source, primitive.diagnostic
    reason = primitive.reason_str
    kind = "permanent" if result == _RESULT_PERMANENT else "transient"
    message = f"{destination} rejected the association ({kind}): {reason}"
    if (source, diagnostic) in _PERMANENT_REASONS:
        return PermanentSendError(message)
    return TransientSendError(message)
