"""A real syslog collector for tests: Debian's ``rsyslogd`` in a temporary folder.

It listens on an ephemeral loopback port with ``imtcp`` (RFC 6587 octet counting and LF framing)
or, with ``tls``, with the OpenSSL stream driver (RFC 5425; Debian package ``rsyslog-openssl``),
and writes each message as received (``%rawmsg%``) on one line of ``messages.log``. It runs in
the foreground (``-n``) with its own pid file and work folder, so nothing of the system's rsyslog
is used or touched; :meth:`stop` ends it (SIGTERM) and :meth:`start` starts it again on the
same port, appending to the same file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import LOCALHOST, free_port, require_tool, wait_until

__all__ = ["Rsyslog", "RsyslogTls", "openssl_driver_missing"]

_START_S = 20.0
_STOP_S = 20.0


@dataclass(frozen=True)
class RsyslogTls:
    """The collector's TLS identity: its certificate and key, and the CA that signed it (PEM)."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


class Rsyslog:
    """A running ``rsyslogd``; ``messages()`` are the raw messages it received, in order."""

    def __init__(self, folder: Path, *, tls: RsyslogTls | None = None) -> None:
        self.exe = require_tool("rsyslogd")
        self.folder = folder
        self.host = LOCALHOST
        self.port = free_port()
        self.output = folder / "messages.log"
        self.pid_file = folder / "rsyslogd.pid"
        self.config = folder / "rsyslog.conf"
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text(tls), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def _config_text(self, tls: RsyslogTls | None) -> str:
        lines = [f'global(workDirectory="{self.folder}" maxMessageSize="64k"']
        if tls is not None:
            lines[0] += (f' defaultNetstreamDriver="ossl" defaultNetstreamDriverCAFile="{tls.ca_certificate}"'
                         f' defaultNetstreamDriverCertFile="{tls.certificate}"'
                         f' defaultNetstreamDriverKeyFile="{tls.private_key}"')
        lines[0] += ")"
        if tls is not None:
            lines.append('module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1" '
                         'streamDriver.authMode="anon")')
        else:
            lines.append('module(load="imtcp")')
        lines += [
            f'input(type="imtcp" address="{LOCALHOST}" port="{self.port}")',
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            f'*.* action(type="omfile" file="{self.output}" template="raw")',
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start rsyslogd (again) and wait until it accepts connections."""
        self.pid_file.unlink(missing_ok=True)
        log = (self.folder / "rsyslogd.out").open("ab")
        self.process = subprocess.Popen([self.exe, "-n", "-f", os.fspath(self.config), "-i",
                                         os.fspath(self.pid_file)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._accepts, _START_S, f"rsyslogd listening on {self.host}:{self.port}")

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            out = (self.folder / "rsyslogd.out").read_text(errors="replace")
            raise AssertionError(f"rsyslogd exited with {self.process.returncode}:\n{out}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop rsyslogd (SIGTERM, as ``systemctl stop`` does) and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(_STOP_S)
        self.process = None

    def messages(self) -> list[bytes]:
        """Every message received so far, as rsyslog wrote it (control characters as ``#ooo``)."""
        if not self.output.exists():
            return []
        return [line for line in self.output.read_bytes().split(b"\n") if line]


def openssl_driver_missing() -> bool:
    """True when rsyslog's OpenSSL stream driver (Debian ``rsyslog-openssl``) is not installed."""
    return not any(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so"))
