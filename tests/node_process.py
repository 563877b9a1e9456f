"""A real ``reader serve`` process for integration tests, on an ephemeral loopback port.

The node runs as a subprocess exactly as an operator starts it (``python -m reader.cli serve``);
its JSON log goes to a file the test reads events from. Its HTTP server (``reader.web``) listens on
an ephemeral loopback port (``--web-port 0``), read from the ``web.listening`` event: ``web_port``.
A cluster's process takes ``role`` (``--role``) and ``name`` (``--name``); a worker has no DICOM
port and is ready once it logged ``node.started``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.peers import LOCALHOST, free_port, wait_until

__all__ = ["ReaderNode"]

_START_S = 60.0
_STOP_S = 60.0


class ReaderNode:
    """A started node; :meth:`stop` sends SIGTERM and returns the exit code. ``log_level`` "debug"
    adds the per-instance ``instance.stored`` events; ``env`` adds environment variables (e.g.
    ``READER_CRASH_AT``, ``reader.faults``). ``role`` and ``name`` become ``--role`` and ``--name``
    (``extra_args`` any other flags); with ``wait`` False the caller waits with :meth:`wait_ready`
    (to start several processes at once)."""

    def __init__(self, workdir: Path, *, ae_title: str = "SECONDREADER", destinations: Sequence[str] = (),
                 config_text: str | None = None, data_dir: Path | None = None,
                 port: int | None = None, log_level: str = "info", web: bool = True,
                 env: Mapping[str, str] | None = None, role: str | None = None, name: str | None = None,
                 extra_args: Sequence[str] = (), wait: bool = True) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.host = LOCALHOST
        self.role = role
        self.listens = role != "worker"  # a worker has no DICOM port
        self.port = port or free_port()
        self.data_dir = data_dir or workdir / "reader-data"
        self.web_port: int | None = None  # known once the node listens (with ``web``)
        self._web = web
        self.log_path = workdir / "reader.log"  # one per workdir: a restart in a new workdir starts afresh
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "reader.cli", "serve", "--ae-title", ae_title,
               "--data-dir", os.fspath(self.data_dir), "--log-level", log_level]
        if self.listens:
            cmd += ["--bind", LOCALHOST, "--port", str(self.port)]
        if role is not None:
            cmd += ["--role", role]
        if name is not None:
            cmd += ["--name", name]
        cmd += list(extra_args)
        if web:
            cmd += ["--web-port", "0"]
        if config_text is not None:
            config = workdir / "reader.toml"
            config.write_text(config_text, encoding="utf-8")
            cmd += ["--config", os.fspath(config)]
        for dest in destinations:
            cmd += ["--send-to", dest]
        self.command = cmd
        # a log reused by a restart in the same workdir holds the earlier runs' events
        self._earlier_listening = len(self.events("web.listening")) if self.log_path.exists() else 0
        self._earlier_started = len(self.events("node.started")) if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=Path(__file__).resolve().parents[1],
                                            env={**os.environ, **env} if env is not None else None)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until the node listens (a worker: until it logged ``node.started``); kill it and
        raise if it does not in time."""
        what = f"reader serve listening on {LOCALHOST}:{self.port}" if self.listens else "a worker started"
        try:
            wait_until(self._ready, _START_S, what)
        except BaseException:
            self.kill()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"reader serve exited with {self.process.returncode}:\n{self.log_tail()}")
        if not self.listens:
            if len(self.events("node.started")) <= self._earlier_started:
                return False
        else:
            try:
                with socket.create_connection((LOCALHOST, self.port), timeout=0.5):
                    pass
            except OSError:
                return False
        if self._web and self.web_port is None:
            listening = self.events("web.listening")
            if len(listening) <= self._earlier_listening:
                return False
            self.web_port = int(listening[-1]["port"])
        return True

    @property
    def web_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the node's HTTP server."""
        if self.web_port is None:
            raise AssertionError("this node was started without its HTTP server")
        return f"http://{LOCALHOST}:{self.web_port}"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (optionally only those named ``name``)."""
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def log_tail(self, lines: int = 60) -> str:
        """The end of the node's log, for assertion messages."""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(_STOP_S)
