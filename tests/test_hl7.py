"""HL7 v2.5.1 ORU^R01 over MLLP (reader.notify.hl7) against a real listener process.

The listener is tests/mllp_listener.py, started as a subprocess on an ephemeral loopback port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information
import pytest
from structlog.testing import capture_logs

from reader.errors import PermanentSendError, SendError, TransientSendError
from reader.findings import Finding
from reader.flag import FlagRule, decide
from reader.notify import MllpEndpoint, StudyReport, build_oru, message_control_id, send_oru
from reader.notify.summary import AI_PENDING_REVIEW, PatientIdentity, ResultObject
from tests.peers import LOCALHOST, free_port, wait_until
from tests.results_helpers import ALGORITHM, LESION, SQUARE
from tests.worklist_peers import Listener

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
PATIENT = PatientIdentity(
    patient_id="PAT|001", issuer_of_patient_id="HOSP&A", name="Müller^Anne^Marie^Dr^Jr",
    birth_date="19600102", sex="F",
)
OBJECTS = (
    ResultObject("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "2.25.11", "2.25.12"),
    ResultObject("SR", "1.2.840.10008.5.1.4.1.1.88.34", "2.25.21", "2.25.22"),
    ResultObject("KOS", "1.2.840.10008.5.1.4.1.1.88.59", "2.25.31", "2.25.32"),
)


def report(*, score: float = 0.9, with_findings: bool = True) -> StudyReport:
    """A processed study: one lung lesion (flagged when score >= 0.8), or no findings."""
    findings = (
        (Finding(1, LESION, score, 100, 523.6, 12.34, (1.0, 2.0, 3.0), (4, 5), SQUARE),)
        if with_findings else ()
    )
    decision = decide(FlagRule(min_score=0.8), findings)
    objects = OBJECTS if decision.flagged else OBJECTS[1:2] if not findings else OBJECTS[:2]
    return StudyReport(
        study_instance_uid=STUDY_UID, series_instance_uid=SERIES_UID, accession_number="ACC^42",
        patient=PATIENT, modality="CT", decision=decision, findings=findings, algorithm=ALGORITHM,
        result_version=1, objects=objects, processed_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def oru(study: StudyReport, endpoint: MllpEndpoint) -> str:
    """The ORU^R01 of ``study`` for ``endpoint`` with its deterministic control ID."""
    return build_oru(
        study, sending_app="SECONDREADER", sending_facility="RADIOLOGY", receiving_app="RIS",
        receiving_facility="HOSPITAL",
        control_id=message_control_id(study.series_instance_uid, study.result_version, endpoint.key),
    )


def _parsed(listener: Listener) -> hl7.Message:
    wait_until(lambda: len(listener.messages()) == 1, 10.0, "one recorded message")
    return hl7.parse(listener.messages()[0])


def _value(message: hl7.Message, segment: str, field: int, component: int = 1, number: int = 1) -> str:
    return str(message.unescape(str(message.extract_field(segment, number, field, 1, component))))


def _observations(message: hl7.Message) -> dict[tuple[str, str], str]:
    """OBX-3.1 and OBX-4 -> unescaped OBX-5 (first component)."""
    found = {}
    for number in range(1, len(message.segments("OBX")) + 1):
        key = (_value(message, "OBX", 3, number=number), _value(message, "OBX", 4, number=number))
        found[key] = _value(message, "OBX", 5, number=number)
    return found


def test_flagged_study_reaches_the_listener(listener: Callable[..., Listener]) -> None:
    """AA comes back and the received ORU^R01 carries identity, accession, flag and the AI notice."""
    peer = listener("AA")
    study = report()
    assert send_oru(peer.endpoint, oru(study, peer.endpoint)) == "AA"
    message = _parsed(peer)
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert _value(message, "MSH", 10) == message_control_id(SERIES_UID, 1, peer.endpoint.key)
    assert _value(message, "MSH", 12) == "2.5.1"
    assert _value(message, "PID", 3) == "PAT|001"
    assert _value(message, "PID", 3, component=4) == "HOSP&A"
    name = [_value(message, "PID", 5, component=i) for i in range(1, 6)]
    assert name == ["Müller", "Anne", "Marie", "Jr", "Dr"]  # XPN puts the suffix before the prefix
    assert _value(message, "PID", 7) == "19600102"
    assert _value(message, "PID", 8) == "F"
    assert _value(message, "OBR", 3) == "ACC^42"
    assert _value(message, "OBR", 18) == "ACC^42"
    assert _value(message, "OBR", 25) == "P"
    observations = _observations(message)
    assert observations[("AIFLAG", "")] == "FLAGGED"
    assert _value(message, "OBX", 8, number=1) == "A"
    assert observations[("AINOTICE", "")] == AI_PENDING_REVIEW
    assert observations[("AISUMMARY", "")].startswith("Flagged for review (rule: score >= 0.8): 1 finding.")
    assert observations[("111001", "")] == ALGORITHM.name
    assert observations[("111003", "")] == ALGORITHM.version
    assert observations[("110180", "")] == STUDY_UID
    assert observations[("112002", "SOURCE")] == SERIES_UID
    assert observations[("103339001", "1")] == "12.3"
    assert observations[("AISOPUID", "KOS")] == "2.25.32"
    statuses = {_value(message, "OBX", 11, number=n) for n in range(1, len(message.segments("OBX")) + 1)}
    assert statuses == {"P"}


def test_negative_study_says_reviewed_no_flag(listener: Callable[..., Listener]) -> None:
    """A study without findings is sent explicitly as *reviewed, no flag*, without a KOS reference."""
    peer = listener("AA")
    send_oru(peer.endpoint, oru(report(with_findings=False), peer.endpoint))
    message = _parsed(peer)
    observations = _observations(message)
    assert observations[("AIFLAG", "")] == "NOFLAG"
    assert _value(message, "OBX", 8, number=1) == ""
    assert observations[("AISUMMARY", "")].startswith("Reviewed, no flag (rule: score >= 0.8): no findings.")
    assert not any(sub == "KOS" for _, sub in observations)


@pytest.mark.parametrize(
    ("ack", "err_code", "error"),
    [
        ("AE", None, PermanentSendError),  # an error in the message: resending it cannot help
        ("AR", None, TransientSendError),  # rejected for reasons unrelated to content (system down)
        ("AE", "207", TransientSendError),  # application internal error
        ("AR", "203", PermanentSendError),  # unsupported version id
        ("none", None, TransientSendError),  # connection closed without an ACK
    ],
)
def test_negative_acks_raise_typed_errors(
    listener: Callable[..., Listener], ack: str, err_code: str | None, error: type[SendError]
) -> None:
    """AE/AR (with or without ERR-3) and a missing ACK raise the typed error that drives retries."""
    peer = listener(ack, err_code)
    with pytest.raises(error) as caught:
        send_oru(peer.endpoint, oru(report(), peer.endpoint))
    assert type(caught.value) is error
    assert len(peer.messages()) == 1


def test_transient_ack_codes_are_configurable(listener: Callable[..., Listener]) -> None:
    """An endpoint that lists no transient ACK codes treats a plain AR as permanent."""
    peer = listener("AR")
    endpoint = MllpEndpoint(LOCALHOST, peer.port, timeout_s=10.0, transient_ack_codes=frozenset())
    with pytest.raises(PermanentSendError, match="HL7 ACK AR"):
        send_oru(endpoint, oru(report(), peer.endpoint))


def test_no_listener_is_transient() -> None:
    """Connection refused on a port nobody listens on is a TransientSendError, quickly."""
    endpoint = MllpEndpoint(LOCALHOST, free_port(), timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(TransientSendError, match=r"mllp://127\.0\.0\.1"):
        send_oru(endpoint, oru(report(), endpoint))
    assert time.monotonic() - started < 5.0


def test_message_and_control_id_are_deterministic() -> None:
    """The same report gives the same bytes; control IDs fit MSH-10 and differ per endpoint and version."""
    endpoint = MllpEndpoint("ris.example", 2575)
    assert oru(report(), endpoint) == oru(report(), endpoint)
    control_id = message_control_id(SERIES_UID, 1, endpoint.key)
    assert len(control_id) == 20
    assert control_id == message_control_id(SERIES_UID, 1, endpoint.key)
    assert control_id != message_control_id(SERIES_UID, 2, endpoint.key)
    assert control_id != message_control_id(SERIES_UID, 1, "mllp://other:2575")


def test_logs_and_repr_carry_no_patient_identity(listener: Callable[..., Listener]) -> None:
    """Sending logs endpoint, control ID and ACK; logs, error texts and repr show no patient data."""
    study = report()
    rejecting, accepting = listener("AR"), listener("AA")
    with capture_logs() as logs:
        with pytest.raises(TransientSendError) as caught:
            send_oru(rejecting.endpoint, oru(study, rejecting.endpoint))
        send_oru(accepting.endpoint, oru(study, accepting.endpoint))
    assert any(event["event"] == "hl7.sent" for event in logs)
    text = repr(logs) + str(caught.value) + repr(study)
    for secret in ("PAT|001", "Müller", "19600102", "HOSP&A"):
        assert secret not in text
