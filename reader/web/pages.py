"""The status pages: HTML for people, served by the node (Starlette + Jinja2, no JavaScript).

==============================================================  ======  ===============================
``/``                                                           GET     overview
``/studies``  (``?accession=&date=YYYY-MM-DD&state=``)          GET     studies, searchable
``/studies/{study}``                                            GET     one study: findings, key images
``/studies/{study}/series/{series}/v{n}/findings/{k}.png``      GET     finding k's key image, outlined
``/studies/{study}/series/{series}/v{n}/{seg|sr|kos}.dcm``      GET     a result object (signed in only)
``/sends``                                                      GET     pending, parked, settled sends
``/sends/{ticket}/retry``, ``/sends/{ticket}/cancel``           POST    confirm page, then the action
``/associations``, ``/models``, ``/config``                     GET     recent associations, models,
                                                                        effective settings
``/signin`` (GET, POST), ``/signout`` (POST)                            sign-in
==============================================================  ======  ===============================

Sign-in is on when ``[web] users_file`` lists users or ``[[security.web_callers]]`` exist (a
caller signs in with its name and token). Then every page needs a signed-in session: a page
asked for without one answers 401 with the sign-in form (a browser shows it), anything else 401
short JSON. Signed-in users see patient name and ID. Sign-in is off only on a loopback bind (the
configuration refuses otherwise): the pages are open to whoever reaches 127.0.0.1, and patient
name and ID are masked on every page, result objects (which carry them) are not served.

The session is a cookie signed with a key made at start-up (``SessionMiddleware``, itsdangerous;
``Secure`` with ``[web.tls]``, ``SameSite=Strict``); a restart signs everyone out. Every POST
carries the session's CSRF token and, when the browser sends one, an ``Origin`` of this server.
Retry and cancel ask for a confirmation first. A sign-in logs ``web.signed_in`` (the user name
only) and is audited (``reader.audit``), as are retry and cancel. Pages that show work in
flight refresh themselves every :data:`REFRESH_S` seconds. Errors are a short page and a log event,
never a stack trace.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import structlog
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from reader.associations import RECENT, AssociationLog
from reader.config import NodeConfig, redact_url
from reader.errors import InputRejected
from reader.jobs import JobStore, SendTicket
from reader.passwords import verify
from reader.web import queries
from reader.web.keyimage import render_key_image

if TYPE_CHECKING:
    from reader.audit import AuditTrail
    from reader.inference import ModelPackage

__all__ = ["REFRESH_S", "PagesContext", "page_routes"]

log = structlog.get_logger(__name__)

REFRESH_S = 5

ANONYMOUS = "anonymous"
MASK = "•••"
NONE = "\N{EN DASH}"  # an empty cell
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_INTERNAL_ERROR = 500
_SEE_OTHER = 303
_TICKET = re.compile(r"^[0-9.]{1,64}-v[0-9]{1,9}-[0-9a-f]{12}$")
_SECRET_FIELDS = re.compile(r"secret|password|token|credential", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_NAV = (("/", "Overview"), ("/studies", "Studies"), ("/sends", "Sends"), ("/associations", "Associations"),
        ("/models", "Models"), ("/config", "Configuration"))
_CARD_CHARS = 50_000


@dataclass(frozen=True)
class PagesContext:
    """What the pages read from the node."""

    config: NodeConfig
    jobs: JobStore
    models: Mapping[str, ModelPackage]
    associations: AssociationLog
    stages: Callable[[], Mapping[str, Sequence[str]]] = dict
    wake_sends: Callable[[], None] = lambda: None
    audit: AuditTrail | None = None  # sign-ins, retries and cancels are audited (ATNA, reader.audit)


class _Problem(Exception):
    """An expected refusal: answered with ``status`` and ``message`` (no stack trace)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _clock(t: float | None) -> str:
    return "" if not t else datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _when(t: float | None) -> str:
    return "" if not t else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or NONE)


def _seconds(s: float | None) -> str:
    return NONE if s is None else f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _settings(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten the configuration to (key, value) rows; secrets and URL credentials redacted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        rows: list[tuple[str, str]] = []
        for f in dataclasses.fields(value):
            key = f"{prefix}.{f.name}" if prefix else f.name
            item = getattr(value, f.name)
            if _SECRET_FIELDS.search(f.name) or isinstance(item, bytes):
                rows.append((key, "(redacted)" if item else ""))
            elif f.name == "users":
                rows.append((key, ", ".join(u.name for u in item)))
            elif f.name == "database" and isinstance(item, str):  # [cluster]: host and user, no password
                rows.append((key, redact_url(item)))
            else:
                rows.extend(_settings(item, key))
        return rows
    if isinstance(value, tuple | list) and value and any(dataclasses.is_dataclass(v) for v in value):
        return [row for i, v in enumerate(value) for row in _settings(v, f"{prefix}[{i}]")]
    if isinstance(value, Enum):
        value = value.value
    elif isinstance(value, tuple | list):
        value = ", ".join(str(v.pattern if isinstance(v, re.Pattern) else v) for v in value)
    elif isinstance(value, datetime.timedelta):
        value = f"{value.total_seconds():g} s"
    return [(prefix, _URL_USERINFO.sub("(redacted)@", str(value)))]


class _Pages:
    def __init__(self, ctx: PagesContext) -> None:
        self.ctx = ctx
        web = ctx.config.web
        self.sign_in_on = bool((web is not None and web.users) or ctx.config.security.web_callers)
        self.users = {u.name: u.password_hash for u in web.users} if web is not None else {}
        self.env = jinja2.Environment(loader=jinja2.PackageLoader("reader.web", "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)

    # --- plumbing --------------------------------------------------------------------------
    def _user(self, request: Request) -> str | None:
        user = request.session.get("user")
        return user if isinstance(user, str) else None

    def _csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return token

    def _render(self, request: Request, template: str, title: str, status: int = 200,
                refresh: bool = False, **values: Any) -> HTMLResponse:
        user = self._user(request)
        show_phi = user is not None

        def phi(value: str) -> str:
            return value if show_phi or not value else MASK

        html = self.env.get_template(template).render(
            title=title, nav=_NAV, active=request.url.path, user=user, sign_in_on=self.sign_in_on,
            csrf=self._csrf(request), refresh=REFRESH_S if refresh else 0, node_ae=self.ctx.config.ae_title,
            show_phi=show_phi, phi=phi, tz=time.strftime("%Z"), when=_when, clock=_clock, date=_date,
            seconds=_seconds, size=_size, **values)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def _unauthorized(self, request: Request, message: str = "") -> Response:
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self._render(request, "signin.html", "Sign in", status=HTTP_UNAUTHORIZED,
                                message=message or "Sign in to see this page.", next=target)
        return JSONResponse({"error": "sign-in required"}, status_code=HTTP_UNAUTHORIZED)

    def _check_post(self, request: Request, form: FormData) -> None:
        """CSRF: the session's token in the form, and an Origin (when sent) of this server."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            raise _Problem(HTTP_FORBIDDEN, "cross-origin request refused")
        token = form.get("csrf")
        expected = request.session.get("csrf")
        if not isinstance(token, str) or not isinstance(expected, str) or not hmac.compare_digest(
                token.encode(), expected.encode()):
            raise _Problem(HTTP_FORBIDDEN, "the form expired: reload the page and try again")

    def page(self, handler: Callable[[Request, FormData | None], Response], *, public: bool = False,
             name: str = "") -> Callable[[Request], Awaitable[Response]]:
        """Wrap a (blocking) handler: sign-in, CSRF on POST, errors as short answers."""
        async def endpoint(request: Request) -> Response:
            try:
                form = await request.form() if request.method == "POST" else None
                if not public and self.sign_in_on and self._user(request) is None:
                    return self._unauthorized(request)
                if form is not None:
                    self._check_post(request, form)
                return await run_in_threadpool(handler, request, form)
            except _Problem as exc:
                log.info("web.refused", route=name, status=exc.status, reason=exc.message)
                return self._error(request, exc.status, exc.message)
            except InputRejected as exc:
                log.info("web.refused", route=name, status=HTTP_NOT_FOUND, reason=exc.reason)
                return self._error(request, HTTP_NOT_FOUND, "not found")
            except Exception as exc:  # the edge: logged, answered without a stack trace
                log.exception("web.error", route=name, error=type(exc).__name__)
                return self._error(request, HTTP_INTERNAL_ERROR, "internal error")
        return endpoint

    def _error(self, request: Request, status: int, message: str) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return self._render(request, "error.html", f"{status}", status=status, message=message)
        return JSONResponse({"error": message}, status_code=status)

    def _who(self, request: Request) -> str:
        return self._user(request) or ANONYMOUS

    # --- pages -----------------------------------------------------------------------------
    def _model_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, pkg in sorted(self.ctx.models.items()):
            m = pkg.manifest
            card = m.folder / "MODEL_CARD.md"
            manifest = m.folder / "model.toml"
            rows.append({
                "key": name, "name": m.model.name, "version": m.model.version, "provider": pkg.provider,
                "precision": pkg.precision, "weights_sha256": pkg.algorithm.weights_sha256,
                "folder": str(m.folder), "description": m.model.description, "source": m.model.source,
                "output": m.output.kind, "labels": [label.finding_class.name for label in m.labels],
                "routes": [r.name for r in self.ctx.config.routes if r.model == name],
                "manifest": _read_text(manifest), "card": _read_text(card)[:_CARD_CHARS]})
        return rows

    def overview(self, request: Request, form: FormData | None) -> Response:
        ov = queries.overview(self.ctx.jobs, self.ctx.stages)
        return self._render(request, "overview.html", "Overview", refresh=ov.in_flight, ov=ov,
                            models=self._model_rows())

    def studies(self, request: Request, form: FormData | None) -> Response:
        q = {k: request.query_params.get(k, "")[:64] for k in ("accession", "date", "state")}
        found = queries.studies(self.ctx.jobs, accession=q["accession"], date=q["date"], state=q["state"])
        states = ["", queries.RECEIVING, "queued", "done", "skipped", "failed", "flagged"]
        return self._render(request, "studies.html", "Studies", studies=found, q=q, states=states,
                            steps=queries.STEPS,
                            refresh=any(queries.study_in_flight(s) for s in found))

    def study(self, request: Request, form: FormData | None) -> Response:
        view = queries.study(self.ctx.jobs, request.path_params["study"])
        if view is None:
            raise _Problem(HTTP_NOT_FOUND, "no such study")
        results = {(s.series_uid, v): {"findings": queries.findings(self.ctx.jobs.spool, s.series_uid, v),
                                       "objects": queries.result_objects(self.ctx.jobs, s.series_uid, v)}
                   for s in view.series for v in s.versions}
        return self._render(request, "study.html", "Study", st=view, results=results,
                            refresh=queries.study_in_flight(view))

    def key_image(self, request: Request, form: FormData | None) -> Response:
        p = request.path_params
        spool = self.ctx.jobs.spool
        found = [f for f in queries.findings(spool, p["series"], p["version"]) if f.number == p["number"]]
        if not found or not found[0].image_sop_uid:
            raise _Problem(HTTP_NOT_FOUND, "no such finding")
        instance = queries.instance_file(spool, p["study"], p["series"], found[0].image_sop_uid)
        if instance is None:
            raise _Problem(HTTP_NOT_FOUND, "the key image's instance is no longer stored")
        return Response(render_key_image(instance, found[0].outline), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    def result_object(self, request: Request, form: FormData | None) -> Response:
        if self._user(request) is None:
            raise _Problem(HTTP_FORBIDDEN, "result objects carry patient data: sign in to download them "
                           "(sign-in needs [web] users_file)")
        p = request.path_params
        path = queries.find_result(self.ctx.jobs.spool, p["series"], p["version"], p["kind"])
        if path is None or queries.study(self.ctx.jobs, p["study"]) is None:
            raise _Problem(HTTP_NOT_FOUND, "no such result object")
        return Response(path.read_bytes(), media_type="application/dicom", headers={
            "Content-Disposition": f'attachment; filename="{p["kind"]}-v{p["version"]}.dcm"'})

    def sends(self, request: Request, form: FormData | None) -> Response:
        pending, parked, settled = queries.sends(self.ctx.jobs)
        return self._render(request, "sends.html", "Sends", pending=pending, parked=parked, settled=settled,
                            refresh=bool(pending))

    def send_action(self, request: Request, form: FormData | None) -> Response:
        assert form is not None
        name, action = request.path_params["ticket"], request.path_params["action"]
        if action not in ("retry", "cancel") or not _TICKET.match(name):
            raise _Problem(HTTP_NOT_FOUND, "no such send")
        ticket = self.ctx.jobs.send(name)
        if ticket is None:
            raise _Problem(HTTP_NOT_FOUND, "no such send")
        if form.get("confirm") != "yes":
            question = ("Send these results again? Attempts start from zero." if action == "retry" else
                        "Cancel this send? The results will not be sent to this destination.")
            return self._render(request, "confirm.html", f"{action.capitalize()} a send", t=ticket,
                                action=action, question=question)
        user = self._who(request)
        if action == "retry":
            done: SendTicket | None = self.ctx.jobs.requeue_send(name)
            reason = ""
        else:
            reason = str(form.get("reason", "")).strip()[:200]
            if not reason:
                raise _Problem(HTTP_CONFLICT, "a cancellation needs a reason")
            done = self.ctx.jobs.cancel_send(name, f"cancelled by {user}: {reason}")
        if done is None:
            raise _Problem(HTTP_CONFLICT, f"this send is {ticket.state.value}: nothing to {action}")
        address = _address(request)
        if action == "retry":
            log.info("web.send.retried", ticket=name, destination=ticket.destination, user=user)
            if self.ctx.audit is not None:
                self.ctx.audit.send_retried(user, address, ticket=name, destination=ticket.destination)
        else:
            log.info("web.send.cancelled", ticket=name, destination=ticket.destination, user=user)
            if self.ctx.audit is not None:
                self.ctx.audit.send_cancelled(user, address, ticket=name, destination=ticket.destination)
        if action == "retry":
            self.ctx.wake_sends()
        return RedirectResponse("/sends", status_code=_SEE_OTHER)

    def associations(self, request: Request, form: FormData | None) -> Response:
        recent = self.ctx.associations.recent()
        return self._render(request, "associations.html", "Associations", associations=recent, limit=RECENT,
                            refresh=any(a.ended_at is None for a in recent))

    def models(self, request: Request, form: FormData | None) -> Response:
        return self._render(request, "models.html", "Models", models=self._model_rows())

    def settings(self, request: Request, form: FormData | None) -> Response:
        return self._render(request, "config.html", "Configuration", settings=_settings(self.ctx.config))

    # --- sign-in ---------------------------------------------------------------------------
    def signin_form(self, request: Request, form: FormData | None) -> Response:
        if not self.sign_in_on:
            raise _Problem(HTTP_NOT_FOUND, "sign-in is off: no [web] users_file and no web callers")
        return self._render(request, "signin.html", "Sign in", message="",
                            next=_safe_next(request.query_params.get("next", "/")))

    def signin(self, request: Request, form: FormData | None) -> Response:
        assert form is not None
        if not self.sign_in_on:
            raise _Problem(HTTP_NOT_FOUND, "sign-in is off: no [web] users_file and no web callers")
        user, password = str(form.get("user", ""))[:64], str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "/")))
        if not self._authenticate(user, password):
            log.warning("web.sign_in_failed", address=_address(request))
            if self.ctx.audit is not None:
                self.ctx.audit.user_signed_in(user, _address(request), False,
                                              "unknown user or wrong password")
            return self._render(request, "signin.html", "Sign in", status=HTTP_UNAUTHORIZED,
                                message="Unknown user or wrong password.", next=target)
        request.session.clear()
        request.session["user"] = user
        request.session["signed_in_at"] = int(time.time())
        log.info("web.signed_in", user=user)
        if self.ctx.audit is not None:
            self.ctx.audit.user_signed_in(user, _address(request), True)
        return RedirectResponse(target, status_code=_SEE_OTHER)

    def _authenticate(self, user: str, password: str) -> bool:
        if not user or not password:
            return False
        if verify(password, self.users.get(user)):
            return True
        digest = hashlib.sha256(password.encode("utf-8", "surrogateescape")).digest()
        found = False
        for caller in self.ctx.config.security.web_callers:  # every entry compared
            found |= caller.name == user and hmac.compare_digest(digest, caller.token_sha256)
        return found

    def signout(self, request: Request, form: FormData | None) -> Response:
        request.session.clear()
        return RedirectResponse("/", status_code=_SEE_OTHER)


def _address(request: Request) -> str:
    """The client's address, as the audit trail records it."""
    return request.client.host if request.client else ""


def _safe_next(target: str) -> str:
    """A local path to go to after sign-in (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def page_routes(ctx: PagesContext) -> list[BaseRoute]:
    """The pages' routes, to mount beside the API's."""
    p = _Pages(ctx)
    series = "/studies/{study}/series/{series}/v{version:int}"
    return [
        Route("/", p.page(p.overview, name="overview"), methods=["GET"]),
        Route("/studies", p.page(p.studies, name="studies"), methods=["GET"]),
        Route("/studies/{study}", p.page(p.study, name="study"), methods=["GET"]),
        Route(series + "/findings/{number:int}.png", p.page(p.key_image, name="key_image"), methods=["GET"]),
        Route(series + "/{kind}.dcm", p.page(p.result_object, name="result_object"), methods=["GET"]),
        Route("/sends", p.page(p.sends, name="sends"), methods=["GET"]),
        Route("/sends/{ticket}/{action}", p.page(p.send_action, name="send_action"), methods=["POST"]),
        Route("/associations", p.page(p.associations, name="associations"), methods=["GET"]),
        Route("/models", p.page(p.models, name="models"), methods=["GET"]),
        Route("/config", p.page(p.settings, name="config"), methods=["GET"]),
        Route("/signin", p.page(p.signin_form, public=True, name="signin"), methods=["GET"]),
        Route("/signin", p.page(p.signin, public=True, name="signin"), methods=["POST"]),
        Route("/signout", p.page(p.signout, public=True, name="signout"), methods=["POST"]),
    ]
