"""Real worklist peers for tests: an MLLP listener process (tests/mllp_listener.py) and a loopback
HTTP server recording webhook POSTs. Fixtures: ``listener`` (a factory) and ``receiver``."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reader.notify import MllpEndpoint
from tests.peers import LOCALHOST

__all__ = ["Listener", "Received", "Receiver", "listener", "receiver"]

LISTENER = Path(__file__).resolve().parent / "mllp_listener.py"
_START_S = 20.0


class Listener:
    """A running tests/mllp_listener.py: its port and the messages it recorded."""

    def __init__(self, process: subprocess.Popen[str], port: int, folder: Path) -> None:
        self.process = process
        self.port = port
        self.folder = folder

    @property
    def endpoint(self) -> MllpEndpoint:
        """The listener as an endpoint with a short timeout."""
        return MllpEndpoint(LOCALHOST, self.port, timeout_s=10.0)

    def messages(self) -> list[str]:
        """Recorded messages, oldest first."""
        paths = sorted(self.folder.glob("*.hl7"), key=lambda p: int(p.stem))
        return [p.read_bytes().decode("utf-8") for p in paths]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    """Start listeners (``--ack CODE [--err-code N]``) on ephemeral ports; stop them at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(ack: str = "AA", err_code: str | None = None) -> Listener:
        folder = tmp_path / f"listener-{len(started)}"
        args = [sys.executable, str(LISTENER), "--record", str(folder), "--ack", ack]
        if err_code is not None:
            args += ["--err-code", err_code]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _START_S)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("LISTENING "):
            process.kill()
            _, err = process.communicate(timeout=10)
            raise AssertionError(f"MLLP listener did not start within {_START_S} s: {err[-2000:]}")
        return Listener(process, int(line.split()[1]), folder)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Received:
    """One request the server got: path, headers (lower-case names) and body."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A loopback HTTP server that records POSTs and answers ``status`` (or stalls when ``stall``)."""

    server: ThreadingHTTPServer
    status: int = 204
    stall: threading.Event | None = None
    received: list[Received] = field(default_factory=list)

    def url(self, path: str = "/hooks/reader?token=abc") -> str:
        """The URL of ``path`` on this server."""
        return f"http://{LOCALHOST}:{self.server.server_address[1]}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running receiver; shut down at teardown."""
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            if state.stall is not None:
                state.stall.wait(10.0)
            self.send_response(state.status)
            if 300 <= state.status < 400:
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield holder[0]
    if holder[0].stall is not None:
        holder[0].stall.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
