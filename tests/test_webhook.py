"""Signed webhook events (reader.notify.webhook) POSTed to a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time

import pytest
from structlog.testing import capture_logs

from reader.errors import PermanentSendError, SendError, TransientSendError
from reader.notify import SCHEMA_VERSION, WebhookEndpoint, event_json, post_event, sign, verify_signature
from reader.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, event_id
from tests.peers import LOCALHOST, free_port
from tests.test_hl7 import PATIENT, SERIES_UID, STUDY_UID, report
from tests.worklist_peers import Receiver

SECRET = b"0123456789abcdef-test-secret"


def test_flagged_event_is_signed_and_delivered(receiver: Receiver) -> None:
    """A 2xx answer is returned; the server gets the canonical body with a verifiable signature."""
    study = report()
    body = event_json(study)
    endpoint = WebhookEndpoint(receiver.url(), SECRET, timeout_s=10.0)
    assert post_event(endpoint, body) == 204
    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.path == "/hooks/reader?token=abc"
    assert got.body == body
    assert got.headers["content-type"] == "application/json; charset=utf-8"
    assert verify_signature(SECRET, got.body, got.headers)
    event = json.loads(got.body)
    assert event["schema_version"] == SCHEMA_VERSION == 1
    assert event["event_type"] == "study.processed"
    assert event["event_id"] == event_id(SERIES_UID, 1)
    assert event["occurred_at"] == "2026-01-02T03:04:05Z"
    assert event["study"] == {"study_instance_uid": STUDY_UID, "accession_number": "ACC^42", "modality": "CT"}
    assert event["flag"] == {"state": "flagged", "flagged": True, "rule": "score >= 0.8",
                             "triggering_findings": [1]}
    assert event["findings"][0]["longest_diameter_mm"] == 12.3  # rounded to 0.1 mm
    assert event["findings"][0]["label"] == "Finding 1: nodule 12.3 mm"
    assert event["findings"][0]["triggers_flag"] is True
    assert [r["kind"] for r in event["results"]] == ["SEG", "SR", "KOS"]
    assert event["algorithm"]["name"] == "lung-lesion-unet"
    assert "pending review" in event["notice"]


def test_event_has_no_patient_identity() -> None:
    """The event body never contains the patient's ID, issuer, name or birth date."""
    text = event_json(report()).decode("utf-8")
    for value in (PATIENT.patient_id, PATIENT.issuer_of_patient_id, "Müller", PATIENT.birth_date):
        assert value not in text


def test_negative_event_says_reviewed_no_flag() -> None:
    """A study without findings is an explicit *reviewed, no flag* event without a KOS."""
    event = json.loads(event_json(report(with_findings=False)))
    assert event["flag"]["state"] == "reviewed_no_flag"
    assert event["flag"]["flagged"] is False
    assert event["findings"] == []
    assert [r["kind"] for r in event["results"]] == ["SR"]


def test_body_is_deterministic() -> None:
    """The same report gives byte-identical bodies (retries are idempotent for receivers)."""
    assert event_json(report()) == event_json(report())
    assert event_id(SERIES_UID, 1) != event_id(SERIES_UID, 2)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, TransientSendError),
        (503, TransientSendError),
        (429, TransientSendError),
        (408, TransientSendError),
        (400, PermanentSendError),
        (404, PermanentSendError),
        (302, PermanentSendError),
    ],
)
def test_error_statuses_are_classified(receiver: Receiver, status: int, error: type[SendError]) -> None:
    """5xx, 408 and 429 are transient; other 4xx and unfollowed redirects are permanent."""
    receiver.status = status
    endpoint = WebhookEndpoint(receiver.url(), SECRET, timeout_s=10.0)
    with pytest.raises(error) as caught:
        post_event(endpoint, event_json(report()))
    assert type(caught.value) is error
    assert f"HTTP {status}" in str(caught.value)
    assert "token=abc" not in str(caught.value)
    assert len(receiver.received) == 1  # a redirect is not followed


def test_no_server_is_transient() -> None:
    """Connection refused is a TransientSendError."""
    endpoint = WebhookEndpoint(f"http://{LOCALHOST}:{free_port()}/hook", SECRET, timeout_s=5.0)
    with pytest.raises(TransientSendError, match=r"webhook http://127\.0\.0\.1"):
        post_event(endpoint, b"{}")


def test_stalled_server_times_out_transiently(receiver: Receiver) -> None:
    """A server that does not answer within the endpoint's timeout gives a TransientSendError."""
    receiver.stall = threading.Event()
    endpoint = WebhookEndpoint(receiver.url(), SECRET, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(TransientSendError, match="timed out"):
        post_event(endpoint, b"{}")
    assert time.monotonic() - started < 5.0


def test_signature_rejects_tampering_replay_and_wrong_secret() -> None:
    """Verification fails for another body, timestamp, secret, or a timestamp outside the tolerance."""
    body, now = b'{"a":1}', 1_700_000_000
    headers = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(SECRET, body, now)}
    assert verify_signature(SECRET, body, headers, now=now + 10)
    assert verify_signature(SECRET, body, {k.upper(): v for k, v in headers.items()}, now=now)
    assert not verify_signature(SECRET, b'{"a":2}', headers, now=now)
    assert not verify_signature(b"another-secret-of-16+", body, headers, now=now)
    assert not verify_signature(SECRET, body, {**headers, TIMESTAMP_HEADER: str(now + 1)}, now=now)
    assert not verify_signature(SECRET, body, headers, now=now + 301)
    assert not verify_signature(SECRET, body, {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}, now=now)
    assert headers[SIGNATURE_HEADER].startswith("sha256=") and len(headers[SIGNATURE_HEADER]) == 7 + 64


def test_endpoint_validation_and_secret_hidden() -> None:
    """Endpoints need an http(s) URL and a 16-byte secret, and their repr never shows the secret."""
    with pytest.raises(ValueError, match="http"):
        WebhookEndpoint("ftp://example.org/x", SECRET)
    with pytest.raises(ValueError, match="16 bytes"):
        WebhookEndpoint("https://example.org/x", b"short")
    endpoint = WebhookEndpoint("https://example.org/x?token=t", SECRET)
    assert SECRET.decode() not in repr(endpoint)
    assert endpoint.key == "https://example.org/x"


def test_delivery_logs_no_secret_or_query(receiver: Receiver) -> None:
    """The webhook.sent event names the endpoint without its query string and without the secret."""
    with capture_logs() as logs:
        post_event(WebhookEndpoint(receiver.url(), SECRET, timeout_s=10.0), event_json(report()))
    sent = [event for event in logs if event["event"] == "webhook.sent"]
    assert sent and sent[0]["status"] == 204
    assert "token=abc" not in repr(logs) and SECRET.decode() not in repr(logs)
