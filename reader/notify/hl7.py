"""HL7 v2.5.1 ORU^R01 to the RIS/worklist over MLLP, and the reading of its ACK.

Message structure (HL7 v2.5.1 Chapter 7, ORU^R01, message structure ORU_R01)::

    MSH  sending/receiving application and facility, ORU^R01^ORU_R01, control ID, P, 2.5.1, UTF-8
    PID  patient identifiers as received from the source DICOM header
    OBR  accession number (OBR-3 filler order number and OBR-18), result status P (preliminary)
    OBX  flag state, summary, "pending review" notice, algorithm name and version, study and source
         series UIDs, per finding (text, long axis, certainty), per result object (series, SOP UIDs)

Every OBX has Observation Result Status P (preliminary, HL7 table 0085): the result is an AI
reading that a radiologist has not reviewed. The field-by-field mapping is in ``docs/worklist.md``.

Library: ``hl7`` (python-hl7) parses messages (the ACK; tests read our ORU back with it) and frames
MLLP (its asyncio ``hl7.mllp`` streams: start block 0x0B, end block 0x1C 0x0D, HL7 v2.5.1
Appendix C). Its blocking ``MLLPClient`` is not used: it connects without a timeout, writes with
``socket.send`` (may write part of the message) and reads the ACK with a single ``recv``. Values are
escaped here (HL7 v2.5.1 2.7.4) rather than with ``hl7.util.escape``, which rewrites every non-ASCII
character as a ``\\Xhh\\`` escape; this message is UTF-8 and says so in MSH-18.

ACK handling (original acknowledgment mode, HL7 v2.5.1 2.9.2; MSA-1 from table 0008, ERR-3 from
table 0357): ``AA``/``CA`` succeed. An ERR-3 code decides when one is given: 204 (unknown key,
e.g. the order is not in the RIS yet), 206 (record locked) and 207 (internal error) are transient,
every other code (message, segment or field errors; unsupported type, event, processing ID or
version) permanent. Without a code, ``AE`` (the receiver found an error in the message: an identical
resend fails again) is permanent and ``AR`` (rejected "for reasons unrelated to content or format",
e.g. system down) transient, as is ``CE``; ``CR`` is permanent. Which codes are transient can be
set per endpoint (:attr:`MllpEndpoint.transient_ack_codes`) for receivers that use them otherwise.
Connection refused, timeouts, a closed connection, an ACK for another control ID or an unreadable
ACK are transient. Error messages carry codes only, never the receiver's free text (it may echo
patient data).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information
import hl7.mllp  # type: ignore[import-untyped]
import structlog

from reader.errors import PermanentSendError, TransientSendError
from reader.findings import Finding
from reader.notify.summary import AI_PENDING_REVIEW, PatientIdentity, StudyReport
from reader.results.wording import finding_label, length_mm, score_percent

__all__ = [
    "HL7_VERSION",
    "LOCAL_CODING_SYSTEM",
    "MllpEndpoint",
    "build_oru",
    "message_control_id",
    "send_oru",
]

log = structlog.get_logger(__name__)

HL7_VERSION = "2.5.1"
LOCAL_CODING_SYSTEM = "99DSR"  # HL7 table 0396: local coding systems are "99zzz"
_CONTROL_ID_LENGTH = 20  # MSH-10 is ST, at most 20 characters (v2.5.1)
_MAX_FINDINGS = 20  # findings itemised in OBX; the SR (referenced by UID) has them all
_OK_CODES = frozenset({"AA", "CA"})
_TRANSIENT_ERRORS = frozenset({"204", "206", "207"})
# HL7 table 0357 (Message Error Condition Codes), for readable error reasons.
_ERROR_MEANINGS = {
    "0": "message accepted", "100": "segment sequence error", "101": "required field missing",
    "102": "data type error", "103": "table value not found", "200": "unsupported message type",
    "201": "unsupported event code", "202": "unsupported processing id", "203": "unsupported version id",
    "204": "unknown key identifier", "205": "duplicate key identifier", "206": "application record locked",
    "207": "application internal error",
}
_HL7_DATE = re.compile(r"^\d{8}$")
_SEXES = frozenset({"M", "F", "O", "U"})  # HL7 table 0001; DICOM Patient's Sex is M, F or O

_Code = tuple[str, str, str]  # identifier, text, coding system (CWE components 1-3)
_FLAG = ("AIFLAG", "AI second reader flag", LOCAL_CODING_SYSTEM)
_FLAGGED = ("FLAGGED", "Flagged for radiologist review", LOCAL_CODING_SYSTEM)
_NO_FLAG = ("NOFLAG", "Reviewed by AI, no flag", LOCAL_CODING_SYSTEM)
_SUMMARY = ("AISUMMARY", "AI findings summary", LOCAL_CODING_SYSTEM)
_NOTICE = ("AINOTICE", "AI result status", LOCAL_CODING_SYSTEM)
_FINDING = ("AIFINDING", "AI finding", LOCAL_CODING_SYSTEM)
_SOP_INSTANCE = ("AISOPUID", "SOP Instance UID", LOCAL_CODING_SYSTEM)
_SERVICE = ("AISR", "AI second read", LOCAL_CODING_SYSTEM)
_ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
_ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
_STUDY_UID = ("110180", "Study Instance UID", "DCM")
_SERIES_UID = ("112002", "Series Instance UID", "DCM")
_SOP_CLASS = ("110181", "SOP Class UID", "DCM")
_LONG_AXIS = ("103339001", "Long axis", "SCT")
_MM = ("mm", "millimeter", "UCUM")
_PERCENT = ("%", "percent", "UCUM")


@dataclass(frozen=True)
class MllpEndpoint:
    """A RIS/worklist HL7 listener reached over MLLP (TCP)."""

    host: str
    port: int
    timeout_s: float = 30.0  # for connecting, and again for the ACK
    transient_ack_codes: frozenset[str] = frozenset({"AR", "CE"})  # MSA-1 codes worth retrying

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("MLLP host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"MLLP port must be between 1 and 65535, got {self.port}")
        if not self.timeout_s > 0:
            raise ValueError(f"MLLP timeout must be positive, got {self.timeout_s}")

    @property
    def key(self) -> str:
        """``mllp://HOST:PORT``: how tickets and logs name the endpoint."""
        return f"mllp://{self.host}:{self.port}"


def message_control_id(series_uid: str, result_version: int, endpoint_key: str) -> str:
    """MSH-10: the same for every attempt of one result version to one endpoint (20 hex digits)."""
    material = "\x1f".join(("oru/1", series_uid, str(result_version), endpoint_key))
    return hashlib.sha256(material.encode()).hexdigest()[:_CONTROL_ID_LENGTH]


# --- building ----------------------------------------------------------------------------------------


def _escape(value: str, *, multiline: bool = False) -> str:
    r"""A value with the delimiters escaped (HL7 v2.5.1 2.7.4): \E\ \F\ \S\ \T\ \R\, line breaks .br."""
    out = (
        value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
        .replace("&", "\\T\\").replace("~", "\\R\\")
    )
    lines = out.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = "\\.br\\".join(lines) if multiline else " ".join(lines)
    return "".join(c for c in out if c.isprintable())


def _components(*values: str) -> str:
    """Escaped components joined by ``^``, trailing empty ones dropped."""
    return "^".join(_escape(v) for v in values).rstrip("^")


def _code(code: _Code) -> str:
    return _components(*code)


def _timestamp(report: StudyReport) -> str:
    """DTM with offset (HL7 v2.5.1 2.A.22), in UTC: YYYYMMDDHHMMSS+0000."""
    return report.processed_at.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _segment(name: str, fields: Sequence[str]) -> str:
    return "|".join((name, *fields)).rstrip("|")


def _patient_name(name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, PS3.5 6.2) as XPN (family^given^middle^suffix^prefix)."""
    alphabetic = name.split("=", 1)[0]
    parts = [*alphabetic.split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def _pid(patient: PatientIdentity) -> str:
    identifier = _escape(patient.patient_id)
    if patient.issuer_of_patient_id:
        identifier += "^^^" + _escape(patient.issuer_of_patient_id)
    birth = patient.birth_date if _HL7_DATE.match(patient.birth_date) else ""
    sex = patient.sex.upper() if patient.sex.upper() in _SEXES else ""
    return _segment("PID", ["1", "", identifier, "", _patient_name(patient.name), "", birth, sex])


def _obr(report: StudyReport, when: str) -> str:
    fields = [""] * 25
    accession = _escape(report.accession_number)
    fields[0] = "1"  # OBR-1 Set ID
    fields[2] = accession  # OBR-3 Filler Order Number (EI)
    fields[3] = _code(_SERVICE)  # OBR-4 Universal Service Identifier
    fields[6] = when  # OBR-7 Observation Date/Time
    fields[17] = accession  # OBR-18 Placer Field 1: accession number (IHE Radiology convention)
    fields[21] = when  # OBR-22 Results Rpt/Status Chng - Date/Time
    fields[23] = "RAD"  # OBR-24 Diagnostic Serv Sect ID (table 0074)
    fields[24] = "P"  # OBR-25 Result Status: preliminary (table 0123)
    return _segment("OBR", fields)


@dataclass(frozen=True)
class _Obx:
    value_type: str
    identifier: _Code
    value: str  # already encoded (escaped, components joined)
    sub_id: str = ""
    units: _Code | None = None
    abnormal: str = ""


def _finding_observations(findings: Sequence[Finding], triggering: set[int]) -> Iterator[_Obx]:
    for finding in findings[:_MAX_FINDINGS]:
        sub = str(finding.number)
        mark = ", meets the flag rule" if finding.number in triggering else ""
        text = f"{finding_label(finding)}{mark}"
        yield _Obx("TX", _FINDING, _escape(text), sub)
        yield _Obx("NM", _LONG_AXIS, f"{length_mm(finding.longest_diameter_mm):.1f}", sub, _MM)
        concept, percent = score_percent(finding)
        yield _Obx("NM", (concept.value, concept.meaning, concept.scheme), f"{percent:.0f}", sub, _PERCENT)


def _observations(report: StudyReport) -> Iterator[_Obx]:
    flagged = report.flagged
    yield _Obx("CWE", _FLAG, _code(_FLAGGED if flagged else _NO_FLAG), abnormal="A" if flagged else "")
    yield _Obx("TX", _SUMMARY, _escape(report.summary(), multiline=True))
    yield _Obx("TX", _NOTICE, _escape(AI_PENDING_REVIEW))
    yield _Obx("ST", _ALGORITHM_NAME, _escape(report.algorithm.name))
    yield _Obx("ST", _ALGORITHM_VERSION, _escape(report.algorithm.version))
    yield _Obx("ST", _STUDY_UID, _escape(report.study_instance_uid))
    yield _Obx("ST", _SERIES_UID, _escape(report.series_instance_uid), "SOURCE")
    yield from _finding_observations(report.findings, set(report.decision.triggering_findings))
    for obj in report.objects:
        yield _Obx("ST", _SERIES_UID, _escape(obj.series_instance_uid), obj.kind)
        yield _Obx("ST", _SOP_CLASS, _escape(obj.sop_class_uid), obj.kind)
        yield _Obx("ST", _SOP_INSTANCE, _escape(obj.sop_instance_uid), obj.kind)


def _obx(set_id: int, obx: _Obx, when: str) -> str:
    fields = [""] * 14
    fields[0] = str(set_id)  # OBX-1 Set ID
    fields[1] = obx.value_type  # OBX-2 Value Type
    fields[2] = _code(obx.identifier)  # OBX-3 Observation Identifier
    fields[3] = obx.sub_id  # OBX-4 Observation Sub-ID
    fields[4] = obx.value  # OBX-5 Observation Value
    fields[5] = "" if obx.units is None else _code(obx.units)  # OBX-6 Units
    fields[7] = obx.abnormal  # OBX-8 Abnormal Flags (table 0078): A when flagged
    fields[10] = "P"  # OBX-11 Observation Result Status: preliminary (table 0085)
    fields[13] = when  # OBX-14 Date/Time of the Observation
    return _segment("OBX", fields)


def build_oru(
    report: StudyReport,
    *,
    sending_app: str,
    sending_facility: str,
    receiving_app: str,
    receiving_facility: str,
    control_id: str,
) -> str:
    """The ORU^R01 of ``report`` as ER7 text, segments separated by carriage returns.

    MSH-7 is the report's ``processed_at``, so a rebuilt message is identical for every attempt.
    """
    if not control_id or len(control_id) > _CONTROL_ID_LENGTH:
        raise ValueError(f"control_id must have 1 to {_CONTROL_ID_LENGTH} characters")
    when = _timestamp(report)
    msh = "|".join(
        (
            "MSH", "^~\\&", _escape(sending_app), _escape(sending_facility), _escape(receiving_app),
            _escape(receiving_facility), when, "", "ORU^R01^ORU_R01", _escape(control_id), "P",
            HL7_VERSION, "", "", "", "", "", "UNICODE UTF-8",
        )
    )
    segments = [msh, _pid(report.patient), _obr(report, when)]
    segments += [_obx(i, obx, when) for i, obx in enumerate(_observations(report), start=1)]
    return "\r".join(segments) + "\r"


# --- sending -------------------------------------------------------------------------------------------


async def _exchange(endpoint: MllpEndpoint, message: str) -> object:
    """Send one framed message and wait for one framed answer (the ACK), parsed by python-hl7."""
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(endpoint.host, endpoint.port, encoding="utf-8"), endpoint.timeout_s
    )
    try:
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), endpoint.timeout_s)
        return await asyncio.wait_for(reader.readmessage(), endpoint.timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _field(message: object, segment: str, field: int) -> str:
    """Component 1 of a field's first repetition, or "" when the segment or field is absent."""
    try:
        return str(message.extract_field(segment, 1, field, 1, 1)).strip()  # type: ignore[attr-defined]
    except (KeyError, IndexError):
        return ""


def _classify(endpoint: MllpEndpoint, ack: object, control_id: str) -> str:
    """The MSA-1 code of a successful ACK; raises the typed error for the others."""
    code = _field(ack, "MSA", 1).upper()
    acked = _field(ack, "MSA", 2)
    if not code:
        raise TransientSendError(f"HL7 answer from {endpoint.key} is not an ACK (no MSA-1)")
    if acked != control_id:
        raise TransientSendError(f"HL7 ACK from {endpoint.key} acknowledges another message control ID")
    if code in _OK_CODES:
        return code
    error = _field(ack, "ERR", 3) or _field(ack, "ERR", 1)  # ERR-3 (v2.5+), else ERR-1.4 style codes
    reason = f"HL7 ACK {code} from {endpoint.key}"
    if error:
        reason += f", error {error} ({_ERROR_MEANINGS.get(error, 'unknown code')})"
        if error in _TRANSIENT_ERRORS:
            raise TransientSendError(reason)
        raise PermanentSendError(reason)
    if code in endpoint.transient_ack_codes:
        raise TransientSendError(reason)
    raise PermanentSendError(reason)


def _control_id_of(message: str) -> str:
    msh = message.split("\r", 1)[0].split("|")
    if len(msh) < 10 or msh[0] != "MSH" or not msh[9]:
        raise ValueError("message does not start with an MSH segment carrying MSH-10")
    return msh[9]


def send_oru(endpoint: MllpEndpoint, message: str) -> str:
    """Send one ORU^R01 and return the accepting ACK code (``AA`` or ``CA``).

    Raises :class:`~reader.errors.TransientSendError` or :class:`~reader.errors.PermanentSendError`
    as described in the module docstring. Blocking: runs its own event loop, so call it from a
    worker thread, not from inside a running asyncio loop.
    """
    control_id = _control_id_of(message)
    started = time.perf_counter()
    try:
        ack = asyncio.run(_exchange(endpoint, message))
    except TimeoutError as exc:
        raise TransientSendError(f"MLLP {endpoint.key}: no answer within {endpoint.timeout_s:g} s") from exc
    except asyncio.IncompleteReadError as exc:
        raise TransientSendError(f"MLLP {endpoint.key}: connection closed before an ACK") from exc
    except OSError as exc:
        raise TransientSendError(f"MLLP {endpoint.key}: {exc.strerror or type(exc).__name__}") from exc
    except (ValueError, hl7.mllp.InvalidBlockError, hl7.ParseException) as exc:
        raise TransientSendError(f"MLLP {endpoint.key}: unreadable ACK ({type(exc).__name__})") from exc
    code = _classify(endpoint, ack, control_id)
    log.info("hl7.sent", endpoint=endpoint.key, control_id=control_id, ack=code,
             seconds=round(time.perf_counter() - started, 3))
    return code
