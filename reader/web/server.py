"""uvicorn in a thread of the node process.

The listening socket is bound in :meth:`WebServer.start`, in the caller's thread, so a port in use
fails the start at once (ConfigError naming ``web.port``) and port 0 resolves to the bound port
before ``web.listening`` is logged. uvicorn then serves that socket from its own event loop in a
daemon thread; it installs no signal handlers there (it does so only in the main thread, where
``reader.cli`` keeps its own). :meth:`WebServer.stop` asks it to exit, lets requests in progress
end (at most ``graceful_s``) and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time

import structlog
import uvicorn
from starlette.types import ASGIApp

from reader.config import WebConfig
from reader.errors import ConfigError

__all__ = ["WebServer"]

log = structlog.get_logger(__name__)

_START_S = 10.0  # longest wait for uvicorn to serve the bound socket
_POLL_S = 0.02


class WebServer:
    """The HTTP server of the node; :meth:`start`, later :meth:`stop`."""

    def __init__(self, config: WebConfig, app: ASGIApp, *, graceful_s: float = 30.0) -> None:
        self._config = config
        self._app = app
        self._graceful_s = graceful_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = config.port

    @property
    def port(self) -> int:
        """The bound TCP port (the configured one until started)."""
        return self._port

    def start(self) -> None:
        """Bind, start serving in a thread, and wait until uvicorn serves."""
        cfg = self._config
        family = socket.AF_INET6 if ":" in cfg.bind_address else socket.AF_INET
        try:
            sock = socket.create_server((cfg.bind_address, cfg.port), family=family)
        except OSError as exc:
            raise ConfigError("web.port",
                              f"cannot listen on {cfg.bind_address}:{cfg.port}: {exc.strerror}") from exc
        self._port = int(sock.getsockname()[1])
        tls = cfg.tls
        server = uvicorn.Server(uvicorn.Config(
            self._app, log_config=None, access_log=False, lifespan="off", server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=int(self._graceful_s),
            ssl_certfile=str(tls.certificate) if tls else None,
            ssl_keyfile=str(tls.private_key) if tls else None,
        ))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="reader-web",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + _START_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise ConfigError("web", "the HTTP server did not start")
            time.sleep(_POLL_S)
        self._server, self._thread = server, thread
        log.info("web.listening", address=cfg.bind_address, port=self._port, tls=tls is not None)

    def stop(self) -> None:
        """Stop accepting, let requests in progress end, join the thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(self._graceful_s + 5.0)
        self._server = self._thread = None
        log.info("web.stopped")
