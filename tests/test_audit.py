"""The audit trail: DICOM PS3.15 A.5 audit messages, delivered by syslog to a real rsyslog.

Every message the node builds is validated against the DICOM Audit Message schema (PS3.15
A.5.1.1, RELAX NG Compact in tests/dicom_audit_message.rnc, converted with rnc2rng and checked
with lxml). Delivery is proved with Debian's ``rsyslogd`` (tests/rsyslog_peer.py) receiving over
TCP (RFC 6587 octet counting) and TLS (RFC 5425), including a collector that is stopped and
started again while the node keeps working.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import rnc2rng
from lxml import etree

from reader.audit import PatientObject
from reader.audit import messages as m
from reader.audit.syslog import MSGID, format_message, frame
from reader.audit.trail import AuditTrail
from reader.config import AuditCollector, AuditConfig, load_config
from reader.errors import ConfigError
from reader.tls import TlsClientConfig
from tests.node_process import ReaderNode
from tests.peers import Orthanc, echoscu, missing, require_tool, wait_until
from tests.reliability import pacs_results, serve_config, store_responses, write_fixture_model, write_study
from tests.rsyslog_peer import Rsyslog, RsyslogTls, openssl_driver_missing
from tests.tls_certs import make_pki

SCHEMA = Path(__file__).with_name("dicom_audit_message.rnc")
DEADLINE_S = 120.0
FAMILY, GIVEN, PATIENT_ID = "Zyxwvutsr", "Qponmlk", "PID-AUD-4711"
PATIENT_NAME = f"{FAMILY}^{GIVEN}"
_SYSLOG = re.compile(  # RFC 5424: PRI VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD, BOM + MSG
    rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-) \xef\xbb\xbf(<AuditMessage.*</AuditMessage>)$")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# --- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    """The PS3.15 A.5.1.1 schema as an lxml RELAX NG validator."""
    return etree.RelaxNG(etree.fromstring(rnc2rng.dumps(rnc2rng.load(str(SCHEMA))).encode()))


def _valid(schema: etree.RelaxNG, xml: bytes) -> None:
    assert schema.validate(etree.fromstring(xml)), f"{schema.error_log.last_error}\n{xml.decode()}"


def _xml(line: bytes) -> bytes:
    match = _SYSLOG.match(line)
    assert match is not None, f"not an RFC 5424 audit message: {line[:200]!r}"
    return match.group(8)


def _parsed(lines: list[bytes]) -> list[ET.Element]:
    return [ET.fromstring(_xml(line)) for line in lines]


def _event(root: ET.Element) -> tuple[str, str, str]:
    """(EventID code, first EventTypeCode or "", EventActionCode)."""
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id = ident.find("EventID")
    assert event_id is not None
    types = ident.findall("EventTypeCode")
    return (event_id.get("csd-code", ""), types[0].get("csd-code", "") if types else "",
            ident.get("EventActionCode", ""))


def _outcome(root: ET.Element) -> str:
    ident = root.find("EventIdentification")
    assert ident is not None
    return ident.get("EventOutcomeIndicator", "")


def _objects(root: ET.Element, role: str) -> list[ET.Element]:
    return [o for o in root.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == role]


def _studies(root: ET.Element) -> set[str]:
    return {o.get("ParticipantObjectID", "") for o in _objects(root, "3")}


def _find(roots: list[ET.Element], event: tuple[str, str, str],
          study_uid: str | None = None) -> list[ET.Element]:
    return [r for r in roots if _event(r) == event and (study_uid is None or study_uid in _studies(r))]


RECEIVED = (m.INSTANCES_TRANSFERRED.value, "", "C")
SENT = (m.INSTANCES_TRANSFERRED.value, "", "R")
START = (m.APPLICATION_ACTIVITY.value, m.APPLICATION_START.value, "E")
STOP = (m.APPLICATION_ACTIVITY.value, m.APPLICATION_STOP.value, "E")
NODE_AUTH = (m.SECURITY_ALERT.value, m.NODE_AUTHENTICATION.value, "E")
LOGIN = (m.USER_AUTHENTICATION.value, m.LOGIN.value, "E")
RESTRICTED = (m.SECURITY_ALERT.value, m.USE_OF_RESTRICTED_FUNCTION.value, "E")
DELETED = (m.STUDY_DELETED.value, "", "D")

SOURCE = m.AuditSource("SECONDREADER", "RADIOLOGY")
NODE = m.Participant("SECONDREADER", False, ae_titles=("SECONDREADER",), address="reader-host")
MODALITY = m.Participant("MODALITY", True, ae_titles=("MODALITY",), address="10.1.2.3")
PATIENT = PatientObject(PATIENT_ID, PATIENT_NAME)


def _all_messages() -> list[bytes]:
    study = m.StudyObject("1.2.3.4", {CT_IMAGE: 20}, ("ACC-1",))
    user = m.Participant("alice", True, address="192.0.2.7")
    return [
        m.application_activity(SOURCE, NODE, started=True, launcher=m.Participant("reader", True)),
        m.application_activity(SOURCE, NODE, started=False),
        m.node_authentication(SOURCE, NODE, MODALITY, accepted=True),
        m.node_authentication(SOURCE, NODE, MODALITY, accepted=False, reason="unknown_calling_ae"),
        m.instances_transferred(SOURCE, MODALITY, NODE, [study], PATIENT, received=True),
        m.instances_transferred(SOURCE, NODE, MODALITY, [study, m.StudyObject("1.2.3.5")], PATIENT,
                                received=False, outcome=m.Outcome.MINOR_FAILURE, description="a\nb"),
        m.user_authentication(SOURCE, user, NODE, success=True),
        m.user_authentication(SOURCE, user, NODE, success=False, description="wrong password"),
        m.restricted_function(SOURCE, user, NODE, subject="reader:send/t1", description="send retried",
                              studies=[study], patient=PATIENT),
        m.study_deleted(SOURCE, NODE, [study], PATIENT),
    ]


# --- messages -----------------------------------------------------------------------------------

def test_every_message_is_valid_against_the_dicom_audit_schema(schema: etree.RelaxNG) -> None:
    """Each audit message the node builds (start, stop, association accepted and refused,
    instances received and sent, sign-in and refused sign-in, manual retry, study deleted) validates
    against the PS3.15 A.5.1.1 schema, is one line, and a message with its elements out of the
    schema's order does not (the validator is not vacuous)."""
    for xml in _all_messages():
        _valid(schema, xml)
        assert b"\n" not in xml
    broken = ET.fromstring(_all_messages()[0])
    source = broken.find("AuditSourceIdentification")
    assert source is not None
    broken.remove(source)
    broken.insert(0, source)
    assert not schema.validate(etree.fromstring(ET.tostring(broken)))


def test_instances_received_names_the_study_and_the_patient() -> None:
    """A.5.3.5 DICOM Instances Transferred for received instances: action C, the calling AE as
    requesting Source (110153) with its address, the node as Destination (110152), the study by
    Study Instance UID (110180) with its SOP class and count and accession, and the patient
    (type 1, role 1) by ID and name."""
    root = ET.fromstring(_all_messages()[4])
    assert _event(root) == RECEIVED and _outcome(root) == "0"
    source, destination = root.findall("ActiveParticipant")
    assert source.get("UserID") == "MODALITY" and source.get("UserIsRequestor") == "true"
    assert source.get("AlternativeUserID") == "AETITLES=MODALITY"
    assert (source.get("NetworkAccessPointID"), source.get("NetworkAccessPointTypeCode")) == ("10.1.2.3", "2")
    assert source.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert destination.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    assert destination.get("NetworkAccessPointTypeCode") == "1"  # a host name
    (study,) = _objects(root, "3")
    assert study.get("ParticipantObjectID") == "1.2.3.4" and study.get("ParticipantObjectTypeCode") == "2"
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert sop is not None and (sop.get("UID"), sop.get("NumberOfInstances")) == (CT_IMAGE, "20")
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC-1"  # type: ignore[union-attr]
    (patient,) = _objects(root, "1")
    assert patient.get("ParticipantObjectID") == PATIENT_ID
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.findtext("ParticipantObjectName") == PATIENT_NAME
    source_id = root.find("AuditSourceIdentification")
    assert source_id is not None and source_id.get("AuditSourceID") == "SECONDREADER"
    assert source_id.get("AuditEnterpriseSiteID") == "RADIOLOGY"


def test_syslog_message_is_rfc5424_with_octet_counting() -> None:
    """The syslog message has PRI authpriv.notice (85; 84 authpriv.warning for a failure),
    VERSION 1, a UTC timestamp, MSGID IHE+RFC-3881, no structured data and the XML after a BOM;
    the frame is MSG-LEN SP MSG (RFC 6587 3.4.1)."""
    xml = _all_messages()[0]
    line = format_message(xml, hostname="reader host", app_name="reader", procid=42)
    match = _SYSLOG.match(line)
    assert match is not None and match.group(1) == b"85" and match.group(6) == MSGID.encode()
    assert match.group(3) == b"readerhost" and match.group(5) == b"42" and match.group(8) == xml
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", match.group(2))
    assert format_message(xml, hostname="h", app_name="a", failure=True).startswith(b"<84>1 ")
    assert frame(line) == str(len(line)).encode() + b" " + line


def test_audit_configuration_is_typed_and_validated(tmp_path: Path) -> None:
    """``[audit]`` gives collectors (host, port, TLS trust), the file, the source ID and the
    retry ceiling; an unknown key, a repeated collector or a missing CA file is refused at start."""
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "reader.toml"
    config.write_text(f"""
[audit]
file = "trail/audit.log"
source_id = "READER-1"
enterprise_site = "HOSPITAL"
retry_max_seconds = 5
[[audit.collectors]]
host = "127.0.0.1"
port = 6514
tls = true
ca_certificates = "{pki.ca}"
[[audit.collectors]]
host = "arr.example"
port = 514
""", encoding="utf-8")
    audit = load_config(config).audit
    assert audit.file == tmp_path / "trail" / "audit.log" and audit.source_id == "READER-1"
    assert audit.retry_max.total_seconds() == 5 and audit.enterprise_site == "HOSPITAL"
    assert [c.key for c in audit.collectors] == ["127.0.0.1:6514", "arr.example:514"]
    assert audit.collectors[0].tls is not None and audit.collectors[1].tls is None
    assert load_config(None).audit == AuditConfig()
    collector = '[[audit.collectors]]\nhost = "a"\nport = 1\n'
    for text, key in [("[audit]\nbogus = 1\n", "audit.bogus"),
                      (collector * 2, "audit.collectors"),
                      (collector + 'tls = true\nca_certificates = "nope.pem"\n',
                       "audit.collectors[0].ca_certificates")]:
        config.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_config(config)
        assert err.value.key == key, err.value


# --- delivery to a real rsyslog -----------------------------------------------------------------

@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """A running rsyslogd on an ephemeral loopback port (plain TCP)."""
    collector = Rsyslog(tmp_path / "rsyslog")
    yield collector
    collector.stop()


def _trail(data_dir: Path, *collectors: AuditCollector) -> AuditTrail:
    trail = AuditTrail(AuditConfig(collectors=collectors, retry_max=timedelta(seconds=0.5)), data_dir,
                       "SECONDREADER")
    trail.start()
    return trail


@pytest.mark.integration
def test_sign_in_retry_and_cancel_reach_the_collector(tmp_path: Path, rsyslog: Rsyslog,
                                                      schema: etree.RelaxNG) -> None:
    """The functions the web pages and ``reader purge`` call (sign-in, refused sign-in, manual
    retry and cancel of a send, study deleted) each record one valid message, in the local audit
    file and at rsyslog, in order."""
    trail = _trail(tmp_path / "data", AuditCollector(rsyslog.host, rsyslog.port))
    try:
        trail.user_signed_in("alice", "192.0.2.7", success=True)
        trail.user_signed_in("mallory", "192.0.2.9", success=False, detail="wrong password")
        trail.send_retried("alice", "192.0.2.7", ticket="s1-v1-PACS", destination="PACS@pacs:104",
                           study_uid="1.2.3", patient=PATIENT)
        trail.send_cancelled("alice", "192.0.2.7", ticket="s2-v1-PACS", destination="PACS@pacs:104")
        trail.study_deleted("1.2.3", PATIENT, user="alice", address="192.0.2.7")
        wait_until(lambda: len(rsyslog.messages()) >= 5, 30, "5 audit messages at rsyslog")
    finally:
        trail.stop()
    lines = rsyslog.messages()
    assert lines == trail.file.read_bytes().splitlines()
    roots = _parsed(lines)
    for line in lines:
        _valid(schema, _xml(line))
    assert [_event(r) for r in roots] == [LOGIN, LOGIN, RESTRICTED, RESTRICTED, DELETED]
    assert [_outcome(r) for r in roots] == ["0", "4", "0", "0", "0"]
    deleted = roots[4]
    assert _studies(deleted) == {"1.2.3"}
    assert _objects(deleted, "1")[0].get("ParticipantObjectID") == PATIENT_ID
    assert roots[1].find("ActiveParticipant").get("UserID") == "mallory"  # type: ignore[union-attr]
    retry, cancel = roots[2], roots[3]
    details = [o.find("ParticipantObjectDetail") for o in _objects(retry, "20") + _objects(cancel, "20")]
    assert [d.get("value") for d in details if d is not None] == [  # base64 of the description
        "c2VuZCByZXRyaWVkIHRvIFBBQ1NAcGFjczoxMDQ=", "c2VuZCBjYW5jZWxsZWQgdG8gUEFDU0BwYWNzOjEwNA=="]
    assert _studies(retry) == {"1.2.3"} and _objects(retry, "1")[0].get("ParticipantObjectID") == PATIENT_ID
    assert lines[1].startswith(b"<84>1 ")  # the refused sign-in is a warning


@pytest.mark.integration
def test_messages_wait_on_disk_while_the_collector_is_down(tmp_path: Path, rsyslog: Rsyslog) -> None:
    """With rsyslog stopped, recording returns at once and the messages wait in the outbox, across
    a restart of the trail; when rsyslog is back they all arrive, once each and in order."""
    rsyslog.stop()
    data = tmp_path / "data"
    collector = AuditCollector(rsyslog.host, rsyslog.port)
    trail = _trail(data, collector)
    for i in range(5):
        trail.send_retried("op", "127.0.0.1", ticket=f"t{i}", destination="PACS@pacs:104")
    trail.stop()
    assert len(trail.senders[0].pending()) == 5 and rsyslog.messages() == []
    rsyslog.start()
    again = _trail(data, collector)
    try:
        wait_until(lambda: len(rsyslog.messages()) >= 5, 30, "the 5 waiting messages at rsyslog")
        wait_until(lambda: not again.senders[0].pending(), 10, "an empty outbox")
    finally:
        again.stop()
    assert rsyslog.messages() == again.file.read_bytes().splitlines()
    subjects = [_objects(r, "20")[0].get("ParticipantObjectID") for r in _parsed(rsyslog.messages())]
    assert subjects == [f"reader:send/t{i}" for i in range(5)]


@pytest.mark.integration
def test_tls_collector_receives_messages(tmp_path: Path, schema: etree.RelaxNG) -> None:
    """Over TLS (RFC 5425) to rsyslog's OpenSSL driver, the node verifying the collector's
    certificate against the configured CA, a message arrives intact."""
    require_tool("rsyslogd")
    if openssl_driver_missing():
        missing("rsyslog's OpenSSL stream driver is not installed: "
                "install the Debian package 'rsyslog-openssl'")
    pki = make_pki(tmp_path / "pki")
    collector = Rsyslog(tmp_path / "rsyslog", tls=RsyslogTls(pki.ca, pki.server_cert, pki.server_key))
    trail = _trail(tmp_path / "data", AuditCollector(
        "127.0.0.1", collector.port, TlsClientConfig(ca_certificates=pki.ca, server_name="localhost")))
    try:
        trail.user_signed_in("alice", "192.0.2.7", success=True)
        wait_until(lambda: len(collector.messages()) >= 1, 30, "the message at rsyslog over TLS")
    finally:
        trail.stop()
        collector.stop()
    (line,) = collector.messages()
    assert line == trail.file.read_bytes().splitlines()[0]
    _valid(schema, _xml(line))


# --- a real node --------------------------------------------------------------------------------

def _node_config(model: Path, rsyslog: Rsyslog) -> str:
    return serve_config(model) + f"""
[security]
allowed_callers = ["MODALITY"]

[audit]
retry_max_seconds = 0.5

[[audit.collectors]]
host = "{rsyslog.host}"
port = {rsyslog.port}
"""


def _at_collector(rsyslog: Rsyslog, event: tuple[str, str, str], study_uid: str | None = None) -> bool:
    return bool(_find(_parsed(rsyslog.messages()), event, study_uid))


def _results_in_pacs(orthanc: Orthanc, study: Any) -> bool:
    return {"SR", "SEG"} <= {r.modality for r in pacs_results(orthanc, study.study_uid, study.series_uid)}


@pytest.mark.integration
def test_node_audits_its_work_to_rsyslog_through_an_outage(tmp_path: Path, rsyslog: Rsyslog, orthanc: Orthanc,
                                                           schema: etree.RelaxNG) -> None:
    """A real node with rsyslog as its collector: application start, the accepted association,
    the instances received (with the study UID and the patient) and the results sent arrive at
    rsyslog, and a refused caller gives a Security Alert. With rsyslog stopped, another study is
    received, processed and delivered all the same; once rsyslog is back, every message written
    to the local audit file meanwhile arrives, in order, none lost. The node's ordinary log names
    neither the patient nor the patient ID."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model")
    node = ReaderNode(tmp_path / "node", config_text=_node_config(model, rsyslog),
                      destinations=[f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"])
    first = write_study(tmp_path / "a", patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    second = write_study(tmp_path / "b", patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    try:
        wait_until(lambda: _at_collector(rsyslog, START), 30, "Application Start at rsyslog")
        assert store_responses(node.host, node.port, node.ae_title, first.files) == ["Success"] * 20
        wait_until(lambda: _at_collector(rsyslog, SENT, first.study_uid), DEADLINE_S,
                   "the results-sent message of the first study at rsyslog")
        refused = echoscu(node.host, node.port, node.ae_title, calling_ae="INTRUDER")
        assert refused.returncode != 0
        wait_until(lambda: any(_outcome(r) == "4" for r in _find(_parsed(rsyslog.messages()), NODE_AUTH)),
                   30, "the refused association's Security Alert at rsyslog")

        rsyslog.stop()
        before = len(rsyslog.messages())
        assert store_responses(node.host, node.port, node.ae_title, second.files) == ["Success"] * 20
        wait_until(lambda: _results_in_pacs(orthanc, second), DEADLINE_S,
                   "the second study's results in the PACS while the collector is down")
        audit_file = node.data_dir / "audit" / "audit.log"
        wait_until(lambda: bool(_find(_parsed(audit_file.read_bytes().splitlines()), SENT, second.study_uid)),
                   30, "the second study's results-sent message in the local audit file")
        assert len(rsyslog.messages()) == before
        assert node.events("audit.collector_down"), node.log_tail()

        rsyslog.start()
        wait_until(lambda: _at_collector(rsyslog, SENT, second.study_uid), 60,
                   "the messages that waited, at rsyslog once it is back")
    finally:
        assert node.stop() == 0, node.log_tail()
    wait_until(lambda: len(rsyslog.messages()) == len(audit_file.read_bytes().splitlines()), 10,
               "every message of the audit file at rsyslog")
    lines = rsyslog.messages()
    assert lines == audit_file.read_bytes().splitlines(), "rsyslog got other messages, or another order"
    for line in lines:
        _valid(schema, _xml(line))
    roots = _parsed(lines)
    assert _event(roots[0]) == START and _event(roots[-1]) == STOP
    accepted = [r for r in _find(roots, NODE_AUTH) if _outcome(r) == "0"]
    assert accepted and all(r.findall("ActiveParticipant")[1].get("UserID") == "MODALITY" for r in accepted)
    for study in (first, second):
        (received,) = _find(roots, RECEIVED, study.study_uid)
        (patient,) = _objects(received, "1")
        assert patient.get("ParticipantObjectID") == PATIENT_ID
        assert patient.findtext("ParticipantObjectName") == PATIENT_NAME
        sop = received.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
        assert sop is not None and (sop.get("UID"), sop.get("NumberOfInstances")) == (CT_IMAGE, "20")
        sent = _find(roots, SENT, study.study_uid)
        assert sent and _objects(sent[0], "1")[0].get("ParticipantObjectID") == PATIENT_ID
        assert sent[0].findall("ActiveParticipant")[1].get("UserID") == orthanc.aet
    (rejected,) = [r for r in _find(roots, NODE_AUTH) if _outcome(r) == "4"]
    assert rejected.findall("ActiveParticipant")[1].get("UserID") == "INTRUDER"
    ordinary = node.log_path.read_text(encoding="utf-8", errors="replace")
    for needle in (FAMILY, GIVEN, PATIENT_ID):
        assert needle not in ordinary and needle.lower() not in ordinary.lower(), \
            f"{needle!r} in the node's ordinary log"
    assert PATIENT_ID.encode() in audit_file.read_bytes()
