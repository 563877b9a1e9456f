"""DICOMweb destinations: results stored by STOW-RS (``reader.dicomweb``), with the retry and parking
rules of the C-STORE destinations.

Peers are real: Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``) and HTTP basic
authentication as the STOW-RS server, a ``reader serve`` process (tests/node_process.py) with the
fixture model of tests/reliability.py, and, for answers Orthanc cannot be made to give (a 409 with a
Failed SOP Sequence, a 503, a redirect), a loopback HTTP server answering a STOW-RS response data
set built with pydicom.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from reader import dimse
from reader.config import load_config
from reader.dicomweb import (
    Credential,
    StowAuth,
    StowDestination,
    failed_instances,
    store_instances,
)
from reader.errors import ConfigError, PermanentSendError, SendError, TransientSendError
from reader.jobs import JobStore, SendState, SendTicket
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import LOCALHOST, Orthanc, free_port, require_tool, storescu, wait_until
from tests.reliability import serve_config, write_fixture_model, write_study
from tests.tls_certs import Pki, make_pki
from tests.viewers import DICOMWEB_ROOT, dicomweb_config

DEADLINE_S = 120.0
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
USER, PASSWORD = "reader", "correct-horse-battery"
WRONG_PASSWORD = "wrong-staple-1234"


# --- a loopback STOW-RS peer that answers what a test sets -------------------------------------------


@dataclass
class StowPeer:
    """A loopback HTTP server answering every POST with ``status``, ``body`` and ``content_type``."""

    server: ThreadingHTTPServer
    status: int = 200
    body: bytes = b""
    content_type: str = "application/dicom+json"
    headers: list[dict[str, str]] = field(default_factory=list)
    scheme: str = "http"

    def url(self, path: str = "/dicom-web") -> str:
        """The base URL of ``path`` on this server."""
        return f"{self.scheme}://{LOCALHOST}:{self.server.server_address[1]}{path}"


def _serve(context: ssl.SSLContext | None = None) -> tuple[StowPeer, threading.Thread]:
    """Start a :class:`StowPeer` on an ephemeral loopback port, over TLS when ``context`` is given."""
    holder: list[StowPeer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state = holder[0]
            length = int(self.headers.get("Content-Length", "0"))
            if length:
                self.rfile.read(length)
            else:  # chunked
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    self.rfile.read(size + 2)
                self.rfile.readline()
            state.headers.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(state.status)
            if 300 <= state.status < 400:
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    holder.append(StowPeer(server, scheme="https" if context is not None else "http"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return holder[0], thread


def _shut(peer: StowPeer, thread: threading.Thread) -> None:
    peer.server.shutdown()
    peer.server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def peer() -> Iterator[StowPeer]:
    """A running plain-HTTP :class:`StowPeer`; shut down at teardown."""
    running, thread = _serve()
    yield running
    _shut(running, thread)


@pytest.fixture
def tls_peer(tmp_path: Path) -> Iterator[tuple[StowPeer, Pki]]:
    """A :class:`StowPeer` over HTTPS with a certificate for 127.0.0.1 from the test CA."""
    pki = make_pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    running, thread = _serve(context)
    yield running, pki
    _shut(running, thread)


def _result_file(folder: Path) -> tuple[Path, str]:
    """A small valid Part 10 file (a Basic Text SR header is enough for the HTTP layer); its UID."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _stow_response(failed: Sequence[tuple[str, int]], stored: Sequence[str] = ()) -> bytes:
    """A STOW-RS response data set (PS3.18 Table 10.5.3-1) in DICOM JSON, built with pydicom."""
    response = Dataset()
    response.RetrieveURL = "http://pacs/dicom-web/studies/1.2.3"
    items = []
    for uid, reason in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = SR_STORAGE
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        items.append(item)
    response.FailedSOPSequence = items
    ok = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = SEG_STORAGE
        item.ReferencedSOPInstanceUID = uid
        item.RetrieveURL = f"http://pacs/dicom-web/studies/1.2.3/series/4.5/instances/{uid}"
        ok.append(item)
    response.ReferencedSOPSequence = ok
    return json.dumps(response.to_json_dict()).encode("utf-8")


# --- response parsing and classification -------------------------------------------------------------


def test_failed_sop_sequence_parks_with_each_instance_and_reason(peer: StowPeer, tmp_path: Path) -> None:
    """A 409 whose Failed SOP Sequence names two instances is permanent, and the recorded reason
    names each instance with its Failure Reason."""
    (first, uid1), (second, uid2) = _result_file(tmp_path / "a"), _result_file(tmp_path / "b")
    peer.status = 409
    peer.body = _stow_response([(uid1, dimse.CANNOT_UNDERSTAND), (uid2, dimse.DATASET_MISMATCH)])
    parsed = failed_instances(Dataset.from_json(peer.body.decode()))
    assert [(f.sop_instance_uid, f.reason) for f in parsed] == [(uid1, 0xC000), (uid2, 0xA900)]
    with pytest.raises(PermanentSendError) as caught:
        store_instances(StowDestination(peer.url()), [first, second])
    message = str(caught.value)
    assert "HTTP 409" in message and "2 instance(s) failed" in message
    assert f"{uid1}: 0xC000 (error: cannot understand)" in message
    assert f"{uid2}: 0xA900 (error: data set does not match SOP class)" in message


def test_partial_success_names_only_the_failed_instances(peer: StowPeer, tmp_path: Path) -> None:
    """A 202 that stored one instance and failed another parks the ticket, naming only the failed
    one; a 200 without failures is delivered."""
    (first, uid1), (second, uid2) = _result_file(tmp_path / "a"), _result_file(tmp_path / "b")
    peer.status = 202
    peer.body = _stow_response([(uid2, 0xC122)], stored=[uid1])
    with pytest.raises(PermanentSendError) as caught:
        store_instances(StowDestination(peer.url()), [first, second])
    assert uid2 in str(caught.value) and uid1 not in str(caught.value)
    assert caught.value.status == 0xC122

    peer.status, peer.body = 200, _stow_response([], stored=[uid1, uid2])
    peer.content_type = "application/dicom+json; charset=utf-8"
    report = store_instances(StowDestination(peer.url()), [first, second])
    assert report.http_status == 200 and report.sent == (uid1, uid2)


@pytest.mark.parametrize(("status", "body", "error"), [
    (503, b"", TransientSendError),
    (500, b"", TransientSendError),
    (429, b"", TransientSendError),
    (401, b"", PermanentSendError),
    (403, b"", PermanentSendError),
    (404, b"", PermanentSendError),
    (409, b"", PermanentSendError),
    (302, b"", PermanentSendError),
    (202, "OUT_OF_RESOURCES", TransientSendError),
])
def test_http_statuses_are_classified(peer: StowPeer, tmp_path: Path, status: int, body: Any,
                                      error: type[SendError]) -> None:
    """5xx and 429 are retried, other 4xx and redirects park the ticket; a failure whose only reason
    is out of resources (0xA7xx) is retried, as a C-STORE answered 0xA700 is."""
    path, uid = _result_file(tmp_path)
    peer.status = status
    peer.body = _stow_response([(uid, dimse.OUT_OF_RESOURCES)]) if body == "OUT_OF_RESOURCES" else body
    with pytest.raises(error) as caught:
        store_instances(StowDestination(peer.url()), [path])
    assert type(caught.value) is error
    assert ("redirect" if status == 302 else f"HTTP {status}") in str(caught.value)


def test_no_server_and_timeouts_are_transient(tmp_path: Path) -> None:
    """Connection refused and a server that never answers are transient failures."""
    path, _ = _result_file(tmp_path)
    with pytest.raises(TransientSendError, match="connection failed"):
        store_instances(StowDestination(f"http://{LOCALHOST}:{free_port()}/dicom-web"), [path])
    with socket.socket() as silent:
        silent.bind((LOCALHOST, 0))
        silent.listen(1)
        url = f"http://{LOCALHOST}:{silent.getsockname()[1]}/dicom-web"
        with pytest.raises(TransientSendError, match="timed out"):
            store_instances(StowDestination(url, timeout_s=0.5), [path])


def test_bearer_token_is_sent_and_never_logged(peer: StowPeer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bearer token read from the environment goes in the Authorization header and in no log
    event; a token file that vanishes after start-up makes the attempt transient, not a crash."""
    path, uid = _result_file(tmp_path)
    monkeypatch.setenv("READER_TEST_TOKEN", "tok-9f8e7d6c5b4a")
    peer.body = _stow_response([], stored=[uid])
    destination = StowDestination(peer.url(), auth=StowAuth.BEARER,
                                  secret=Credential(env="READER_TEST_TOKEN"))
    with capture_logs() as logs:
        store_instances(destination, [path])
    assert peer.headers[-1]["authorization"] == "Bearer tok-9f8e7d6c5b4a"
    assert "tok-9f8e7d6c5b4a" not in repr(logs) + repr(destination)
    gone = StowDestination(peer.url(), auth=StowAuth.BEARER, secret=Credential(file=tmp_path / "absent"))
    with pytest.raises(TransientSendError, match="credential unavailable"):
        store_instances(gone, [path])


def test_https_certificates_are_verified(tls_peer: tuple[StowPeer, Pki], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTPS the server's certificate is verified: trusted through ``ca_certificates`` the
    results and the basic credentials go through, even with REQUESTS_CA_BUNDLE naming another CA;
    with the default trust or another CA the attempt fails transiently (the certificate may be
    fixed) and nothing is sent."""
    peer, pki = tls_peer
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.rogue_ca))
    path, uid = _result_file(tmp_path)
    (tmp_path / "pw").write_text("tls-password", encoding="utf-8")
    peer.body = _stow_response([], stored=[uid])
    for untrusted in (None, pki.rogue_ca):
        with pytest.raises(TransientSendError, match="TLS handshake or certificate check failed"):
            store_instances(StowDestination(peer.url(), ca_certificates=untrusted), [path])
    assert peer.headers == []
    trusted = StowDestination(peer.url(), auth=StowAuth.BASIC, username="reader",
                              secret=Credential(file=tmp_path / "pw"), ca_certificates=pki.ca)
    assert store_instances(trusted, [path]).sent == (uid,)
    assert peer.headers[-1]["authorization"].startswith("Basic ")


# --- configuration ------------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "reader.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_dicomweb_destination_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[[destinations]]`` with ``url`` gives a STOW-RS destination whose key is stable and distinct
    from the C-STORE form; the password stays in its file, out of the configuration's repr."""
    (tmp_path / "pw").write_text("s3cret-value\n", encoding="utf-8")
    monkeypatch.setenv("PACS_TOKEN", "token-value")
    config = _load(tmp_path, """
[[destinations]]
url = "HTTPS://PACS.example.org:8443/dicom-web/"
auth = "basic"
username = "reader"
password_file = "pw"

[[destinations]]
url = "https://other.example.org/dicom-web"
auth = "bearer"
token_env = "PACS_TOKEN"

[[destinations]]
ae_title = "PACS"
host = "pacs.example.org"
port = 104
""")
    basic, bearer, dicom = config.destinations
    assert isinstance(basic, StowDestination) and isinstance(bearer, StowDestination)
    assert basic.key == "stow:https://pacs.example.org:8443/dicom-web"
    assert basic.secret == Credential(file=tmp_path / "pw") and basic.secret.read() == "s3cret-value"
    assert bearer.auth is StowAuth.BEARER and bearer.secret == Credential(env="PACS_TOKEN")
    assert str(dicom) == "PACS@pacs.example.org:104"
    assert "s3cret-value" not in repr(config) and "token-value" not in repr(config)
    assert load_config(None, {"destinations": ["http://127.0.0.1:8042/dicom-web"]}).destinations == (
        StowDestination("http://127.0.0.1:8042/dicom-web"),)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    """The commented DICOMweb destination of deploy/reader.example.toml, uncommented (with its files
    made), is a valid configuration: basic auth with a password file and a CA bundle."""
    example = (Path(__file__).resolve().parents[1] / "deploy" / "reader.example.toml").read_text("utf-8")
    start = example.index("# [[destinations]]", example.index("results stored by STOW-RS"))
    block = example[start:].split("\n\n")[0]
    text = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    (tmp_path / "pw").write_text("pw-from-file", encoding="utf-8")
    (tmp_path / "ca.pem").write_text("unused", encoding="utf-8")
    text = text.replace("/etc/reader/pacs-password", str(tmp_path / "pw"))
    text = text.replace("/etc/reader/tls/pacs-ca.pem", str(tmp_path / "ca.pem"))
    (destination,) = _load(tmp_path, text).destinations
    assert isinstance(destination, StowDestination) and destination.auth is StowAuth.BASIC
    assert destination.key == "stow:https://pacs.example.org/dicom-web"
    assert destination.ca_certificates == tmp_path / "ca.pem" and destination.timeout_s == 60


@pytest.mark.parametrize(("table", "key"), [
    ('url = "https://reader:pw@pacs/dicom-web"', "destinations[0]"),
    ('url = "ftp://pacs/dicom-web"', "destinations[0]"),
    ('url = "https://pacs/dicom-web?x=1"', "destinations[0]"),
    ('url = "https://pacs/dicom-web"\nauth = "digest"', "destinations[0].auth"),
    ('url = "https://pacs/dicom-web"\nauth = "basic"\nusername = "r"', "destinations[0].password_env"),
    ('url = "https://pacs/dicom-web"\nauth = "basic"\nusername = "r"\npassword_env = "UNSET_VAR_X"',
     "destinations[0].password_env"),
    ('url = "https://pacs/dicom-web"\nauth = "basic"\npassword_file = "missing"',
     "destinations[0].password_file"),
    ('url = "https://pacs/dicom-web"\ntoken_file = "t"', "destinations[0].token_file"),
    ('url = "https://pacs/dicom-web"\nca_certificates = "none.pem"', "destinations[0].ca_certificates"),
    ('url = "https://pacs/dicom-web"\nport = 104', "destinations[0].port"),
    ('url = "http://pacs/dicom-web"\nauth = "bearer"\ntoken_file = "reader.toml"', "destinations[0]"),
])
def test_invalid_dicomweb_destinations_are_refused(tmp_path: Path, table: str, key: str) -> None:
    """Credentials in the URL, another scheme, a query, an unknown auth, a missing or unreadable
    password, a token without bearer auth, a missing CA bundle, a DICOM key, or credentials over
    plain http to a host that is not loopback refuse to start."""
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"[[destinations]]\n{table}\n")
    assert caught.value.key == key
    assert "pw@" not in str(caught.value)


def test_a_destination_given_twice_is_refused(tmp_path: Path) -> None:
    """Two destinations that send tickets would name alike (the same URL but for case and a final
    slash) are a configuration error."""
    with pytest.raises(ConfigError, match="repeats destinations"):
        _load(tmp_path, '[[destinations]]\nurl = "https://pacs/dicom-web"\n'
                        '[[destinations]]\nurl = "https://PACS/dicom-web/"\n')


# --- end to end: a reader serve process and Orthanc with DICOMweb and basic auth ---------------------


def _dicomweb_orthanc(workdir: Path, *, http_port: int | None = None) -> Orthanc:
    """Orthanc with its DICOMweb plugin and HTTP basic authentication (user ``reader``)."""
    extra = {**dicomweb_config(), "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}}
    if http_port is not None:
        extra["HttpPort"] = http_port
    return Orthanc.start(workdir, extra_config=extra)


def _stow_url(port: int) -> str:
    return f"http://{LOCALHOST}:{port}{DICOMWEB_ROOT.rstrip('/')}"


def _destination_toml(url: str, password_file: Path) -> str:
    return (f'\n[[destinations]]\nurl = "{url}"\nauth = "basic"\nusername = "{USER}"\n'
            f"password_file = {json.dumps(str(password_file))}\ntimeout_seconds = 20\n")


def _qido_modalities(orthanc: Orthanc, study_uid: str) -> set[str]:
    """Modalities of the instances of ``study_uid`` that a QIDO-RS search finds at ``orthanc``."""
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    client = DICOMwebClient(url=_stow_url(orthanc.http_port), session=session)
    found = client.search_for_instances(study_instance_uid=study_uid, fields=["00080060"])
    return {str(Dataset.from_json(item).get("Modality", "")) for item in found}


def _tickets(node: ReaderNode, key: str) -> list[SendTicket]:
    return [t for t in JobStore(Spool(node.data_dir)).sends() if t.destination == key]


def _alive(node: ReaderNode) -> None:
    if node.process.poll() is not None:
        raise AssertionError(f"reader serve died:\n{node.log_tail()}")


@pytest.mark.integration
def test_results_reach_orthanc_by_stow_and_a_wrong_password_parks(tmp_path: Path) -> None:
    """The node stores its SR and SEG by STOW-RS in an Orthanc that requires basic auth, where QIDO-RS
    finds them; the same results to an Orthanc given the wrong password get HTTP 401 and are
    parked after one attempt with the reason recorded; no password reaches the log."""
    require_tool("storescu")
    good, bad = _dicomweb_orthanc(tmp_path / "good"), _dicomweb_orthanc(tmp_path / "bad")
    (tmp_path / "right").write_text(PASSWORD + "\n", encoding="utf-8")
    (tmp_path / "wrong").write_text(WRONG_PASSWORD + "\n", encoding="utf-8")
    good_url, bad_url = _stow_url(good.http_port), _stow_url(bad.http_port)
    model = write_fixture_model(tmp_path / "model")
    config = (serve_config(model) + _destination_toml(good_url, tmp_path / "right")
              + _destination_toml(bad_url, tmp_path / "wrong"))
    node = ReaderNode(tmp_path / "node", config_text=config)
    try:
        study = write_study(tmp_path / "study")
        assert storescu(node.host, node.port, node.ae_title, list(study.files)).returncode == 0

        def stored() -> bool:
            _alive(node)
            return {"SR", "SEG", "KO"} <= _qido_modalities(good, study.study_uid)
        wait_until(stored, DEADLINE_S, "the SR, SEG and KOS in Orthanc, found by QIDO-RS")

        def parked() -> bool:
            _alive(node)
            return any(t.state is SendState.FAILED for t in _tickets(node, "stow:" + bad_url))
        wait_until(parked, DEADLINE_S, "the ticket with the wrong password parked")
        wait_until(lambda: [t.state for t in _tickets(node, "stow:" + good_url)] == [SendState.DONE],
                   DEADLINE_S, "the ticket to the right Orthanc done")
        (ticket,) = _tickets(node, "stow:" + bad_url)
        assert ticket.attempts == 1, ticket
        assert "HTTP 401" in ticket.last_error and "unauthorized" in ticket.last_error
        assert not bad.instances()
        assert good.sop_instance_uids() == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                            for f in ticket.files}, "Orthanc holds exactly our results"
        parks = node.events("send.parked")
        assert [e["reason"] for e in parks] == ["permanent"] and parks[0]["destination"] == "stow:" + bad_url
        assert not [e for e in node.events("send.retry_scheduled") if e["destination"] == "stow:" + bad_url]
        sent = [e for e in node.events("result.sent") if e["destination"] == "stow:" + good_url]
        assert sent and sent[0]["http_status"] == 200 and sent[0]["instances"] == 3  # SEG, SR and KOS
    finally:
        assert node.stop() == 0, node.log_tail()
        good.kill()
        bad.kill()
    text = node.log_path.read_text(encoding="utf-8")
    assert PASSWORD not in text and WRONG_PASSWORD not in text


@pytest.mark.integration
def test_results_wait_for_a_dicomweb_server_that_is_down(tmp_path: Path) -> None:
    """With the DICOMweb server down the send is retried with backoff (transient, not parked), and
    the SR and SEG are stored once Orthanc starts again on the same port and storage."""
    require_tool("storescu")
    first = _dicomweb_orthanc(tmp_path / "pacs")
    port = first.http_port
    first.stop()  # down before the results are made
    url = _stow_url(port)
    (tmp_path / "right").write_text(PASSWORD, encoding="utf-8")
    model = write_fixture_model(tmp_path / "model")
    config = serve_config(model, retry_initial_seconds=0.3, retry_max_seconds=1.0) + _destination_toml(
        url, tmp_path / "right")
    node = ReaderNode(tmp_path / "node", config_text=config)
    orthanc = None
    try:
        study = write_study(tmp_path / "study")
        assert storescu(node.host, node.port, node.ae_title, list(study.files)).returncode == 0

        def retried() -> bool:
            _alive(node)
            return len(node.events("send.retry_scheduled")) >= 2
        wait_until(retried, DEADLINE_S, "two retries while the DICOMweb server is down")
        (ticket,) = _tickets(node, "stow:" + url)
        assert ticket.state is SendState.PENDING and "connection failed" in ticket.last_error

        orthanc = _dicomweb_orthanc(tmp_path / "pacs", http_port=port)
        server = orthanc

        def stored() -> bool:
            _alive(node)
            return {"SR", "SEG"} <= _qido_modalities(server, study.study_uid)
        wait_until(stored, DEADLINE_S, "the SR and SEG stored once Orthanc is back")
        wait_until(lambda: [t.state for t in _tickets(node, "stow:" + url)] == [SendState.DONE],
                   DEADLINE_S, "the ticket done")
        assert not node.events("send.parked")
    finally:
        assert node.stop() == 0, node.log_tail()
        if orthanc is not None:
            orthanc.kill()



@pytest.mark.integration
def test_a_result_over_the_chunk_size_is_stored(tmp_path: Path) -> None:
    """A result file larger than dicomweb-client's 1 MB chunk goes by chunked transfer encoding
    and Orthanc stores it whole (a large SEG takes this path)."""
    orthanc = _dicomweb_orthanc(tmp_path / "pacs")
    try:
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in range(3))
        ds.Modality, ds.PatientID = "OT", "SYNTH-0002"
        ds.Rows = ds.Columns = 1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = bytes(range(256)) * (1024 * 1024 * 2 // 256)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        path = tmp_path / "large.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert path.stat().st_size > 2 * 1024 * 1024
        (tmp_path / "pw").write_text(PASSWORD, encoding="utf-8")
        destination = StowDestination(_stow_url(orthanc.http_port), auth=StowAuth.BASIC, username=USER,
                                      secret=Credential(file=tmp_path / "pw"))
        assert store_instances(destination, [path]).http_status == 200
        (instance,) = orthanc.instances()
        assert pydicom.dcmread(io.BytesIO(orthanc.download(instance))).PixelData == ds.PixelData
    finally:
        orthanc.kill()
