"""The node's HTTP routes (Starlette): health probes and STOW-RS in.

==========================================  ======  =============================================
``/healthz``                                GET     200 ``ok`` while the process serves HTTP
``/readyz``                                 GET     200, or 503 naming the failed checks (JSON)
``/metrics``                                GET     Prometheus exposition (``reader.metrics``)
``/dicom-web/studies``                      POST    STOW-RS (``reader.web.stow``)
``/dicom-web/studies/{study}``              POST    STOW-RS into one study
``/``, ``/studies``, ``/sends``...             GET     the status pages (``reader.web.pages``)
==========================================  ======  =============================================

Unknown paths answer 404, other methods 405, both as short JSON. STOW-RS callers present
``Authorization: Bearer <token>``; with ``[[security.web_callers]]`` configured only a listed
token gets in (401 otherwise); without, every caller does (the configuration allows that on a
loopback bind only). The probes and ``/metrics`` need no token: like the probes, the metrics
carry no patient data (``reader.metrics``), and a scraper holds no caller token. No answer
carries a stack trace: an unexpected error is logged (``web.error``) and answered 500 with a short message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from reader.assemble import CompletionTracker
from reader.audit import AuditTrail
from reader.config import WebCaller
from reader.errors import InputRejected, RequestRejected
from reader.metrics import NodeMetrics
from reader.spool import Spool, check_uid
from reader.web.health import Readiness
from reader.web.pages import PagesContext, page_routes
from reader.web.stow import MEDIA_DICOM_JSON, read_request, store_request

__all__ = ["WebContext", "build_app"]

log = structlog.get_logger(__name__)

HTTP_BAD_REQUEST = 400
HTTP_UNAUTHORIZED = 401
HTTP_NOT_FOUND = 404
HTTP_PAYLOAD_TOO_LARGE = 413
HTTP_INTERNAL_ERROR = 500
HTTP_UNAVAILABLE = 503
ANONYMOUS = "anonymous"  # the caller's name in log events when no callers are configured
_SESSION_S = 8 * 3600  # a status-page sign-in lasts a working day


@dataclass(frozen=True)
class WebContext:
    """What the routes need from the node."""

    spool: Spool
    tracker: CompletionTracker
    readiness: Readiness
    callers: Sequence[WebCaller]
    max_request_bytes: int
    pages: PagesContext | None = None  # None: no status pages (tests of the API alone)
    audit: AuditTrail | None = None  # STOW-RS requests are audited as associations are
    metrics: NodeMetrics | None = None  # /metrics answers 404 without
    receives: bool = True  # False (a cluster's worker, ``--role worker``): no STOW-RS routes (404)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _caller(request: Request, callers: Sequence[WebCaller]) -> str | None:
    """The name of the caller whose bearer token the request presents; ANONYMOUS when no callers
    are configured; None when refused. Tokens are compared by SHA-256 digest in constant time."""
    if not callers:
        return ANONYMOUS
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    found = None
    for caller in callers:  # every entry compared: the time taken does not tell which matched
        if hmac.compare_digest(digest, caller.token_sha256):
            found = caller.name
    return found


def _base_url(request: Request) -> str:
    """``scheme://address:port`` the request arrived on, for Retrieve URLs. The local address of
    the connection, not the Host header: clients get that wrong (dicomweb-client drops the port)
    and a caller must not choose the URLs the node answers with."""
    server = request.scope.get("server")
    if not server:
        return str(request.base_url).rstrip("/")
    host, port = server
    host = f"[{host}]" if ":" in host else host
    return f"{request.url.scheme}://{host}:{port}"


def _url_study(text: str) -> str:
    try:
        return check_uid(text, "Study Instance UID in the URL")
    except InputRejected as exc:
        raise RequestRejected(HTTP_BAD_REQUEST, exc.reason, exc.detail) from exc


class _Routes:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(self, request: Request) -> Response:
        results = await run_in_threadpool(self.ctx.readiness.check)
        failed = [r for r in results if not r.ok]
        body: dict[str, Any] = {"ready": not failed,
                                "checks": {r.name: "ok" if r.ok else r.reason for r in results}}
        if failed:
            body["failed"] = [r.name for r in failed]
        return JSONResponse(body, status_code=HTTP_UNAVAILABLE if failed else 200)

    async def metrics(self, request: Request) -> Response:
        metrics = self.ctx.metrics
        if metrics is None:
            return _error(HTTP_NOT_FOUND, "Not Found")
        body, media_type = await run_in_threadpool(metrics.exposition, request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": media_type})

    async def stow(self, request: Request) -> Response:
        client = request.client.host if request.client else ""
        caller = _caller(request, self.ctx.callers)
        if caller is None:
            log.warning("stow.refused", reason="unauthorized", address=client)
            return _error(HTTP_UNAUTHORIZED, "a valid bearer token is required",
                          {"WWW-Authenticate": 'Bearer realm="reader"'})
        study_uid = request.path_params.get("study")
        try:
            if study_uid is not None:
                study_uid = _url_study(study_uid)
            body = await self._body(request)
            instances = await run_in_threadpool(
                read_request, request.headers.get("content-type", ""), body, study_uid)
            del body
            result = await run_in_threadpool(
                store_request, self.ctx.spool, self.ctx.tracker, instances,
                base_url=_base_url(request), study_uid=study_uid, caller=caller,
                address=request.client.host if request.client else "", audit=self.ctx.audit,
                metrics=self.ctx.metrics)
        except RequestRejected as exc:
            log.warning("stow.rejected", caller=caller, reason=exc.reason, detail=exc.detail,
                        status=exc.http_status)
            return _error(exc.http_status, exc.detail or exc.reason)
        except ClientDisconnect:
            log.warning("stow.rejected", caller=caller, reason="client_disconnected")
            return _error(HTTP_BAD_REQUEST, "the request body ended early")
        except Exception as exc:  # the edge: logged, answered without a stack trace
            log.exception("web.error", route="stow", error=type(exc).__name__)
            return _error(HTTP_INTERNAL_ERROR, "internal error")
        return Response(json.dumps(result.response.to_json_dict()), status_code=result.http_status,
                        media_type=MEDIA_DICOM_JSON)

    async def _body(self, request: Request) -> bytes:
        """The whole body, refused (413) beyond ``max_request_bytes`` before more is read."""
        limit = self.ctx.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestRejected(HTTP_BAD_REQUEST, "bad_content_length", "invalid Content-Length")
            if int(declared) > limit:
                raise RequestRejected(HTTP_PAYLOAD_TOO_LARGE, "too_large", f"the body exceeds {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestRejected(HTTP_PAYLOAD_TOO_LARGE, "too_large", f"the body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


async def _http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and other HTTP errors raised by the router, as short JSON."""
    assert isinstance(exc, HTTPException)
    log.info("web.http_error", method=request.method, status=exc.status_code)
    return _error(exc.status_code, exc.detail, dict(exc.headers) if exc.headers else None)


def build_app(ctx: WebContext) -> Starlette:
    """The ASGI application of one node."""
    routes = _Routes(ctx)
    api: list[BaseRoute] = [
        Route("/healthz", routes.healthz, methods=["GET"]),
        Route("/readyz", routes.readyz, methods=["GET"]),
        Route("/metrics", routes.metrics, methods=["GET"]),
    ]
    if ctx.receives:  # a worker stores nothing: studies go to the receivers
        api += [Route("/dicom-web/studies", routes.stow, methods=["POST"]),
                Route("/dicom-web/studies/{study}", routes.stow, methods=["POST"])]
    middleware = []
    if ctx.pages is not None:
        web = ctx.pages.config.web
        api += page_routes(ctx.pages)
        # signed with a key made now: a restart signs everyone out, and no key sits on disk
        middleware.append(Middleware(SessionMiddleware, secret_key=secrets.token_hex(32),
                                     session_cookie="reader_session", max_age=_SESSION_S, same_site="strict",
                                     https_only=web is not None and web.tls is not None))
    return Starlette(routes=api, middleware=middleware, exception_handlers={HTTPException: _http_error})
