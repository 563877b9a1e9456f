"""The node's HTTP server (reader.web): health probes, routing errors and its configuration.

The probes are read from a real ``reader serve`` process (tests/node_process.py) over HTTP with
httpx; the configuration rules are checked with ``load_config``.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from reader.config import load_config
from reader.errors import ConfigError
from tests.node_process import ReaderNode
from tests.reliability import serve_config, write_fixture_model, write_study
from tests.tls_certs import make_pki

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0
RELATED = 'multipart/related; type="application/dicom"; boundary=b1'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fast fixture model package."""
    return write_fixture_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ReaderNode]:
    """A node with the default (loopback, no callers) HTTP server on an ephemeral port."""
    running = ReaderNode(tmp_path_factory.mktemp("node"), config_text=serve_config(model_dir))
    yield running
    running.stop()


def test_healthz_answers_ok_and_logs_the_bound_port(node: ReaderNode) -> None:
    """/healthz answers 200 "ok"; the port the node bound for --web-port 0 is logged as
    web.listening."""
    answer = httpx.get(f"{node.web_url}/healthz", timeout=TIMEOUT_S)
    assert (answer.status_code, answer.text) == (200, "ok")
    (event,) = node.events("web.listening")
    assert event["port"] == node.web_port and event["address"] == "127.0.0.1"


def test_readyz_is_200_when_every_check_passes(node: ReaderNode) -> None:
    """/readyz answers 200 with models, spool, disk and DICOM listener all "ok"."""
    answer = httpx.get(f"{node.web_url}/readyz", timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ready": True, "checks": {"models": "ok", "spool": "ok", "disk": "ok",
                                                       "dicom_listener": "ok"}}


def test_unknown_paths_are_404_and_wrong_methods_405(node: ReaderNode) -> None:
    """An unknown path answers 404, a known one with another method 405 with Allow; both short
    JSON, no stack trace."""
    with httpx.Client(base_url=node.web_url, timeout=TIMEOUT_S) as client:
        missing = client.get("/nothing/here")
        assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
        for method, path in (("GET", "/dicom-web/studies"), ("DELETE", "/healthz"),
                             ("PUT", "/dicom-web/studies/1.2.3")):
            wrong = client.request(method, path)
            assert wrong.status_code == 405, (method, path)
            assert wrong.json() == {"error": "Method Not Allowed"} and "allow" in wrong.headers
            assert "Traceback" not in wrong.text


def test_stow_without_callers_is_open_on_loopback(node: ReaderNode) -> None:
    """With no [[security.web_callers]] a loopback node admits a STOW-RS caller without a token:
    a malformed body gets 400 (judged), not 401."""
    answer = httpx.post(f"{node.web_url}/dicom-web/studies", content=b"not multipart",
                        headers={"Content-Type": RELATED},
                        timeout=TIMEOUT_S)
    assert answer.status_code == 400, answer.text


def test_readyz_is_503_naming_the_disk_when_below_the_watermark(
    tmp_path: Path, model_dir: Path
) -> None:
    """A free-disk watermark above the free space makes /readyz answer 503 with "disk" failed and
    its reason; /healthz still answers 200; STOW-RS refuses the instance with 0xA700 (409), as
    C-STORE answers Out of Resources, and stores nothing."""
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model_dir, min_free_disk_mb=2**30))
    try:
        answer = httpx.get(f"{node.web_url}/readyz", timeout=TIMEOUT_S)
        assert answer.status_code == 503
        body = answer.json()
        assert body["ready"] is False and body["failed"] == ["disk"]
        assert "watermark" in body["checks"]["disk"] and body["checks"]["spool"] == "ok"
        assert httpx.get(f"{node.web_url}/healthz", timeout=TIMEOUT_S).status_code == 200
        assert node.events("node.readiness")[-1]["failed"] == ["disk"]

        study = write_study(tmp_path / "study", n_slices=1)
        body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + study.files[0].read_bytes()
                + b"\r\n--b1--\r\n")
        stow = httpx.post(f"{node.web_url}/dicom-web/studies", content=body, timeout=TIMEOUT_S,
                          headers={"Content-Type": RELATED})
        assert stow.status_code == 409, stow.text
        (failed,) = Dataset.from_json(stow.json()).FailedSOPSequence
        assert failed.FailureReason == 0xA700
        assert not (node.data_dir / "incoming" / study.study_uid).exists()
    finally:
        node.stop()


def test_web_tls_serves_https_only(tmp_path: Path, model_dir: Path) -> None:
    """With [web.tls] the port speaks HTTPS with the configured certificate (verified against its
    CA); a plain HTTP request gets no answer."""
    pki = make_pki(tmp_path / "pki")
    tls = f'\n[web.tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model_dir) + tls)
    try:
        (event,) = node.events("web.listening")
        assert event["tls"] is True
        verify = ssl.create_default_context(cafile=str(pki.ca))
        answer = httpx.get(f"https://127.0.0.1:{node.web_port}/healthz", verify=verify, timeout=TIMEOUT_S)
        assert (answer.status_code, answer.text) == (200, "ok")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{node.web_url}/healthz", timeout=TIMEOUT_S)
    finally:
        node.stop()


# ---------------------------------------------------------------- configuration


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "reader.toml"
    path.write_text(text)
    load_config(path)


def test_web_defaults_and_flags(tmp_path: Path) -> None:
    """A file turns the server on at 127.0.0.1:8080 unless [web] enabled = false; --web-port
    overrides the port (0: any free port) and turns it on."""
    cfg = load_config(None)
    assert cfg.web is not None
    assert (cfg.web.bind_address, cfg.web.port, cfg.web.tls) == ("127.0.0.1", 8080, None)
    off = tmp_path / "off.toml"
    off.write_text("[web]\nenabled = false\n")
    assert load_config(off).web is None
    flagged = load_config(off, {"web_port": "0"}).web
    assert flagged is not None and flagged.port == 0


def test_a_non_loopback_bind_needs_tls_and_callers(tmp_path: Path) -> None:
    """Binding the HTTP server beyond loopback is refused without [web.tls], and without
    [[security.web_callers]]; with both it loads."""
    with pytest.raises(ConfigError, match=r"web\.bind_address.*web\.tls"):
        _load(tmp_path, '[web]\nbind_address = "0.0.0.0"\n')
    pki = make_pki(tmp_path / "pki")
    tls = f'[web.tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
    with pytest.raises(ConfigError, match=r"web_callers"):
        _load(tmp_path, '[web]\nbind_address = "0.0.0.0"\n' + tls)
    callers = f'[[security.web_callers]]\nname = "PACS"\ntoken_sha256 = "{"ab" * 32}"\n'
    _load(tmp_path, callers + '[web]\nbind_address = "0.0.0.0"\n' + tls)


def test_web_callers_by_token_file_or_digest(tmp_path: Path) -> None:
    """A caller's token is read from token_file (kept as its SHA-256) or given as token_sha256;
    a short token, both or neither, or a bad digest is a ConfigError naming the key."""
    token = tmp_path / "pacs.token"
    token.write_text("s3cret-token-of-the-pacs\n")
    path = tmp_path / "reader.toml"
    path.write_text(f'[[security.web_callers]]\nname = "PACS"\ntoken_file = "{token}"\n'
                    f'[[security.web_callers]]\nname = "VNA"\ntoken_sha256 = "{"0f" * 32}"\n')
    callers = load_config(path).security.web_callers
    assert [c.name for c in callers] == ["PACS", "VNA"]
    assert callers[0].token_sha256 == hashlib.sha256(b"s3cret-token-of-the-pacs").digest()
    short = tmp_path / "short.token"
    short.write_text("abc")
    for entry, key in ((f'token_file = "{short}"', "token_file"), ('token_sha256 = "xyz"', "token_sha256"),
                       ("", r"security\.web_callers\[0\]")):
        with pytest.raises(ConfigError, match=key):
            _load(tmp_path, f'[[security.web_callers]]\nname = "PACS"\n{entry}\n')
