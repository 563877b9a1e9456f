"""Webhooks: one signed JSON event per processed study, POSTed to configured URLs.

The body (schema version :data:`SCHEMA_VERSION`, documented in ``docs/worklist.md``) is canonical
JSON (sorted keys, no spaces, UTF-8), the same bytes for every attempt and every endpoint, with a
stable ``event_id`` per (source series, result version): receivers deduplicate on it.

Signature: ``X-Reader-Timestamp`` is the Unix time of the attempt in seconds;
``X-Reader-Signature`` is ``sha256=`` + the lower-case hex HMAC-SHA256, keyed with the endpoint's
secret, of ``<timestamp> "." <body>``. A receiver recomputes it, compares in constant time and
refuses timestamps older than a tolerance (:func:`verify_signature`, 5 minutes), so a captured
request cannot be replayed later and the timestamp cannot be altered.

Outcomes (:func:`post_event`): 2xx succeeds; 408, 429 and 5xx, connection failures and timeouts are
:class:`~reader.errors.TransientSendError`; other 4xx, and 3xx (redirects are not followed: a POST
must reach the configured URL) are :class:`~reader.errors.PermanentSendError`. Error messages name
the URL without its query string, which may carry a token.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import structlog

from reader import __version__
from reader.errors import PermanentSendError, TransientSendError
from reader.findings import Code, Finding
from reader.notify.summary import AI_PENDING_REVIEW, StudyReport
from reader.results.wording import finding_label, finding_site, finding_type, length_mm, volume_mm3

__all__ = [
    "EVENT_TYPE",
    "SCHEMA_VERSION",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookEndpoint",
    "event_id",
    "event_json",
    "post_event",
    "sign",
    "verify_signature",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
EVENT_TYPE = "study.processed"
SIGNATURE_HEADER = "X-Reader-Signature"
TIMESTAMP_HEADER = "X-Reader-Timestamp"
_SECRET_MIN_BYTES = 16
_TRANSIENT_STATUSES = frozenset({408, 429})
_RESPONSE_READ_LIMIT = 64 * 1024
_EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-second-reader:webhook-event")


@dataclass(frozen=True)
class WebhookEndpoint:
    """An HTTP(S) URL that receives events, and the shared secret that signs them."""

    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook URL must be http:// or https:// with a host")
        if len(self.secret) < _SECRET_MIN_BYTES:
            raise ValueError(f"webhook secret must have at least {_SECRET_MIN_BYTES} bytes")
        if not self.timeout_s > 0:
            raise ValueError(f"webhook timeout must be positive, got {self.timeout_s}")

    @property
    def key(self) -> str:
        """The URL without query and fragment: how tickets and logs name the endpoint."""
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def event_id(series_uid: str, result_version: int) -> str:
    """The event's identity: a UUID (RFC 9562 version 5) over the source series and result version."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{series_uid}\x1f{result_version}"))


def _code(code: Code | None) -> dict[str, str] | None:
    return None if code is None else {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}


def _finding(finding: Finding, triggering: bool) -> dict[str, Any]:
    finding_class = finding.finding_class
    return {
        "number": finding.number,
        "class": finding_class.name,
        "category": _code(finding_class.category),
        "label": finding_label(finding),
        "type": _code(finding_type(finding)),
        "site": _code(finding_site(finding)),
        "score": round(finding.score, 4),
        "calibrated_score": None if finding.calibrated_score is None else round(finding.calibrated_score, 2),
        "longest_diameter_mm": length_mm(finding.longest_diameter_mm),
        "volume_mm3": None if finding.volume_mm3 is None else volume_mm3(finding.volume_mm3),
        "centroid_mm": [round(v, 2) for v in finding.centroid_mm],
        "triggers_flag": triggering,
    }


def event_json(report: StudyReport) -> bytes:
    """The event body: canonical JSON, no patient name, ID or birth date (see ``docs/worklist.md``)."""
    triggering = set(report.decision.triggering_findings)
    algorithm = report.algorithm
    event = {
        "schema_version": SCHEMA_VERSION,
        "event_type": EVENT_TYPE,
        "event_id": event_id(report.series_instance_uid, report.result_version),
        "occurred_at": report.processed_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "study": {
            "study_instance_uid": report.study_instance_uid,
            "accession_number": report.accession_number,
            "modality": report.modality,
        },
        "series_instance_uid": report.series_instance_uid,
        "result_version": report.result_version,
        "flag": {
            "state": report.decision.state.value,
            "flagged": report.flagged,
            "rule": report.decision.rule,
            "triggering_findings": list(report.decision.triggering_findings),
        },
        "summary": report.summary(),
        "notice": AI_PENDING_REVIEW,
        "algorithm": {"name": algorithm.name, "version": algorithm.version, "source": algorithm.source},
        "findings": [_finding(f, f.number in triggering) for f in report.findings],
        "results": [
            {
                "kind": obj.kind,
                "sop_class_uid": obj.sop_class_uid,
                "series_instance_uid": obj.series_instance_uid,
                "sop_instance_uid": obj.sop_instance_uid,
            }
            for obj in report.objects
        ],
    }
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Reader-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body``."""
    digest = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """True when the headers carry a valid signature of ``body`` made within ``tolerance_s`` of ``now``.

    Header names are matched case-insensitively. For receivers and tests.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    timestamp_text = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp_text.isdigit() or not signature:
        return False
    timestamp = int(timestamp_text)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), signature)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would turn a redirected POST into a GET without the body."""

    def redirect_request(  # noqa: PLR0917  # urllib's signature, overridden
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _classify_status(endpoint: WebhookEndpoint, status: int) -> None:
    reason = f"webhook {endpoint.key} answered HTTP {status}"
    if 200 <= status < 300:
        return
    if status in _TRANSIENT_STATUSES or status >= 500:
        raise TransientSendError(reason)
    if 300 <= status < 400:
        raise PermanentSendError(reason + " (redirects are not followed: configure the final URL)")
    raise PermanentSendError(reason)


def post_event(endpoint: WebhookEndpoint, body: bytes, *, now: float | None = None) -> int:
    """POST a signed event body; return the 2xx status or raise the typed send error."""
    timestamp = int(time.time() if now is None else now)
    request = urllib.request.Request(
        endpoint.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": f"dicom-second-reader/{__version__}",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(endpoint.secret, body, timestamp),
        },
    )
    opener = urllib.request.build_opener(_NoRedirect())
    started = time.perf_counter()
    try:
        with opener.open(request, timeout=endpoint.timeout_s) as response:
            response.read(_RESPONSE_READ_LIMIT)
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        status = int(exc.code)
    except urllib.error.URLError as exc:
        raise TransientSendError(f"webhook {endpoint.key}: {_reason(exc.reason)}") from exc
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise TransientSendError(f"webhook {endpoint.key}: {_reason(exc)}") from exc
    _classify_status(endpoint, status)
    log.info("webhook.sent", endpoint=endpoint.key, status=status,
             seconds=round(time.perf_counter() - started, 3))
    return status


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return type(reason).__name__ if isinstance(reason, BaseException) else str(reason)
