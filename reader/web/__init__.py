"""The node's HTTP server: health probes, STOW-RS in, and the status pages.

- ``app``: the routes (Starlette);
- ``health``: the readiness checks behind ``/readyz``;
- ``stow``: STOW-RS in (PS3.18 10.5), storing through ``reader.intake`` as C-STORE does;
- ``server``: uvicorn in a thread of the node process;
- ``pages``: the status pages (HTML, Jinja2 templates in ``templates/``), reading state only
  through ``queries``; ``keyimage`` draws a finding's key image.
"""

from reader.web.app import WebContext, build_app
from reader.web.health import Readiness
from reader.web.pages import PagesContext
from reader.web.server import WebServer

__all__ = ["PagesContext", "Readiness", "WebContext", "WebServer", "build_app"]
