"""DICOM audit messages (PS3.15 A.5, the IHE ATNA format), built with the standard library.

One function per audit event of PS3.15 A.5.3 that the node reports, each returning the XML of one
``AuditMessage`` (the schema of A.5.1.1) as bytes, without an XML declaration and on one line:

- :func:`application_activity`: A.5.3.1 Application Activity (110100), Application Start
  (110120) or Stop (110121);
- :func:`node_authentication`: A.5.3.11 Security Alert (110113) of type Node Authentication
  (110126): an association accepted (outcome 0) or refused by the allow-list (outcome 4);
- :func:`instances_transferred`: A.5.3.5 DICOM Instances Transferred (110104), action ``C`` for
  instances received (the receiver did not hold them), ``R`` for instances we sent (read from our
  store); one message per study and association, each with its Study and Patient objects;
- :func:`study_deleted`: A.5.3.6 DICOM Study Deleted (110105), action D: a study removed
  (``reader purge``, retention), with its Study and Patient objects;
- :func:`user_authentication`: A.5.3.12 User Authentication (110114), Login (110122);
- :func:`restricted_function`: A.5.3.11 Security Alert of type Use of Restricted Function
  (110132): an operator's manual retry or cancel of a send. Of the A.5.3 events, Security Alert
  is the one for "an action by a user that changes what the system does" (its type codes name
  configuration changes and restricted functions); DICOM Instances Transferred would claim a
  transfer that the retry only schedules (the transfer itself is audited when it happens), and
  DICOM Instances Accessed is for instances created, read, changed or deleted, which a send's
  retry or cancel does not do. The send, its study and its patient are its participant objects.

Element order follows the schema (a RELAX NG group is ordered): EventIdentification,
ActiveParticipant+, AuditSourceIdentification, ParticipantObjectIdentification*. Every coded value
carries ``csd-code``, ``codeSystemName`` and ``originalText`` (A.5.1.1 CodedValueType; the
RFC 3881 ``displayName`` too, for older repositories). The schema as printed requires a
ParticipantObjectName (or Query) on every participant object: a study's name is its UID.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

__all__ = [
    "AuditSource",
    "Code",
    "Outcome",
    "Participant",
    "PatientObject",
    "StudyObject",
    "application_activity",
    "instances_transferred",
    "node_authentication",
    "restricted_function",
    "study_deleted",
    "user_authentication",
]


@dataclass(frozen=True)
class Code:
    """A coded value (A.5.1.1 CodedValueType): code, coding scheme and meaning."""

    value: str
    scheme: str
    meaning: str


# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
# PS3.16 CID 401 Audit Event Type Code
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
# PS3.16 CID 402 Audit Active Participant Role ID Code
APPLICATION = Code("110150", "DCM", "Application")
APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
DESTINATION = Code("110152", "DCM", "Destination Role ID")
SOURCE = Code("110153", "DCM", "Source Role ID")
# PS3.16 CID 404 Audit Participant Object ID Type Code, and RFC 3881's own
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")


class Outcome(enum.StrEnum):
    """EventOutcomeIndicator (A.5.1.1)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


class Action(enum.StrEnum):
    """EventActionCode (A.5.1.1)."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


@dataclass(frozen=True)
class AuditSource:
    """Who reports (AuditSourceIdentification): the node; type 4, an application server process."""

    source_id: str
    enterprise_site: str | None = None


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process, node or person (A.5.2.1-A.5.2.2).

    ``ae_titles`` become ``AlternativeUserID="AETITLES=A;B"`` (A.5.2.2); ``address`` is the
    NetworkAccessPointID, typed as an IP address (2) or a machine name (1).
    """

    user_id: str
    is_requestor: bool
    roles: tuple[Code, ...] = ()
    ae_titles: tuple[str, ...] = ()
    user_name: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class PatientObject:
    """The patient of the data (participant object type 1 Person, role 1 Patient)."""

    patient_id: str
    name: str = ""


@dataclass(frozen=True)
class StudyObject:
    """A study (type 2 System Object, role 3 Report, ID type 110180) with its SOP classes."""

    study_uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)  # SOP Class UID -> instances
    accession_numbers: tuple[str, ...] = ()


def _now() -> datetime:
    return datetime.now(UTC)


def _clean(text: str) -> str:
    """One line of XML text: control characters (a newline among them) become spaces."""
    return "".join(c if c >= " " else " " for c in text)


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                       "displayName": code.meaning, "originalText": code.meaning})


def _message(event_id: Code, action: Action, outcome: Outcome, when: datetime | None, *,
             event_types: Sequence[Code] = (), description: str = "") -> ET.Element:
    root = ET.Element("AuditMessage")
    stamp = (when or _now()).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action.value, "EventDateTime": stamp, "EventOutcomeIndicator": outcome.value})
    _code(event, "EventID", event_id)
    for code in event_types:
        _code(event, "EventTypeCode", code)
    if description:
        ET.SubElement(event, "EventOutcomeDescription").text = _clean(description)
    return root


def _address_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": _clean(p.user_id), "UserIsRequestor": "true" if p.is_requestor else "false"}
    if p.ae_titles:
        attrs["AlternativeUserID"] = "AETITLES=" + ";".join(p.ae_titles)
    if p.user_name:
        attrs["UserName"] = _clean(p.user_name)
    if p.address:
        attrs["NetworkAccessPointID"] = p.address
        attrs["NetworkAccessPointTypeCode"] = _address_type(p.address)
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    for role in p.roles:
        _code(element, "RoleIDCode", role)


def _source(root: ET.Element, source: AuditSource) -> None:
    attrs = {"AuditSourceID": source.source_id}
    if source.enterprise_site:
        attrs["AuditEnterpriseSiteID"] = source.enterprise_site
    element = ET.SubElement(root, "AuditSourceIdentification", attrs)
    ET.SubElement(element, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process


def _object(root: ET.Element, object_id: str, id_type: Code, name: str, *, type_code: str,
            role: str, details: Mapping[str, str] | None = None) -> ET.Element:
    element = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": _clean(object_id), "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role})
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    ET.SubElement(element, "ParticipantObjectName").text = _clean(name)
    for key, value in (details or {}).items():  # ValuePair: the value base64 (A.5.1.1)
        ET.SubElement(element, "ParticipantObjectDetail",
                      {"type": key, "value": base64.b64encode(value.encode()).decode("ascii")})
    return element


def _study(root: ET.Element, study: StudyObject) -> None:
    element = _object(root, study.study_uid, STUDY_INSTANCE_UID, study.study_uid, type_code="2", role="3")
    if not (study.accession_numbers or study.sop_classes):
        return
    description = ET.SubElement(element, "ParticipantObjectDescription")
    for number in study.accession_numbers:
        ET.SubElement(description, "Accession", {"Number": _clean(number)})
    for uid, count in sorted(study.sop_classes.items()):
        ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


def _patient(root: ET.Element, patient: PatientObject) -> None:
    _object(root, patient.patient_id or "UNKNOWN", PATIENT_NUMBER, patient.name or patient.patient_id,
            type_code="1", role="1")


def _bytes(root: ET.Element) -> bytes:
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return data


def application_activity(source: AuditSource, application: Participant, *, started: bool,
                         launcher: Participant | None = None, when: datetime | None = None) -> bytes:
    """A.5.3.1 Application Activity: the node started or stopped. ``application`` gets the role
    Application; ``launcher`` (the user or process that started it) Application Launcher."""
    root = _message(APPLICATION_ACTIVITY, Action.EXECUTE, Outcome.SUCCESS, when,
                    event_types=(APPLICATION_START if started else APPLICATION_STOP,))
    _participant(root, Participant(application.user_id, False, (APPLICATION,), application.ae_titles,
                                   application.user_name, application.address))
    if launcher is not None:
        _participant(root, Participant(launcher.user_id, True, (APPLICATION_LAUNCHER,),
                                       launcher.ae_titles, launcher.user_name, launcher.address))
    _source(root, source)
    return _bytes(root)


def node_authentication(source: AuditSource, reporter: Participant, peer: Participant, *,
                        accepted: bool, reason: str = "", when: datetime | None = None) -> bytes:
    """A.5.3.11 Security Alert, type Node Authentication: ``peer`` (the calling node, requestor)
    asked to associate with ``reporter`` (the node); outcome 0 accepted, 4 refused, ``reason``
    saying why. The Alert Subject is the peer node (ID type Node ID)."""
    root = _message(SECURITY_ALERT, Action.EXECUTE, Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
                    when, event_types=(NODE_AUTHENTICATION,), description=reason)
    _participant(root, Participant(reporter.user_id, False, (), reporter.ae_titles, reporter.user_name,
                                   reporter.address))
    _participant(root, Participant(peer.user_id, True, (), peer.ae_titles, peer.user_name, peer.address))
    _source(root, source)
    subject = f"{peer.user_id}@{peer.address}" if peer.address else peer.user_id
    details = {"Alert Description": ("association accepted" if accepted else "association rejected")
               + (f": {reason}" if reason else "")}
    _object(root, subject, NODE_ID, subject, type_code="2", role="13", details=details)
    return _bytes(root)


def instances_transferred(source: AuditSource, sender: Participant, receiver: Participant,
                          studies: Sequence[StudyObject], patient: PatientObject, *, received: bool,
                          outcome: Outcome = Outcome.SUCCESS, description: str = "",
                          when: datetime | None = None) -> bytes:
    """A.5.3.5 DICOM Instances Transferred: instances of ``studies`` of one patient went from
    ``sender`` (role Source) to ``receiver`` (role Destination). ``received``: we are the
    receiver (action C, the sender is the requestor); otherwise we sent (action R, we requested)."""
    if not studies:
        raise ValueError("DICOM Instances Transferred needs at least one study")
    root = _message(INSTANCES_TRANSFERRED, Action.CREATE if received else Action.READ, outcome, when,
                    description=description)
    _participant(root, Participant(sender.user_id, received, (SOURCE,), sender.ae_titles,
                                   sender.user_name, sender.address))
    _participant(root, Participant(receiver.user_id, not received, (DESTINATION,), receiver.ae_titles,
                                   receiver.user_name, receiver.address))
    _source(root, source)
    for study in studies:
        _study(root, study)
    _patient(root, patient)
    return _bytes(root)


def study_deleted(source: AuditSource, deleter: Participant, studies: Sequence[StudyObject],
                  patient: PatientObject, *, when: datetime | None = None) -> bytes:
    """A.5.3.6 DICOM Study Deleted (action D): ``deleter`` (a person or the node's retention,
    the requestor) removed ``studies`` of ``patient``."""
    if not studies:
        raise ValueError("DICOM Study Deleted needs at least one study")
    root = _message(STUDY_DELETED, Action.DELETE, Outcome.SUCCESS, when)
    _participant(root, Participant(deleter.user_id, True, (), deleter.ae_titles, deleter.user_name,
                                   deleter.address))
    _source(root, source)
    for study in studies:
        _study(root, study)
    _patient(root, patient)
    return _bytes(root)


def user_authentication(source: AuditSource, user: Participant, node: Participant, *, success: bool,
                        description: str = "", when: datetime | None = None) -> bytes:
    """A.5.3.12 User Authentication, type Login: ``user`` (requestor, with the address it came
    from) signed in to ``node``; outcome 0, or 4 for a refused sign-in."""
    root = _message(USER_AUTHENTICATION, Action.EXECUTE,
                    Outcome.SUCCESS if success else Outcome.MINOR_FAILURE, when, event_types=(LOGIN,),
                    description=description)
    _participant(root, Participant(user.user_id, True, (), (), user.user_name, user.address))
    _participant(root, Participant(node.user_id, False, (), node.ae_titles, node.user_name, node.address))
    _source(root, source)
    return _bytes(root)


def restricted_function(source: AuditSource, user: Participant, node: Participant, *, subject: str,
                        description: str, studies: Sequence[StudyObject] = (),
                        patient: PatientObject | None = None, when: datetime | None = None) -> bytes:
    """A.5.3.11 Security Alert, type Use of Restricted Function: ``user`` did ``description``
    (e.g. "send retried") to ``subject`` (a URI naming the send, role Job); the send's studies
    and patient follow when known."""
    root = _message(SECURITY_ALERT, Action.EXECUTE, Outcome.SUCCESS, when,
                    event_types=(USE_OF_RESTRICTED_FUNCTION,))
    _participant(root, Participant(user.user_id, True, (), (), user.user_name, user.address))
    _participant(root, Participant(node.user_id, False, (), node.ae_titles, node.user_name, node.address))
    _source(root, source)
    _object(root, subject, URI, subject, type_code="2", role="20", details={"Alert Description": description})
    for study in studies:
        _study(root, study)
    if patient is not None:
        _patient(root, patient)
    return _bytes(root)
