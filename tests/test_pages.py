"""The status pages, driven in a real headless Chromium against a real ``reader serve`` process.

A synthetic CT study (patient "Doe^Jane", accession ACC-PAGES-1) is sent with DCMTK ``storescu``;
the fixture model (``tests/reliability.py``) finds one lesion. The only destination is a DICOM port
where nothing listens yet and ``max_attempts = 1``, so the send is parked. The pages then show
the study with its findings and key image; Orthanc is started on that port and the parked send is
retried from the sends page (with its confirmation step) and arrives. The node is then restarted on
the same data dir with a users file: pages answer 401 until a user signs in, and only then show
the patient's name and ID. Screenshots of every page go to test-artifacts/pages/ (with
READER_UPDATE_SCREENSHOTS=1 to docs/screenshots/, which the README shows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from reader.config import SecurityConfig, WebCaller, WebConfig, default_config, load_config
from reader.errors import ConfigError
from reader.jobs import JobStore, SendState
from reader.passwords import WebUser, hash_password, verify
from reader.spool import Spool
from reader.web.pages import _URL_USERINFO, _settings
from tests.node_process import ReaderNode
from tests.peers import Orthanc, free_port, require_tool, storescu, wait_until
from tests.reliability import serve_config, write_fixture_model, write_study
from tests.viewers import _start_chromium

pytestmark = pytest.mark.integration

_REPO = Path(__file__).resolve().parents[1]
# Screenshots go to test-artifacts/pages; READER_UPDATE_SCREENSHOTS=1 writes the README's copies in
# docs/screenshots instead (a test run leaves the working tree as it found it).
SCREENSHOTS = (_REPO / "docs" / "screenshots" if os.environ.get("READER_UPDATE_SCREENSHOTS") == "1"
               else _REPO / "test-artifacts" / "pages")
DEADLINE_S = 120.0
PATIENT_NAME, PATIENT_ID, ACCESSION = "Doe^Jane", "PID-4711", "ACC-PAGES-1"
USER, PASSWORD = "admin", "correct horse battery"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(url: str, method: str = "GET", accept: str = "",
          body: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request, errors included."""
    request = urllib.request.Request(url, method=method, data=body)
    if accept:
        request.add_header("Accept", accept)
    try:
        with _NO_PROXY.open(request, timeout=30) as answer:
            return answer.status, answer.headers.get("content-type", ""), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (tests/viewers.py's flags), 1280x900."""
    driver = _start_chromium()
    driver.set_window_size(1280, 900)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, name: str) -> None:
    """Save the page as SCREENSHOTS/NAME.png, in 128 colours (small for the repository)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=128).save(SCREENSHOTS / f"{name}.png", optimize=True)


def _wait_for(driver: Any, selector: str, timeout_s: float = 30.0) -> None:
    """Wait until the page shows ``selector``: a form submitted by a click loads its answer later."""
    wait_until(lambda: bool(_css(driver, selector)), timeout_s, f"{selector} on the page")


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - optional dependency (dev extras)

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _parked(data_dir: Path) -> list[str]:
    return [t.name for t in JobStore(Spool(data_dir)).sends() if t.state is SendState.FAILED]


def _delivered(orthanc: Orthanc, study_uid: str) -> bool:
    modalities = {str(orthanc.rest_get(f"/instances/{i}/simplified-tags").get("Modality"))
                  for i in orthanc.instances()}
    return {"SR", "SEG"} <= modalities and study_uid in {
        orthanc.rest_get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.studies()}


def _write_study(folder: Path) -> Any:
    """The synthetic study with air (-1000 HU) around a soft-tissue (+40 HU) ball, which the
    fixture model (everything above about -300 HU) finds as one lesion."""
    study = write_study(folder, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = ACCESSION
        k = int(ds.InstanceNumber) - 1
        rows, columns = np.mgrid[0:ds.Rows, 0:ds.Columns]
        radius = 22.0 * max(0.0, 1.0 - ((k - 10) / 8.0) ** 2) ** 0.5
        inside = (rows - 30) ** 2 + (columns - 34) ** 2 <= radius**2
        hu = np.where(inside, 40, -1000)
        stored = (hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path)
    return study


def test_pages_show_a_study_and_retry_a_parked_send_in_chromium(tmp_path: Path, browser: Any) -> None:
    """A study sent with storescu appears on the studies and study pages with its finding and a
    key image that loads; patient name and ID stay hidden without sign-in; the parked send is
    retried from the sends page after a confirmation and reaches Orthanc; unknown paths 404, wrong
    methods 405, a POST without the CSRF token 403; after a restart with a users file, pages answer
    401 until a user signs in, and the signed-in user sees the patient's name and ID."""
    require_tool("storescu")
    pacs_port = free_port()
    model = write_fixture_model(tmp_path / "model")
    config = serve_config(model, max_attempts=1, retry_initial_seconds=0.2)
    destination = f"ORTHANC@127.0.0.1:{pacs_port}"
    node = ReaderNode(tmp_path / "node", config_text=config, destinations=[destination])
    orthanc: Orthanc | None = None
    try:
        study = _write_study(tmp_path / "study")
        sent = storescu(node.host, node.port, node.ae_title, list(study.files))
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: bool(_parked(node.data_dir)), DEADLINE_S, "the send parked (nothing listens)")
        base = node.web_url

        browser.get(base + "/")
        assert _css(browser, '[data-count="processed"] b')[0].text == "1"
        _shot(browser, "overview")

        browser.get(base + f"/studies?accession={ACCESSION}")
        rows = _css(browser, "tr.study")
        assert [r.get_attribute("data-study") for r in rows] == [study.study_uid]
        assert PATIENT_NAME not in browser.page_source and PATIENT_ID not in browser.page_source
        assert "parked" in rows[0].text
        _shot(browser, "studies")
        for query, found in (("accession=NO-SUCH", False), ("date=2024-01-02&state=flagged", True),
                             ("date=2024-01-03", False), ("state=failed", False)):
            browser.get(base + f"/studies?{query}")
            assert bool(_css(browser, "tr.study")) is found, query

        browser.get(base + f"/studies/{study.study_uid}")
        assert len(_css(browser, "tr.finding")) == 1
        wait_until(lambda: browser.execute_script(
            "const images = Array.from(document.querySelectorAll('img.key'));"
            "return images.length == 1 && images.every(i => i.complete && i.naturalWidth > 0)"),
            30, "the key image loaded")
        assert PATIENT_NAME not in browser.page_source and PATIENT_ID not in browser.page_source
        assert "•••" in _css(browser, "#patient")[0].text
        _shot(browser, "study")
        png = _css(browser, "img.key")[0].get_attribute("src")
        status, kind, body = _http(png)
        assert (status, kind, body[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")
        status, _, _ = _http(base + f"/studies/{study.study_uid}/series/{study.series_uid}/v1/sr.dcm")
        assert status == 403, "result objects carry patient data: not served without sign-in"

        browser.get(base + "/associations")
        assert "MODALITY" in _css(browser, "tr.association")[0].text
        _shot(browser, "associations")
        browser.get(base + "/models")
        assert "test-blobs" in browser.page_source and "warm" in browser.page_source
        _shot(browser, "models")
        browser.get(base + "/config")
        assert "destinations[0].port" in browser.page_source and str(pacs_port) in browser.page_source
        _shot(browser, "config")

        # bad input: 404, 405, CSRF, no stack trace
        for path in ("/nope", "/studies/not-a-uid", f"/studies/{study.study_uid}9"):
            status, _, body = _http(base + path, accept="text/html")
            assert status == 404 and b"Traceback" not in body, (path, status)
        assert _http(base + "/", method="POST", body=b"")[0] == 405
        assert _http(base + "/sends", method="DELETE")[0] == 405
        ticket = _parked(node.data_dir)[0]
        assert _http(base + f"/sends/{ticket}/retry", method="POST", body=b"confirm=yes")[0] == 403

        # the parked send, retried from the page once the PACS listens
        browser.get(base + "/sends")
        parked = _css(browser, f'#parked tr[data-ticket="{ticket}"]')
        assert parked, browser.page_source
        _shot(browser, "sends")
        orthanc = Orthanc.start(tmp_path / "pacs", extra_config={"DicomPort": pacs_port})
        _css(browser, f'#parked tr[data-ticket="{ticket}"] button[value="retry"]')[0].click()
        _wait_for(browser, "#confirm")  # a click does not wait for the next page
        assert _css(browser, "#confirm"), "retry asks for a confirmation first"
        _shot(browser, "sends-confirm")
        _css(browser, "#confirm-button")[0].click()
        wait_until(lambda: _delivered(orthanc, study.study_uid), DEADLINE_S, "the SR and SEG at Orthanc")

        def settled() -> bool:
            browser.get(base + "/sends")
            return bool(_css(browser, f'#recently tr[data-ticket="{ticket}"]')) and "done" in _css(
                browser, f'#recently tr[data-ticket="{ticket}"]')[0].text
        wait_until(settled, DEADLINE_S, "the send shown done")
        browser.get(base + f"/studies/{study.study_uid}")
        assert "sent" in browser.page_source
        assert node.events("web.send.retried"), node.log_tail()
    finally:
        assert node.stop() == 0, node.log_tail()

    users = tmp_path / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD)}\n", encoding="utf-8")
    signed = ReaderNode(tmp_path / "node2", data_dir=node.data_dir, destinations=[destination],
                        config_text=config + f"\n[web]\nusers_file = {json.dumps(str(users))}\n")
    try:
        base = signed.web_url
        assert _http(base + "/studies")[0] == 401
        status, kind, body = _http(base + "/", accept="text/html")
        assert status == 401 and "text/html" in kind and b'id="signin"' in body
        assert _http(base + "/healthz")[0] == 200, "the probes need no sign-in"
        browser.delete_all_cookies()
        browser.get(base + f"/studies/{study.study_uid}")
        assert _css(browser, "#signin") and PATIENT_NAME not in browser.page_source
        _css(browser, 'input[name="user"]')[0].send_keys(USER)
        _css(browser, 'input[name="password"]')[0].send_keys("wrong password")
        _css(browser, "#signin-button")[0].click()
        _wait_for(browser, "#message")
        assert _css(browser, "#message") and not _css(browser, "#user")
        _shot(browser, "signin")
        _css(browser, 'input[name="user"]')[0].send_keys(USER)
        _css(browser, 'input[name="password"]')[0].send_keys(PASSWORD)
        _css(browser, "#signin-button")[0].click()
        wait_until(lambda: bool(_css(browser, "#user")), 30, "signed in")
        assert browser.current_url.endswith(f"/studies/{study.study_uid}")
        patient = _css(browser, "#patient")[0].text
        assert PATIENT_NAME in patient and PATIENT_ID in patient, patient
        assert [e.get("user") for e in signed.events("web.signed_in")] == [USER]
        assert PASSWORD not in signed.log_path.read_text(encoding="utf-8")
    finally:
        assert signed.stop() == 0, signed.log_tail()
        if orthanc is not None:
            orthanc.kill()


def test_a_cancelled_send_stays_cancelled_and_can_be_retried(tmp_path: Path) -> None:
    """Cancelling a parked or pending send records who and why; a stale attempt finishing later does
    not put it back in the queue; retry re-queues a cancelled one with attempts reset; done ones
    can be neither cancelled nor retried."""
    jobs = JobStore(Spool(tmp_path / "data"))
    ticket = jobs.add_send("1.2.3", 1, "PACS@127.0.0.1:104", [tmp_path / "sr.dcm"])
    cancelled = jobs.cancel_send(ticket.name, "cancelled by admin: wrong PACS")
    assert cancelled is not None and cancelled.state is SendState.CANCELLED
    jobs.update_send(dataclasses.replace(ticket, attempts=1, last_error="timeout"))  # a stale attempt
    again = jobs.send(ticket.name)
    assert again is not None and again.state is SendState.CANCELLED and "wrong PACS" in again.last_error
    assert not jobs.pending_sends()
    retried = jobs.requeue_send(ticket.name)
    assert retried is not None and retried.state is SendState.PENDING and retried.attempts == 0
    jobs.update_send(dataclasses.replace(retried, state=SendState.DONE))
    assert jobs.cancel_send(ticket.name, "late") is None and jobs.requeue_send(ticket.name) is None
    done = jobs.send(ticket.name)
    assert done is not None and done.updated_at > 0, "a settled ticket records when it settled"


def test_users_file_errors_name_the_key(tmp_path: Path) -> None:
    """``[web] users_file``: a missing file, a line without a hash, a plain-text password and an
    empty file are refused at start-up naming ``web.users_file``; a good file loads its users,
    whose hashes verify the password and never print."""
    good = tmp_path / "users"
    good.write_text(f"# status page users\n{USER}:{hash_password(PASSWORD)}\n", encoding="utf-8")
    config = load_config(_web_config(tmp_path, good))
    assert config.web is not None and [u.name for u in config.web.users] == [USER]
    assert verify(PASSWORD, config.web.users[0].password_hash)
    assert not verify("wrong", config.web.users[0].password_hash)
    assert "scrypt" not in repr(config.web.users)
    for text in ("admin\n", "admin:hunter2hunter2\n", "# nobody\n"):
        bad = tmp_path / "bad-users"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as refused:
            load_config(_web_config(tmp_path, bad))
        assert refused.value.key == "web.users_file", text
    with pytest.raises(ConfigError) as refused:
        load_config(_web_config(tmp_path, tmp_path / "missing"))
    assert refused.value.key == "web.users_file"


def _web_config(tmp_path: Path, users: Path) -> Path:
    path = tmp_path / "reader.toml"
    path.write_text(f"[web]\nusers_file = {json.dumps(str(users))}\n", encoding="utf-8")
    return path


def test_configuration_page_rows_redact_secrets() -> None:
    """The configuration page's rows show no web caller token digest, no users' hashes and no
    credentials in a URL, but name the settings they belong to."""
    digest = hashlib.sha256(b"a-very-secret-token-value").digest()
    config = dataclasses.replace(
        default_config(), security=SecurityConfig(web_callers=(WebCaller("pacs-gateway", digest),)),
        web=WebConfig(users=(WebUser(USER, hash_password(PASSWORD)),)))
    rows = dict(_settings(config))
    text = repr(rows)
    assert digest.hex() not in text and "scrypt" not in text and repr(digest) not in text
    assert rows["security.web_callers[0].token_sha256"] == "(redacted)"
    assert rows["security.web_callers[0].name"] == "pacs-gateway"
    assert rows["web.users"] == USER
    assert _URL_USERINFO.sub("(redacted)@", "https://u:p@example.org/dicom-web") == (
        "https://(redacted)@example.org/dicom-web")
