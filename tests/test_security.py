"""Access control and DICOM TLS on real processes: ``reader serve`` fed by DCMTK, Orthanc over TLS.

Two ``reader serve`` processes are shared by the module: a plain one with an allow-list, and a TLS
one (BCP 195 profile, client certificates required) with an allow-list. Certificates come from
``tests/tls_certs.py`` (openssl CLI). Configuration checks and the allow-list decision are also
tested directly.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from reader.access import AccessPolicy, Verdict
from reader.assemble import CompletionTracker
from reader.config import NodeConfig, SendingConfig, load_config
from reader.dispatch import DicomDelivery, Dispatcher
from reader.errors import ConfigError, TransientSendError
from reader.jobs import JobStore, SendState
from reader.pipeline import destination_key
from reader.scp import StorageSCP
from reader.send import Destination, StoreSCU
from reader.spool import Spool
from reader.tls import TlsClientConfig, client_context
from tests.dicom_factory import ct_series, write_datasets
from tests.node_process import ReaderNode
from tests.peers import LOCALHOST, Orthanc, OrthancFactory, peer_env, require_tool, wait_until
from tests.tls_certs import Pki, make_pki

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0
OTHER_LOOPBACK = "127.0.0.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA with server and client certificates, and an untrusted CA with a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class Series:
    """A small synthetic CT series written as Part 10 files."""

    study_uid: str
    series_uid: str
    files: list[Path]


def _series(folder: Path, n: int = 3) -> Series:
    files = write_datasets(ct_series(n), folder)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return Series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files)


def _stored(node: ReaderNode, series: Series) -> list[Path]:
    folder = node.data_dir / "incoming" / series.study_uid / series.series_uid
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def _dcmtk(tool: str, port: int, calling_ae: str, files: Sequence[Path] = (),
           tls: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``echoscu``/``storescu`` against the node on ``LOCALHOST:port``, with TLS options."""
    exe = require_tool(tool)
    args = [exe, "-aet", calling_ae, "-aec", "SECONDREADER", "-to", "10", "-ta", "10", *tls,
            LOCALHOST, str(port), *(os.fspath(f) for f in files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=peer_env(), check=False)


def _tls_args(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """DCMTK options: TLS with our client key and certificate, trusting the test CA."""
    return ["+tls", os.fspath(key or pki.client_key), os.fspath(cert or pki.client_cert),
            "+cf", os.fspath(pki.ca)]


def _events(node: ReaderNode, name: str, **fields: str) -> list[dict[str, object]]:
    return [e for e in node.events(name) if all(e.get(k) == v for k, v in fields.items())]


# --- the allow-list on a plain port --------------------------------------------------------------

PLAIN_CONFIG = f"""
routes = []

[security]
allowed_callers = [
  {{ ae_title = "MODALITY" }},
  {{ ae_title = "CTSCANNER", addresses = ["{LOCALHOST}/32"] }},
  {{ ae_title = "WORKSTATION", addresses = ["{OTHER_LOOPBACK}"] }},
]
"""


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReaderNode]:
    """``reader serve`` with an allow-list: MODALITY from anywhere, CTSCANNER from 127.0.0.1 only,
    WORKSTATION from 127.0.0.2 only; no routes, so nothing but storing happens."""
    require_tool("storescu")
    node = ReaderNode(tmp_path_factory.mktemp("plain"), config_text=PLAIN_CONFIG)
    yield node
    node.stop()


def test_allowed_caller_echoes_and_stores(plain_node: ReaderNode, tmp_path: Path) -> None:
    """A calling AE title on the allow-list gets C-ECHO and C-STORE answered with Success."""
    series = _series(tmp_path)
    echo = _dcmtk("echoscu", plain_node.port, "MODALITY")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    store = _dcmtk("storescu", plain_node.port, "MODALITY", series.files)
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(_stored(plain_node, series)) == len(series.files)


def test_unknown_calling_ae_is_rejected_and_nothing_stored(plain_node: ReaderNode, tmp_path: Path) -> None:
    """A calling AE title not on the list gets A-ASSOCIATE-RJ "calling AE title not recognized",
    storescu fails, no instance is stored, and the refusal is logged with its reason."""
    series = _series(tmp_path)
    store = _dcmtk("storescu", plain_node.port, "INTRUDER", series.files)
    assert store.returncode != 0
    assert "Calling AE Title Not Recognized" in store.stdout + store.stderr
    echo = _dcmtk("echoscu", plain_node.port, "INTRUDER")
    assert echo.returncode != 0
    assert _stored(plain_node, series) == []
    wait_until(lambda: len(_events(plain_node, "association.rejected", calling_ae="INTRUDER",
                                   reason=Verdict.UNKNOWN_CALLING_AE.value)) >= 2,
               DEADLINE_S, "two association.rejected events for INTRUDER")


def _associate_from(source: str, port: int, calling_ae: str) -> tuple[bool, tuple[int, int, int] | None]:
    """Associate with a pynetdicom SCU whose socket is bound to ``source``; return (established,
    (result, source, reason) of an A-ASSOCIATE-RJ)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, port, ae_title="SECONDREADER", bind_address=(source, 0))
    try:
        if assoc.is_established:
            assert assoc.send_c_echo().Status == 0x0000
            return True, None
        rj = assoc.acceptor.primitive
        if not assoc.is_rejected or rj is None:
            return False, None
        return False, (int(rj.result or 0), int(rj.result_source or 0), int(rj.diagnostic or 0))
    finally:
        if assoc.is_established:
            assoc.release()


def test_allowed_title_from_another_address_is_rejected(plain_node: ReaderNode) -> None:
    """A title allowed only from 127.0.0.1 is rejected (permanent, service user, calling AE not
    recognized) when it calls from 127.0.0.2, and a title allowed from 127.0.0.2 gets in from there."""
    established, reason = _associate_from(OTHER_LOOPBACK, plain_node.port, "CTSCANNER")
    assert not established
    assert reason == (0x01, 0x01, 0x03)
    wait_until(lambda: bool(_events(plain_node, "association.rejected", calling_ae="CTSCANNER",
                                    reason=Verdict.ADDRESS_NOT_ALLOWED.value, address=OTHER_LOOPBACK)),
               DEADLINE_S, "association.rejected for CTSCANNER from 127.0.0.2")
    assert _associate_from(LOCALHOST, plain_node.port, "CTSCANNER") == (True, None)
    assert _associate_from(OTHER_LOOPBACK, plain_node.port, "WORKSTATION") == (True, None)
    assert _associate_from(LOCALHOST, plain_node.port, "WORKSTATION")[0] is False


def test_data_dir_is_readable_by_the_service_user_alone(plain_node: ReaderNode, tmp_path: Path) -> None:
    """A stored instance and every folder from it up to the data dir grant nothing to group or others."""
    series = _series(tmp_path, n=1)
    store = _dcmtk("storescu", plain_node.port, "MODALITY", series.files)
    assert store.returncode == 0, store.stdout + store.stderr
    (instance,) = _stored(plain_node, series)
    path = instance
    checked = []
    while True:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:o}: group/other may access it"
        checked.append(path)
        if path == plain_node.data_dir:
            break
        path = path.parent
    assert len(checked) == 5  # instance, series, study, incoming, data dir


def test_associations_beyond_the_limit_are_rejected(tmp_path: Path) -> None:
    """With max_associations = 1, a second concurrent association is rejected as transient
    "local limit exceeded" (PS3.8 Table 9-21) and a new one is accepted once the first is released."""
    config = NodeConfig(ae_title="SECONDREADER", bind_address=LOCALHOST, port=0, data_dir=tmp_path / "data",
                        max_associations=1)
    scp = StorageSCP(config, Spool(config.data_dir), CompletionTracker(config.completion))
    scp.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        first = ae.associate(LOCALHOST, scp.port, ae_title="SECONDREADER")
        assert first.is_established
        try:
            assert _associate_from(LOCALHOST, scp.port, "MODALITY") == (False, (0x02, 0x03, 0x02))
        finally:
            first.release()
        wait_until(lambda: _associate_from(LOCALHOST, scp.port, "MODALITY")[0], DEADLINE_S,
                   "an association to be accepted after the first is released")
    finally:
        scp.stop()


# --- DICOM TLS on the listening port --------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ReaderNode]:
    """``reader serve`` speaking only TLS, requiring a client certificate from the test CA, with an
    allow-list of MODALITY."""
    require_tool("storescu")
    config = f"""
routes = []

[security]
allowed_callers = ["MODALITY"]

[security.tls]
enabled = true
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
ca_certificates = "{pki.ca}"
require_client_certificate = true
"""
    node = ReaderNode(tmp_path_factory.mktemp("tls"), config_text=config)
    yield node
    node.stop()


def test_tls_store_with_client_certificate_succeeds(tls_node: ReaderNode, pki: Pki, tmp_path: Path) -> None:
    """storescu over TLS with a client certificate from the trusted CA stores every instance, and
    the node logs the TLS version (1.2 or later) and the client's certificate name."""
    series = _series(tmp_path)
    store = _dcmtk("storescu", tls_node.port, "MODALITY", series.files, _tls_args(pki))
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(_stored(tls_node, series)) == len(series.files)
    established = _events(tls_node, "tls.established", peer_cn="MODALITY")
    assert established and {e["version"] for e in established} <= {"TLSv1.2", "TLSv1.3"}


def test_tls_port_refuses_plaintext(tls_node: ReaderNode, tmp_path: Path) -> None:
    """A plain (non-TLS) association to the TLS port fails and stores nothing."""
    series = _series(tmp_path)
    store = _dcmtk("storescu", tls_node.port, "MODALITY", series.files)
    assert store.returncode != 0
    assert _stored(tls_node, series) == []


def test_tls_refuses_untrusted_or_missing_client_certificate(tls_node: ReaderNode, pki: Pki,
                                                            tmp_path: Path) -> None:
    """A client certificate from another CA, or none at all, ends the connection in the handshake:
    nothing is stored and the node logs tls.refused."""
    series = _series(tmp_path)
    rogue = _dcmtk("storescu", tls_node.port, "MODALITY", series.files,
                   _tls_args(pki, pki.rogue_client_cert, pki.rogue_client_key))
    assert rogue.returncode != 0
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    no_cert = client_context(TlsClientConfig(ca_certificates=pki.ca))
    assoc = ae.associate(LOCALHOST, tls_node.port, ae_title="SECONDREADER", tls_args=(no_cert, "localhost"))
    established = assoc.is_established
    if established:
        assoc.abort()
    assert not established
    assert _stored(tls_node, series) == []
    wait_until(lambda: bool(_events(tls_node, "tls.refused", reason="CERTIFICATE_VERIFY_FAILED")),
               DEADLINE_S, "tls.refused for the untrusted certificate")
    wait_until(lambda: bool(_events(tls_node, "tls.refused", reason="PEER_DID_NOT_RETURN_A_CERTIFICATE")),
               DEADLINE_S, "tls.refused for the missing certificate")


def test_tls_allow_list_still_applies(tls_node: ReaderNode, pki: Pki) -> None:
    """A peer with a valid client certificate but an AE title not on the list is rejected."""
    echo = _dcmtk("echoscu", tls_node.port, "INTRUDER", tls=_tls_args(pki))
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stdout + echo.stderr


def test_tls_1_1_is_refused(tls_node: ReaderNode, pki: Pki) -> None:
    """A client limited to TLS 1.1 cannot complete a handshake; the node names the protocol version."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1 at all
        except (ValueError, ssl.SSLError) as exc:
            pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot make a TLS 1.1 client: {exc}")
    with socket.create_connection((LOCALHOST, tls_node.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError) as refused:
        context.wrap_socket(raw, server_hostname="localhost")
    if "NO_PROTOCOLS_AVAILABLE" in str(refused.value):
        pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) refuses to send a TLS 1.1 ClientHello")
    wait_until(lambda: bool(_events(tls_node, "tls.refused", reason="UNSUPPORTED_PROTOCOL")),
               DEADLINE_S, "tls.refused with reason UNSUPPORTED_PROTOCOL")


def test_silent_connection_does_not_block_the_tls_listener(tls_node: ReaderNode, pki: Pki) -> None:
    """A TCP client that connects and never starts the handshake does not stop others from associating."""
    with socket.create_connection((LOCALHOST, tls_node.port), timeout=10):
        echo = _dcmtk("echoscu", tls_node.port, "MODALITY", tls=_tls_args(pki))
        assert echo.returncode == 0, echo.stdout + echo.stderr


# --- DICOM TLS when sending -------------------------------------------------------------------------


def _tls_orthanc(orthanc_factory: OrthancFactory, pki: Pki) -> Orthanc:
    return orthanc_factory(extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": os.fspath(pki.server_cert),
        "DicomTlsPrivateKey": os.fspath(pki.server_key),
        "DicomTlsTrustedCertificates": os.fspath(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    })


def test_store_scu_delivers_to_orthanc_over_tls(orthanc_factory: OrthancFactory, pki: Pki,
                                                tmp_path: Path) -> None:
    """StoreSCU with a TLS destination (verified server certificate, our client certificate)
    delivers to an Orthanc that speaks only TLS; a wrong CA or a wrong server name does not."""
    orthanc = _tls_orthanc(orthanc_factory, pki)
    series = _series(tmp_path)
    scu = StoreSCU("SECONDREADER")
    good = TlsClientConfig(ca_certificates=pki.ca, certificate=pki.client_cert, private_key=pki.client_key)
    for bad in (TlsClientConfig(ca_certificates=pki.rogue_ca, certificate=pki.client_cert,
                                private_key=pki.client_key),
                TlsClientConfig(ca_certificates=pki.ca, certificate=pki.client_cert,
                                private_key=pki.client_key, server_name="pacs.example.org")):
        with pytest.raises(TransientSendError, match="TLS"):
            scu.send(Destination(orthanc.aet, LOCALHOST, orthanc.dicom_port, tls=bad), series.files)
    with pytest.raises(TransientSendError):
        scu.send(Destination(orthanc.aet, LOCALHOST, orthanc.dicom_port), series.files)  # plaintext
    assert orthanc.instances() == []
    report = scu.send(Destination(orthanc.aet, LOCALHOST, orthanc.dicom_port, tls=good), series.files)
    assert len(report.sent) == len(series.files)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files}
    assert orthanc.sop_instance_uids() == expected


def test_dispatcher_finds_tls_settings_by_ticket_key(orthanc_factory: OrthancFactory, pki: Pki,
                                                     tmp_path: Path) -> None:
    """A send ticket names its destination as AE@HOST:PORT; the dispatcher sends it with the TLS
    settings of the configured destination of that key."""
    orthanc = _tls_orthanc(orthanc_factory, pki)
    series = _series(tmp_path / "files", n=1)
    dest = Destination(orthanc.aet, LOCALHOST, orthanc.dicom_port, tls=TlsClientConfig(
        ca_certificates=pki.ca, certificate=pki.client_cert, private_key=pki.client_key))
    key = destination_key(dest.ae_title, dest.host, dest.port)
    jobs = JobStore(Spool(tmp_path / "data"))
    ticket = jobs.add_send(series.series_uid, 1, key, series.files)
    scu = StoreSCU("SECONDREADER")
    dispatcher = Dispatcher(jobs, SendingConfig(), {key: DicomDelivery(scu, dest)}, scu)
    done = dispatcher.attempt(ticket)
    assert done.state is SendState.DONE, done.last_error
    assert len(orthanc.instances()) == 1


# --- configuration and the allow-list decision ----------------------------------------------------


def test_allow_list_decisions() -> None:
    """The decision admits everyone without a list, and otherwise only listed titles from their
    networks (IPv4-mapped IPv6 addresses included), naming the reason for a refusal."""
    assert AccessPolicy().decide("ANYONE", "192.0.2.1").verdict is Verdict.OPEN
    policy = AccessPolicy.allow([("PACS", ["10.0.0.0/8", "fd00::/8"]), ("PACS", ["192.0.2.7"]),
                                 ("CT1", [])])
    cases = {
        ("PACS", "10.1.2.3"): Verdict.ALLOWED,
        ("PACS", "::ffff:10.1.2.3"): Verdict.ALLOWED,
        ("PACS", "fd12::1"): Verdict.ALLOWED,
        ("PACS", "192.0.2.7"): Verdict.ALLOWED,
        ("PACS  ", "192.0.2.7"): Verdict.ALLOWED,
        ("PACS", "192.0.2.8"): Verdict.ADDRESS_NOT_ALLOWED,
        ("PACS", "not-an-ip"): Verdict.UNREADABLE_ADDRESS,
        ("pacs", "10.1.2.3"): Verdict.UNKNOWN_CALLING_AE,
        ("CT1", "203.0.113.9"): Verdict.ALLOWED,
        ("CT2", "10.1.2.3"): Verdict.UNKNOWN_CALLING_AE,
    }
    for (title, address), verdict in cases.items():
        decision = policy.decide(title, address)
        assert decision.verdict is verdict, (title, address)
        assert decision.accepted is (verdict is Verdict.ALLOWED)
    assert policy.ae_titles == ("PACS", "CT1")


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reader.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_security_config_loads(tmp_path: Path, pki: Pki) -> None:
    """A configuration with an allow-list, TLS on the port, a TLS destination and limits loads into
    typed settings, with paths relative to the file."""
    (tmp_path / "certs").symlink_to(pki.ca.parent)
    config = load_config(_write_config(tmp_path, """
[node]
max_pdu_bytes = 65536
acse_timeout_seconds = 10
dimse_timeout_seconds = 20
network_timeout_seconds = 40

[security]
allowed_callers = [{ ae_title = "PACS", addresses = ["10.0.0.0/8"] }, "CT1"]

[security.tls]
enabled = true
certificate = "certs/server.pem"
private_key = "certs/server.key"
ca_certificates = "certs/ca.pem"
require_client_certificate = true

[[destinations]]
ae_title = "PACS"
host = "pacs.example.org"
port = 2762
tls = true
ca_certificates = "certs/ca.pem"
certificate = "certs/client.pem"
private_key = "certs/client.key"
"""))
    assert config.max_pdu_bytes == 65536
    assert config.acse_timeout.total_seconds() == 10
    assert config.network_timeout.total_seconds() == 40
    assert config.security.access.ae_titles == ("PACS", "CT1")
    tls = config.security.tls
    assert tls is not None and tls.require_client_certificate
    assert tls.ca_certificates == tmp_path / "certs" / "ca.pem"
    (dest,) = config.destinations
    assert dest.tls is not None and dest.tls.certificate == tmp_path / "certs" / "client.pem"
    assert hash(dest) == hash(Destination("PACS", "pacs.example.org", 2762, tls=dest.tls))


@pytest.mark.parametrize(("text", "key"), [
    ('[security.tls]\nenabled = true\ncertificate = "missing.pem"\nprivate_key = "certs/server.key"\n',
     "security.tls.certificate"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/server.key"\nprivate_key = "certs/server.key"\n',
     "security.tls.certificate"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/server.pem"\n', "security.tls.private_key"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/server.pem"\n'
     'private_key = "certs/server-encrypted.key"\n', "security.tls.certificate"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/client.pem"\nprivate_key = "certs/server.key"\n',
     "security.tls.certificate"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/server.pem"\nprivate_key = "certs/server.key"\n'
     "require_client_certificate = true\n", "security.tls.ca_certificates"),
    ('[security.tls]\nenabled = true\ncertificate = "certs/server.pem"\nprivate_key = "certs/server.key"\n'
     'ca_certificates = "certs/server.key"\n', "security.tls.ca_certificates"),
    ('[security]\nallowed_callers = [{ ae_title = "PACS", addresses = ["10.0.0.1/8"] }]\n',
     "security.allowed_callers[0].addresses[0]"),
    ('[security]\nallowed_callers = [{ ae_title = "PACS", addresses = ["pacs.example.org"] }]\n',
     "security.allowed_callers[0].addresses[0]"),
    ('[security]\nallowed_callers = [{ ae_title = "A\\\\B" }]\n', "security.allowed_callers[0].ae_title"),
    ('[security]\nallowed_callers = [{ ae_title = "PACS", adresses = [] }]\n',
     "security.allowed_callers[0].adresses"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\ntls = true\nca_certificates = "no.pem"\n',
     "destinations[0].ca_certificates"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\ncertificate = "certs/client.pem"\n',
     "destinations[0].certificate"),
    ('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\ntls = true\n'
     'ca_certificates = "certs/ca.pem"\ncertificate = "certs/client.pem"\n', "destinations[0].certificate"),
    ("[node]\nmax_pdu_bytes = 100\n", "node.max_pdu_bytes"),
    ("[node]\nnetwork_timeout_seconds = 0\n", "node.network_timeout_seconds"),
])
def test_invalid_security_config_names_the_key(tmp_path: Path, pki: Pki, text: str, key: str) -> None:
    """A missing or unloadable certificate, key or CA file, a bad network, AE title or limit is a
    ConfigError naming the key, raised at load time."""
    (tmp_path / "certs").symlink_to(pki.ca.parent)
    with pytest.raises(ConfigError) as error:
        load_config(_write_config(tmp_path, text))
    assert error.value.key == key, str(error.value)
