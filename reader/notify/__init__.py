"""Worklist integration of processed studies: HL7 v2 ORU^R01 over MLLP and signed webhooks.

:class:`StudyReport` (``summary``) is what the pipeline knows about one processed series;
``hl7`` renders and sends it as an ORU^R01 to RIS/worklist listeners, ``webhook`` as a signed JSON
event to HTTP receivers. Delivery failures raise the send errors of ``reader.errors``
(:class:`~reader.errors.TransientSendError`, :class:`~reader.errors.PermanentSendError`), so the
durable retry of send tickets treats them like DICOM sends. Formats: ``docs/worklist.md``.
"""

from __future__ import annotations

from reader.notify.hl7 import MllpEndpoint, build_oru, message_control_id, send_oru
from reader.notify.summary import AI_PENDING_REVIEW, PatientIdentity, ResultObject, StudyReport
from reader.notify.webhook import (
    SCHEMA_VERSION,
    WebhookEndpoint,
    event_json,
    post_event,
    sign,
    verify_signature,
)

__all__ = [
    "AI_PENDING_REVIEW",
    "SCHEMA_VERSION",
    "MllpEndpoint",
    "PatientIdentity",
    "ResultObject",
    "StudyReport",
    "WebhookEndpoint",
    "build_oru",
    "event_json",
    "message_control_id",
    "post_event",
    "send_oru",
    "sign",
    "verify_signature",
]
