"""Syslog transport of audit messages: RFC 5424 messages, RFC 6587 octet-counting framing over
TCP, or the same framing over TLS (RFC 5425), to one collector each.

Messages wait in an outbox folder, one file per message, written atomically before anyone is told
the event happened (``reader.audit.trail``); a :class:`CollectorSender` thread delivers them in the
order of their names and deletes each once written to the collector's connection. A collector
that is down or refuses the connection delays delivery, never the node: the sender retries with
exponential backoff up to ``retry_max`` and the files wait, across restarts.

Delivery is at least once. Syslog over TCP has no acknowledgement: a message written in the
instant a collector closes its connection is lost by TCP itself, and one written just before
a crash of ours (before its file is deleted) is sent again after the restart. Before each
message the sender checks that the collector has not closed the connection (an orderly stop of
rsyslog or syslog-ng closes it), and reconnects and resends if it has.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from reader.tls import TlsClientConfig, client_context

__all__ = ["MSGID", "CollectorSender", "format_message"]

log = structlog.get_logger(__name__)

MSGID = "IHE+RFC-3881"  # IHE ITI TF-2 3.20 (Record Audit Event): the syslog MSGID of an audit message
_FACILITY_AUTHPRIV = 10  # IHE ITI-20: facility 10 (security/authorization messages)
_SEVERITY_WARNING = 4
_SEVERITY_NOTICE = 5
_BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark
_MAX_HOSTNAME = 255
_MAX_APP_NAME = 48
_CONNECT_TIMEOUT_S = 10.0


def _header_field(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``limit`` long, or "-"."""
    clean = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return clean or "-"


def format_message(xml: bytes, *, hostname: str, app_name: str, failure: bool = False,
                   when: datetime | None = None, procid: int | None = None) -> bytes:
    """One RFC 5424 message carrying an audit message: PRI authpriv.notice (authpriv.warning for
    a failure), VERSION 1, the timestamp in UTC with microseconds, MSGID ``IHE+RFC-3881``, no
    structured data, and the XML as a UTF-8 MSG (with its BOM)."""
    pri = _FACILITY_AUTHPRIV * 8 + (_SEVERITY_WARNING if failure else _SEVERITY_NOTICE)
    stamp = (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    header = " ".join([f"<{pri}>1", stamp.replace("+00:00", "Z"), _header_field(hostname, _MAX_HOSTNAME),
                       _header_field(app_name, _MAX_APP_NAME), str(procid or os.getpid()), MSGID, "-"])
    return header.encode("ascii") + b" " + _BOM + xml


def frame(message: bytes) -> bytes:
    """RFC 6587 3.4.1 octet counting (also RFC 5425 4.3): ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class CollectorSender:
    """One thread delivering the outbox of one collector; :meth:`start`, :meth:`wake`, :meth:`stop`."""

    def __init__(self, host: str, port: int, outbox: Path, *, tls: TlsClientConfig | None = None,
                 retry_initial: timedelta = timedelta(seconds=0.5),
                 retry_max: timedelta = timedelta(seconds=30),
                 listing_lock: threading.Lock | None = None) -> None:
        """``listing_lock``: held by whoever adds files to ``outbox``, so that a listing never sees
        a newer file without the older ones."""
        self.host = host
        self.port = port
        self.outbox = outbox
        self._context = client_context(tls, key="audit.collectors") if tls is not None else None
        self._server_name = (tls.server_name or host) if tls is not None else None
        self._retry_initial = retry_initial.total_seconds()
        self._retry_max = retry_max.total_seconds()
        self._listing_lock = listing_lock or threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._down_since_attempt = 0  # failed attempts in the current outage, 0 while up
        self._drained = threading.Event()  # set after a pass that left nothing undelivered

    def start(self) -> None:
        """Start delivering (pending files from an earlier run first)."""
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"reader-audit-{self.host}:{self.port}",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new message waits: deliver it now (or at the next retry while the collector is down)."""
        self._wake.set()

    def pending(self) -> list[Path]:
        """The messages still to deliver, oldest first."""
        with self._listing_lock:
            try:
                return sorted(p for p in self.outbox.iterdir() if p.suffix == ".msg")
            except FileNotFoundError:
                return []

    def stop(self, drain: float = 0.0) -> None:
        """Stop, after up to ``drain`` seconds spent delivering what waits (the rest waits on disk)."""
        if self._thread is None:
            return
        if drain > 0:
            self._drained.clear()
            self._wake.set()
            self._drained.wait(drain)
        self._stopping.set()
        self._wake.set()
        self._thread.join(_CONNECT_TIMEOUT_S + 5.0)
        self._thread = None
        self._close()

    def _run(self) -> None:
        delay = self._retry_initial
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._deliver_all()
            except OSError as exc:  # ssl.SSLError included: down, refused, reset, handshake failed
                self._close()
                self._down_since_attempt += 1
                if self._down_since_attempt == 1:
                    log.warning("audit.collector_down", host=self.host, port=self.port,
                                error=f"{type(exc).__name__}: {exc}", pending=len(self.pending()))
                self._stopping.wait(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            self._drained.set()
            self._wake.wait(timeout=5.0)

    def _deliver_all(self) -> None:
        files = self.pending()
        for path in files:
            if self._stopping.is_set():
                return
            try:
                message = path.read_bytes()
            except FileNotFoundError:
                continue
            self._connection().sendall(frame(message))
            path.unlink(missing_ok=True)  # at least once: a crash before this line sends it again
        if files and self._down_since_attempt:
            log.info("audit.collector_up", host=self.host, port=self.port, delivered=len(files))
            self._down_since_attempt = 0

    def _connection(self) -> socket.socket:
        """The open connection, checked not closed by the collector; a new one otherwise."""
        if self._sock is not None and self._closed_by_peer(self._sock):
            self._close()
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=_CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=self._server_name)
                except BaseException:
                    sock.close()
                    raise
            self._sock = sock
            if not self._down_since_attempt:
                log.info("audit.collector_connected", host=self.host, port=self.port,
                         tls=self._context is not None)
        return self._sock

    @staticmethod
    def _closed_by_peer(sock: socket.socket) -> bool:
        """True when the collector closed or reset the connection (a collector never sends data:
        readable means end of stream or an error)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            finally:
                sock.setblocking(True)
                sock.settimeout(_CONNECT_TIMEOUT_S)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
