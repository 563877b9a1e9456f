"""The node's HTTP server: health probes and STOW-RS in.

- ``app``: the routes (Starlette);
- ``health``: the readiness checks behind ``/readyz``;
- ``stow``: STOW-RS in (PS3.18 10.5), storing through ``reader.intake`` as C-STORE does;
- ``server``: uvicorn in a thread of the node process.
"""

from reader.web.app import WebContext, build_app
from reader.web.health import Readiness
from reader.web.server import WebServer

__all__ = ["Readiness", "WebContext", "WebServer", "build_app"]
