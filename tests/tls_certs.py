"""Test PKI for DICOM TLS, made with the ``openssl`` command line (Debian package ``openssl``).

:func:`make_pki` writes, under one folder, a CA, a server certificate for ``localhost`` and
``127.0.0.1`` and a client certificate signed by it, a passphrase-protected copy of the server
key, and a second, untrusted CA with its own client certificate. Keys are RSA 2048 (DCMTK's
default BCP 195 profile offers RSA suites only); certificates are valid for two days.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import require_tool

__all__ = ["Pki", "make_pki"]

_DAYS = "2"
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files :func:`make_pki` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    server_key_encrypted: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str | Path) -> None:
    exe = require_tool("openssl")
    done = subprocess.run([exe, *(os.fspath(a) for a in args)], capture_output=True, text=True,
                          timeout=_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", _DAYS, "-subj", f"/CN=Reader test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, cn: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr",
                           folder / f"{name}.ext")
    ext.write_text(extensions, encoding="utf-8")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", _DAYS, "-sha256", "-extfile", ext)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Write the test CA, server and client certificates (and an untrusted pair) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    rogue = _ca(folder, "rogue-ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    server_ext = "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    server = _leaf(folder, "server", "localhost", ca, leaf + server_ext)
    client = _leaf(folder, "client", "MODALITY", ca, leaf + "extendedKeyUsage=clientAuth\n")
    encrypted = folder / "server-encrypted.key"
    _openssl("pkey", "-in", server[1], "-aes256", "-passout", "pass:secret", "-out", encrypted)
    rogue_client = _leaf(folder, "rogue-client", "MODALITY", rogue, leaf + "extendedKeyUsage=clientAuth\n")
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1],
               server_key_encrypted=encrypted, client_cert=client[0],
               client_key=client[1], rogue_ca=rogue[0], rogue_client_cert=rogue_client[0],
               rogue_client_key=rogue_client[1])
