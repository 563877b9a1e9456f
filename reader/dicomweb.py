"""DICOMweb destinations: result files stored by STOW-RS (PS3.18 10.5) with ``dicomweb-client``.

A :class:`StowDestination` is a DICOMweb service's base URL (``https://pacs/dicom-web``; instances
are POSTed to ``<url>/studies``), how to authenticate (none, HTTP basic, or a bearer token) and
which certificate authorities to trust. Credentials are never part of the configuration itself:
it names an environment variable or a file, read again at every attempt (so a renewed token is
picked up) and never logged; they are sent only over ``https://`` (or ``http://`` to a loopback
address). TLS certificates are always verified, against ``ca_certificates`` when given, else the
bundle named by ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``), else requests' own (certifi).
Proxies come from the usual environment variables (``HTTPS_PROXY``, ``NO_PROXY``); ``~/.netrc`` is
not read.

Outcomes of :func:`store_instances`, classified as the C-STORE sends are (``reader.send``) so that
the same ticket, retry and parking rules apply (``reader.dispatch``):

- 200 or 202 with no Failed SOP Sequence (0008,1198) item: delivered;
- an item in the Failed SOP Sequence (of a 200/202, or the body of a 409): each is named in the
  error with its Failure Reason (0008,1197); :class:`~reader.errors.TransientSendError` when every
  reason is transient by ``reader.dimse.classify`` (0xA7xx out of resources, 0x0110 processing
  failure...), else :class:`~reader.errors.PermanentSendError`;
- 408, 429 and 5xx, connection failures (TLS ones included) and timeouts: transient;
- any other 4xx (401 wrong credentials, 403, 404, 409...), and 3xx (redirects are not followed:
  configure the final URL): permanent.

The ticket key of a destination is :attr:`StowDestination.key`, ``stow:`` + its normalised URL:
stable across restarts and distinct from the ``AE@HOST:PORT`` of C-STORE destinations and the
URLs of webhooks.
"""

from __future__ import annotations

import enum
import os
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pydicom
import requests
import structlog
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError

from reader import __version__, dimse
from reader.access import is_loopback
from reader.errors import PermanentSendError, SendError, StorageError, TransientSendError

__all__ = [
    "KEY_PREFIX",
    "Credential",
    "CredentialError",
    "StowAuth",
    "StowDestination",
    "StowFailure",
    "StowReport",
    "failed_instances",
    "store_instances",
    "stow_error",
]

log = structlog.get_logger(__name__)

KEY_PREFIX = "stow:"
_TRANSIENT_STATUSES = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
_DICOM_JSON = ("application/dicom+json", "application/json")
_RESPONSE_READ_LIMIT = 1024 * 1024
_HINTS: dict[int, str] = {HTTPStatus.UNAUTHORIZED: " (unauthorized: check the credentials)",
                          HTTPStatus.FORBIDDEN: " (forbidden: the account may not store)"}
_WHY_LIMIT = 200
_NAMED_FAILURES = 5  # failed instances named one by one in an error message; the rest are counted


class StowAuth(enum.StrEnum):
    """How the node authenticates to a DICOMweb service."""

    NONE = "none"
    BASIC = "basic"  # RFC 7617: username + password
    BEARER = "bearer"  # RFC 6750: ``Authorization: Bearer <token>``


class CredentialError(ValueError):
    """A credential's environment variable is unset or empty, or its file cannot be read."""


@dataclass(frozen=True)
class Credential:
    """Where a password or token is read from: exactly one of an environment variable or a file.

    The value itself is never stored here, so printing a configuration shows no secret.
    """

    env: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if (self.env is None) == (self.file is None):
            raise ValueError("a credential names exactly one of an environment variable and a file")

    def read(self) -> str:
        """The secret, stripped of surrounding white space; raise CredentialError when unavailable."""
        if self.env is not None:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise CredentialError(f"environment variable {self.env} is not set")
            return value
        assert self.file is not None  # __post_init__: one of the two
        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialError(f"cannot read {self.file}: {getattr(exc, 'strerror', None) or exc}") \
                from exc
        if not value:
            raise CredentialError(f"{self.file} is empty")
        return value

    def __str__(self) -> str:
        return f"${self.env}" if self.env is not None else str(self.file)


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service that receives results by STOW-RS.

    ``url`` is the service's base URL (the prefix of ``/studies``), ``http`` or ``https``, without
    user information, query or fragment. ``secret`` is the password (basic) or the token (bearer).
    """

    url: str
    auth: StowAuth = StowAuth.NONE
    username: str = ""
    secret: Credential | None = None
    ca_certificates: Path | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"DICOMweb URL must be http:// or https:// with a host, got {self.url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("DICOMweb URL must not carry credentials: use auth with a file or "
                             "an environment variable")
        if parts.query or parts.fragment:
            raise ValueError("DICOMweb URL must have no query or fragment")
        try:
            parts.port  # noqa: B018  # urllib validates the port when it is read
        except ValueError as exc:
            raise ValueError(f"DICOMweb URL has an invalid port: {exc}") from exc
        if self.auth is StowAuth.NONE and (self.username or self.secret is not None):
            raise ValueError('username and credentials need auth = "basic" or "bearer"')
        if self.auth is StowAuth.BASIC and (not self.username or self.secret is None):
            raise ValueError("basic auth needs a username and a password")
        if self.auth is StowAuth.BASIC and ":" in self.username:
            raise ValueError("a basic auth username must not contain ':' (RFC 7617)")
        if self.auth is StowAuth.BEARER and (self.username or self.secret is None):
            raise ValueError("bearer auth needs a token and no username")
        if self.auth is not StowAuth.NONE and parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("credentials go only over https:// (http:// only to a loopback address)")
        if not self.timeout_s > 0:
            raise ValueError(f"DICOMweb timeout must be positive, got {self.timeout_s}")

    @property
    def base_url(self) -> str:
        """The URL normalised: scheme and host in lower case, no trailing slash."""
        parts = urllib.parse.urlsplit(self.url)
        netloc = parts.netloc.lower()
        return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))

    @property
    def key(self) -> str:
        """How send tickets and logs name this destination: ``stow:`` + :attr:`base_url`."""
        return KEY_PREFIX + self.base_url

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class StowFailure:
    """One item of a STOW-RS response's Failed SOP Sequence (PS3.18 Table 10.5.3-2)."""

    sop_instance_uid: str
    sop_class_uid: str
    reason: int | None  # Failure Reason (0008,1197); None when the item has none

    def describe(self) -> str:
        """The instance and its reason, e.g. ``1.2.3: 0xC000 (error: cannot understand)``."""
        reason = "no reason given" if self.reason is None else dimse.describe(self.reason)
        return f"{self.sop_instance_uid or '(no UID)'}: {reason}"

    @property
    def transient(self) -> bool:
        """True when the reason is one a later attempt can overcome (``dimse.classify``)."""
        return (self.reason is not None and 0 <= self.reason <= 0xFFFF
                and dimse.classify(self.reason) is dimse.StatusCategory.TRANSIENT_FAILURE)


@dataclass(frozen=True)
class StowReport:
    """A delivered STOW-RS request: its HTTP status, the instances sent, the warnings answered."""

    destination: StowDestination
    http_status: int
    sent: tuple[str, ...]
    warnings: int
    seconds: float


def failed_instances(response: pydicom.Dataset) -> list[StowFailure]:
    """The items of the Failed SOP Sequence (0008,1198) of a STOW-RS response data set."""
    failures = []
    for item in response.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failures.append(StowFailure(sop_instance_uid=str(item.get("ReferencedSOPInstanceUID", "")),
                                    sop_class_uid=str(item.get("ReferencedSOPClassUID", "")),
                                    reason=None if reason is None else int(reason)))
    return failures


def _warnings(response: pydicom.Dataset) -> int:
    """Stored instances the service answered with a Warning Reason (0008,1196)."""
    return sum(1 for item in response.get("ReferencedSOPSequence", []) if "WarningReason" in item)


def stow_error(destination: StowDestination, http_status: int,
               failures: Sequence[StowFailure]) -> SendError | None:
    """The typed error for a STOW-RS answer, or None when it means delivered (see the module doc)."""
    where = f"{destination.key} answered HTTP {http_status}"
    if failures:
        named = "; ".join(f.describe() for f in failures[:_NAMED_FAILURES])
        more = len(failures) - _NAMED_FAILURES
        detail = f"{where}, {len(failures)} instance(s) failed: {named}" + (f"; and {more} more" if more > 0
                                                                            else "")
        if http_status >= HTTPStatus.INTERNAL_SERVER_ERROR or all(f.transient for f in failures):
            return TransientSendError(detail, failures[0].reason)
        return PermanentSendError(detail, next((f.reason for f in failures if not f.transient), None))
    if HTTPStatus.OK <= http_status < HTTPStatus.MULTIPLE_CHOICES:
        return None
    if http_status in _TRANSIENT_STATUSES or http_status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return TransientSendError(where)
    hint = _HINTS.get(http_status, "")
    if HTTPStatus.MULTIPLE_CHOICES <= http_status < HTTPStatus.BAD_REQUEST:
        hint = " (redirects are not followed: configure the final URL)"
    return PermanentSendError(where + hint)


def _response_dataset(response: requests.Response) -> pydicom.Dataset:
    """The DICOM JSON body of an error response (a 409 carries the Failed SOP Sequence), or an
    empty data set when there is none or it cannot be read."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    body = response.content[:_RESPONSE_READ_LIMIT]
    if media_type not in _DICOM_JSON or not body:
        return pydicom.Dataset()
    try:
        return pydicom.Dataset.from_json(body.decode("utf-8"))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("stow.unreadable_response", error=type(exc).__name__)
        return pydicom.Dataset()


def _session(destination: StowDestination) -> requests.Session:
    """An HTTP session with the destination's TLS trust and credentials; redirects are refused."""
    session = requests.Session()
    # requests would let REQUESTS_CA_BUNDLE override our CA bundle and ~/.netrc our credentials:
    # the environment is read here instead, for the proxies and the default trust only.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(destination.base_url)
    session.verify = (str(destination.ca_certificates) if destination.ca_certificates
                      else os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True)
    session.max_redirects = 0
    session.headers["User-Agent"] = f"dicom-second-reader/{__version__}"
    try:
        secret = destination.secret.read() if destination.secret is not None else ""
    except CredentialError as exc:
        session.close()
        raise TransientSendError(f"{destination.key}: credential unavailable: {exc}") from exc
    if destination.auth is StowAuth.BASIC:
        session.auth = (destination.username, secret)
    elif destination.auth is StowAuth.BEARER:
        session.headers["Authorization"] = f"Bearer {secret}"
    return session


def _read(files: Iterable[Path]) -> list[pydicom.Dataset]:
    datasets: list[pydicom.Dataset] = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except InvalidDicomError as exc:
            raise PermanentSendError(f"{path} is not a DICOM file: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
    return datasets


def _why(exc: requests.RequestException) -> str:
    """The innermost reason urllib3 gave (``[Errno 111] Connection refused``, ``certificate verify
    failed: ...``), without the connection object's repr; it holds no URL and no header."""
    inner = exc.args[0] if exc.args else exc
    text = str(getattr(inner, "reason", inner))
    return text.split(">: ", 1)[-1][:_WHY_LIMIT]


def _post(destination: StowDestination, datasets: Sequence[pydicom.Dataset]) -> tuple[int, pydicom.Dataset]:
    """One STOW-RS request; its HTTP status and response data set, or the transport's typed error.

    dicomweb-client's own retries are switched off: the send ticket's schedule decides when to
    try again (``reader.dispatch``).
    """
    session = _session(destination)
    responses: list[requests.Response] = []  # the client reads only an exact media type: keep ours
    session.hooks["response"].append(lambda response, *args, **kwargs: responses.append(response))
    try:
        client = DICOMwebClient(url=destination.base_url, session=session, timeout=destination.timeout_s)
        client.set_http_retry_params(retry=False)
        answer = client.store_instances(datasets)
    except requests.HTTPError as exc:
        if exc.response is None:
            raise TransientSendError(f"{destination.key}: HTTP error without a response") from exc
        return exc.response.status_code, _response_dataset(exc.response)
    except requests.TooManyRedirects as exc:
        raise PermanentSendError(f"{destination.key} answered a redirect (redirects are not followed: "
                                 "configure the final URL)") from exc
    except requests.Timeout as exc:
        raise TransientSendError(f"{destination.key}: timed out") from exc
    except requests.exceptions.SSLError as exc:
        raise TransientSendError(f"{destination.key}: TLS handshake or certificate check failed: "
                                 f"{_why(exc)}") from exc
    except requests.ConnectionError as exc:
        raise TransientSendError(f"{destination.key}: connection failed: {_why(exc)}") from exc
    except requests.RequestException as exc:
        raise TransientSendError(f"{destination.key}: {type(exc).__name__}") from exc
    finally:
        session.close()
    if not responses:
        return HTTPStatus.OK, answer
    return responses[-1].status_code, answer if answer else _response_dataset(responses[-1])


def store_instances(destination: StowDestination, files: Sequence[Path]) -> StowReport:
    """STOW-RS every file to ``destination`` in one request; raise a SendError unless all were stored."""
    started = time.monotonic()
    datasets = _read(files)
    uids = tuple(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    if not datasets:
        return StowReport(destination, HTTPStatus.OK, (), 0, 0.0)
    status, answer = _post(destination, datasets)
    error = stow_error(destination, status, failed_instances(answer))
    if error is not None:
        raise error
    report = StowReport(destination, status, uids, _warnings(answer), time.monotonic() - started)
    if report.warnings:
        log.warning("stow.warning_status", destination=destination.key, warnings=report.warnings)
    log.info("stow.stored", destination=destination.key, count=len(uids), warnings=report.warnings,
             seconds=round(report.seconds, 4))
    return report
