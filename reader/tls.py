"""DICOM TLS: ``ssl.SSLContext`` builders for the listener and for sending (PS3.15 Annex B.9).

Both sides follow the BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9, RFC 9325):

- TLS 1.2 or 1.3 only (SSL 3, TLS 1.0 and 1.1 are refused, RFC 8996);
- on TLS 1.2, only ephemeral ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305);
  TLS 1.3 suites are all AEAD (OpenSSL's defaults);
- no TLS compression (CRIME) and no renegotiation;
- a client verifies the server's certificate chain against its CA bundle and the server's name
  (DNS name or IP address in the certificate's subjectAltName);
- a server may require a client certificate signed by its CA bundle (mutual authentication, the
  DICOM "node authentication" of IHE ATNA).

The listener hands pynetdicom a :class:`DeferredHandshakeContext`: pynetdicom wraps each accepted
socket in the thread that accepts connections, and a handshake done there would let one client that
connects and never speaks stop the node from accepting anyone. The handshake is instead deferred to
the connection's own thread, with ``handshake_timeout`` on the socket (see :func:`handshake`).

Certificates, keys and CA bundles are PEM files; an encrypted private key is not supported (the
service has nobody to type a passphrase). A file that is missing or does not load raises
:class:`reader.errors.ConfigError` naming the configuration key.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from reader.errors import ConfigError

__all__ = [
    "TLS12_CIPHERS",
    "DeferredHandshakeContext",
    "TlsClientConfig",
    "TlsServerConfig",
    "client_context",
    "handshake",
    "server_context",
]

log = structlog.get_logger(__name__)

TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))
"""TLS 1.2 cipher suites (OpenSSL names): ECDHE key exchange, AEAD encryption (RFC 9325 4.2)."""

_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # versions: minimum_version, not OP_NO_*


@dataclass(frozen=True)
class TlsServerConfig:
    """TLS for the listening port (``[security.tls]``): our certificate and who may connect.

    With ``require_client_certificate`` a peer without a certificate signed by ``ca_certificates``
    is refused during the handshake; without it, a certificate a peer presents is still verified
    when ``ca_certificates`` is given.
    """

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class TlsClientConfig:
    """TLS towards one destination: whom to trust, and our certificate when the peer asks for one.

    ``ca_certificates`` None trusts the system's CA store. The server's certificate must name
    ``server_name`` (default: the destination's host) in its subjectAltName.
    """

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str | None = None


class DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose ``wrap_socket`` sets a timeout and leaves the handshake for later.

    pynetdicom's ``AssociationServer.get_request`` calls ``wrap_socket(sock, server_side=True)``
    in its accept loop; here that call only attaches TLS state, and the handshake runs in the
    connection's thread (:func:`handshake`, or implicitly on the first read).
    """

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap ``sock`` without handshaking; the socket keeps ``handshake_timeout`` for its reads."""
        sock.settimeout(self.handshake_timeout)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _base(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= _OPTIONS
    context.set_ciphers(TLS12_CIPHERS)


def _check_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist or is not a file")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    _check_file(certificate, f"{key}.certificate")
    _check_file(private_key, f"{key}.private_key")
    if private_key.stat().st_mode & 0o077:
        log.warning("tls.key_not_private", key=f"{key}.private_key", path=str(private_key),
                    mode=oct(private_key.stat().st_mode & 0o777))
    try:
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}.certificate",
                          f"{certificate} and {private_key} do not load as a PEM certificate and its "
                          f"unencrypted private key: {_why(exc)}") from exc


def _load_cas(context: ssl.SSLContext, ca_certificates: Path, key: str) -> None:
    _check_file(ca_certificates, f"{key}.ca_certificates")
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}.ca_certificates",
                          f"{ca_certificates} does not load as PEM CA certificates: {_why(exc)}") \
            from exc
    if not context.get_ca_certs():
        raise ConfigError(f"{key}.ca_certificates", f"{ca_certificates} holds no CA certificate")


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's short reason (``PEM_LIB``, ``KEY_VALUES_MISMATCH``) or the message."""
    return str(getattr(exc, "reason", None) or (exc.args[-1] if exc.args else exc))


def _no_password() -> str:
    """Refuse encrypted keys instead of prompting on the terminal (OpenSSL's default)."""
    raise ssl.SSLError("the private key is encrypted; give an unencrypted key readable by the service only")


def server_context(config: TlsServerConfig, *, handshake_timeout_s: float = 30.0,
                   key: str = "security.tls") -> DeferredHandshakeContext:
    """The listener's context (PS3.15 B.9); ``key`` prefixes the ConfigError of a bad file."""
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = handshake_timeout_s
    _base(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, config.certificate, config.private_key, key)
    if config.ca_certificates is not None:
        _load_cas(context, config.ca_certificates, key)
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_certificate else ssl.CERT_OPTIONAL
    elif config.require_client_certificate:
        raise ConfigError(f"{key}.ca_certificates",
                          "is required with require_client_certificate = true (the CAs that sign clients)")
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: TlsClientConfig, *, key: str = "destinations") -> ssl.SSLContext:
    """A sending context (PS3.15 B.9) that verifies the server's chain and name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _base(context)
    if config.ca_certificates is not None:
        _load_cas(context, config.ca_certificates, key)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (config.certificate is None) != (config.private_key is None):
        raise ConfigError(f"{key}.certificate", "certificate and private_key go together")
    if config.certificate is not None and config.private_key is not None:
        _load_chain(context, config.certificate, config.private_key, key)
    return context


def _common_name(peer: Any) -> str | None:
    """The subject CN of a certificate as ``getpeercert()`` decodes it, or None."""
    if not isinstance(peer, dict):
        return None
    for rdn in peer.get("subject", ()):
        for pair in rdn:
            if isinstance(pair, tuple) and len(pair) == 2 and pair[0] == "commonName":
                return str(pair[1])
    return None


def handshake(sock: socket.socket, address: str) -> bool:
    """Complete the server-side handshake of a socket from :class:`DeferredHandshakeContext`.

    Returns True when the peer is authenticated as configured; logs ``tls.refused`` with the
    reason and returns False when the handshake fails or times out (the caller closes the
    connection). Non-TLS sockets pass through.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return True
    try:
        sock.do_handshake()
    except (ssl.SSLError, OSError) as exc:  # OSError: reset, timeout (TimeoutError) or closed
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("tls.refused", address=address, reason=str(reason))
        return False
    cipher = sock.cipher()
    log.info("tls.established", address=address, version=sock.version(),
             cipher=cipher[0] if cipher else None, peer_cn=_common_name(sock.getpeercert()))
    return True
