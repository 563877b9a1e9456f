"""Real viewers for tests: OHIF 3 in headless Chromium over Orthanc's DICOMweb, and dcmqi's readers.

OHIF is the prebuilt ``@ohif/app`` from npm, installed by ``scripts/bootstrap dev`` into
``.cache/ohif/<OHIF_VERSION>/dist`` (``OHIF_DIST`` overrides the folder). :class:`OhifServer` serves
those static files from a thread on ``127.0.0.1`` (an ephemeral port), answers unknown paths with
``index.html`` (OHIF is a single-page application) and proxies ``/dicom-web/*`` to an Orthanc started
with its DICOMweb plugin (Debian ``orthanc-dicomweb``), so the browser sees one origin and needs no
CORS and no internet. :class:`OhifViewer` drives Debian's ``chromium`` through ``chromium-driver``
with selenium; every wait polls with a deadline. Screenshots go to ``VIEWER_ARTIFACTS`` (default
``test-artifacts/viewers``, git-ignored).

dcmqi (PyPI ``dcmqi``, 3D Slicer's DICOM reader for SEG and TID 1500) is run as its command-line
programs: :func:`dcmqi_segments` (``segimage2itkimage``) and :func:`dcmqi_measurements`
(``tid1500reader``) return what they read back.

Usage (tests/test_viewers.py)::

    orthanc = orthanc_factory(extra_config=dicomweb_config())     # or Orthanc.start(workdir, ...)
    store_with_storescu(orthanc, [*ct_files, seg_path, sr_path])
    with OhifServer(ohif_dist(), orthanc) as server, OhifViewer(server, artifacts("name")) as viewer:
        seg = viewer.open_study(study_uid)            # SEG overlay; seg.segment_labels
        sr = viewer.open_sr(study_uid, expected=n)    # SR viewport; sr.drawn_annotations, .measurement_labels
    segments = dcmqi_segments(seg_path, tmp_path / "seg")
    groups = dcmqi_measurements(sr_path, tmp_path / "sr")

What OHIF 3.13 does with a TID 1500 measurement group (cornerstone-dicom-sr, seen here):

- no SCOORD/SCOORD3D anywhere: dropped ("ContentSequence array contains no SCOORD or SCOORD3D
  entry, skipping annotation", once per NUM); if every group is dropped the viewport stays blank and
  the page's error boundary logs ``TypeError ... reading 'ReferencedSOPSequence'``.
- it draws the group's *first* SCOORD/SCOORD3D only: a SCOORD3D POINT placed before the image
  SCOORD draws nothing ("Unable to apply reference viewable"); put the SCOORD POLYLINE first.
- a group-level SCOORD makes the SR "rehydratable" (POLYLINE of 5 points -> RectangleROI), and OHIF
  loads it into the measurement panel at once, which needs the same SCOORD again under the first NUM
  (``INFERRED FROM``, TID 300); without that it logs "Unable to generate tool state ... No spatial
  coordinates group found" and the panel stays empty. Once loaded, the panel row is titled with the
  Finding's code meaning and shows OHIF's own ROI statistics, not our NUM values.
- a SCOORD only under the NUMs: drawn read-only with "Volume: ... mm3", "Long axis: ... mm" beside
  it, but not rehydratable, so the measurement panel stays empty.

A missing program, package or build fails the test under ``CI=true`` and skips it otherwise,
naming what is missing (:func:`tests.peers.missing`).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import LOCALHOST, Orthanc, missing, peer_env, require_tool, wait_until

__all__ = [
    "DICOMWEB_PLUGIN",
    "OHIF_VERSION",
    "DcmqiMeasurement",
    "DcmqiMeasurementGroup",
    "DcmqiSegment",
    "OhifReport",
    "OhifServer",
    "OhifViewer",
    "RowView",
    "Selectors",
    "artifacts",
    "dcmqi_measurements",
    "dcmqi_segments",
    "dicomweb_config",
    "ohif_dist",
    "store_with_storescu",
]

REPO = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
"""The pinned ``@ohif/app`` (npm); ``scripts/bootstrap dev`` installs the same version."""
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Orthanc's DICOMweb plugin as Debian's ``orthanc-dicomweb`` installs it."""
DICOMWEB_ROOT = "/dicom-web/"
CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"

_PAGE_LOAD_S = 60.0
_VIEWER_S = 60.0
_PROXY_TIMEOUT_S = 60.0
_AFTER_FAILURE_S = 5.0
_JUMP_S = 3.0


def ohif_dist() -> Path:
    """The OHIF build folder (``OHIF_DIST`` or ``.cache/ohif/<version>/dist``); fail/skip if absent."""
    path = Path(os.environ.get("OHIF_DIST", REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"))
    if not (path / "index.html").is_file():
        missing(f"OHIF build missing at {path}: run scripts/bootstrap dev (npm @ohif/app@{OHIF_VERSION})")
    return path


def artifacts(name: str) -> Path:
    """A fresh folder for one test's screenshots and logs under ``VIEWER_ARTIFACTS``."""
    root = Path(os.environ.get("VIEWER_ARTIFACTS", REPO / "test-artifacts" / "viewers"))
    folder = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def dicomweb_config() -> dict[str, Any]:
    """``extra_config`` for :meth:`tests.peers.Orthanc.start` loading the DICOMweb plugin."""
    if not DICOMWEB_PLUGIN.exists():
        missing(f"Orthanc DICOMweb plugin missing at {DICOMWEB_PLUGIN}: install Debian's 'orthanc-dicomweb'")
    return {
        "Plugins": [os.fspath(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


# --- OHIF's static files and the DICOMweb proxy ---------------------------------------------------

_DEPLOYED_APP_CONFIG = REPO / "deploy" / "ohif" / "app-config.js"
_APP_CONFIG = (
    "// The harness is no first-time user: mark OHIF's guided tour (over the panels) as shown.\n"
    "try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}\n"
    + _DEPLOYED_APP_CONFIG.read_text(encoding="utf-8")
    + "// The harness's own settings: one web worker, no usage, tracking or confirmation prompts.\n"
    "Object.assign(window.config, { maxNumberOfWebWorkers: 1, showCPUFallbackMessage: false,\n"
    "  investigationalUseDialog: { option: 'never' }, disableConfirmationPrompts: true,\n"
    "  measurementTrackingMode: 'none' });\n"
)
"""OHIF configuration: the compose stack's (one DICOMweb source on this origin), no prompts."""

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class OhifServer:
    """OHIF's static build plus a ``/dicom-web/`` proxy to ``orthanc``, in a thread on 127.0.0.1.

    Use as a context manager; :attr:`url` is the origin (``http://127.0.0.1:<port>``). Requests the
    proxy could not forward are recorded in :attr:`proxy_errors`.
    """

    def __init__(self, dist: Path, orthanc: Orthanc) -> None:
        self.dist = dist
        self.orthanc = orthanc
        self.proxy_errors: list[str] = []
        self.proxy_log: list[str] = []
        """Every proxied request Orthanc answered with an HTTP error (4xx included)."""
        self._httpd = http.server.ThreadingHTTPServer((LOCALHOST, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-http", daemon=True)

    @property
    def url(self) -> str:
        """The origin the browser opens."""
        return f"http://{LOCALHOST}:{self._httpd.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _handler_class(self) -> type[http.server.SimpleHTTPRequestHandler]:
        server = self
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=os.fspath(server.dist), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def end_headers(self) -> None:
                # Same-origin isolation lets OHIF use SharedArrayBuffer; everything is same-origin here.
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith(DICOMWEB_ROOT):
                    self._proxy()
                    return
                if path == "/app-config.js":
                    self._send(200, "text/javascript", _APP_CONFIG.encode())
                    return
                local = (server.dist / path.lstrip("/")).resolve()
                if not local.is_file() or server.dist.resolve() not in local.parents:
                    if "." in path.rsplit("/", 1)[-1]:  # a missing asset: 404, which the console shows
                        self.send_error(404)
                        return
                    self.path = "/index.html"  # a route: the single-page application handles it
                super().do_GET()

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                request = urllib.request.Request(server.orthanc.base_url + self.path, method="GET")
                for name in ("Accept", "Range"):
                    if self.headers.get(name):
                        request.add_header(name, self.headers[name])
                try:
                    with opener.open(request, timeout=_PROXY_TIMEOUT_S) as answer:
                        status, headers, body = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as exc:
                    status, headers, body = exc.code, exc.headers, exc.read()
                    server.proxy_log.append(f"GET {self.path} -> {status}")
                    if status >= 500:
                        server.proxy_errors.append(f"GET {self.path} -> {status}")
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in _HOP_HEADERS:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def store_with_storescu(orthanc: Orthanc, paths: Sequence[Path], *, timeout_s: float = 120.0) -> None:
    """C-STORE ``paths`` (files) to ``orthanc`` with DCMTK ``storescu`` on one association.

    ``-R`` proposes only the SOP classes of the files: storescu's default list has neither
    Segmentation nor Comprehensive 3D SR, so without it those are refused ("No presentation context").
    """
    exe = require_tool("storescu")
    args = [exe, "-R", "-aet", "READER", "-aec", orthanc.aet, "-to", "10", "-ta", "10", "-td", "30"]
    done = subprocess.run(
        [*args, orthanc.host, str(orthanc.dicom_port), *(os.fspath(p) for p in paths)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=peer_env(),
        check=False,
    )
    if done.returncode != 0 or "E:" in done.stderr:
        raise AssertionError(f"storescu to Orthanc failed ({done.returncode}):\n{done.stderr[-2000:]}")


# --- OHIF in headless Chromium --------------------------------------------------------------------


class Selectors:
    """Every CSS selector the harness uses, for OHIF 3's default ("longitudinal") viewer mode.

    OHIF marks its UI with ``data-cy`` attributes for its own Cypress tests; these are the most
    stable hooks it offers. Update them here when the pinned OHIF version changes.
    """

    THUMBNAIL_MODALITY = '[data-cy="series-modality-label"]'
    TOUR_BUTTON = ".shepherd-element button"
    SEGMENTATION_TAB = '[data-cy="panelSegmentation-btn"]'
    MEASUREMENT_TAB = '[data-cy="trackedMeasurements-btn"]'
    ROW = '[data-cy="data-row"]'
    ROW_TITLE = '[data-cy="data-row-title"]'
    ROW_DETAILS = '[data-cy="data-row-details"]'
    IMAGE_INDEX = '[data-cy="viewport-overlay-bottom-right"]'
    ANNOTATION = "svg.svg-layer g[data-annotation-uid]"
    ANNOTATION_TEXT = "svg.svg-layer text"


_CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root in a container, where Chromium's sandbox cannot start
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
    "--use-angle=swiftshader",  # WebGL without a GPU: Cornerstone3D renders with it
    "--enable-unsafe-swiftshader",
    "--no-first-run",
    "--disable-background-networking",
    # Resolve no host name but loopback: a viewer that needs a CDN fails here (a SEVERE console
    # "net::ERR_NAME_NOT_RESOLVED") instead of passing only where the internet is reachable.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
_SR_DROP = re.compile(
    r"skipping annotation|Unable to generate tool state|ReferencedSOPSequence"
    r"|Unable to apply reference viewable",
    re.IGNORECASE,
)
"""Console warnings with which OHIF says it dropped an SR measurement group (PS3.16 TID 1501).
"Measurement is not rehydratable" is not one: OHIF then draws the SR read-only, with its own
measurements (a polygon outline, which OHIF cannot turn into one of its editable tools)."""
_CONSOLE_FAILURE = re.compile(r"Error Boundary|Something went wrong|Uncaught")
"""Failures OHIF logs below SEVERE: its React error boundary logs a crash as DEBUG."""
_CONSOLE_NOISE: tuple[re.Pattern[str], ...] = ()
"""SEVERE console messages unrelated to the objects under test, each with its reason in a comment.
Empty: OHIF 3.13.2 logged none here (Chromium 156, Orthanc 1.10 + DICOMweb 1.7)."""


@dataclass(frozen=True)
class RowView:
    """The viewport after clicking one measurement panel row: OHIF jumps to the measurement's image."""

    label: str
    image_index: str
    """The viewport's image overlay then, e.g. ``I:18 (18/64)`` (Instance Number first)."""
    annotations: int
    """Annotations drawn on that image."""


@dataclass
class OhifReport:
    """What OHIF showed for one action: panel rows, drawings, console problems and screenshots."""

    segment_labels: list[str] = field(default_factory=list)
    """Titles of the segmentation panel's rows (one per SEG segment, its Segment Label)."""
    measurement_labels: list[str] = field(default_factory=list)
    """Titles of the measurement panel's rows (one per measurement OHIF loaded)."""
    measurement_details: list[str] = field(default_factory=list)
    """The measurement panel's detail text per row (values, finding site, series and image)."""
    drawn_annotations: list[str] = field(default_factory=list)
    """``data-annotation-uid`` of each annotation drawn in the viewport (an SR group's Tracking UID
    while the SR is shown read-only)."""
    drawn_texts: list[str] = field(default_factory=list)
    """The text boxes drawn beside those annotations."""
    image_index: str = ""
    """The viewport's image overlay, e.g. ``I:18 (18/64)``."""
    row_views: list[RowView] = field(default_factory=list)
    """For each measurement panel row, in order: the image OHIF jumped to and what it drew there."""
    console_errors: list[str] = field(default_factory=list)
    """SEVERE browser console messages, less :data:`_CONSOLE_NOISE`, plus proxy failures."""
    dropped_annotations: list[str] = field(default_factory=list)
    """Console warnings with which OHIF dropped an SR measurement group."""
    screenshots: list[Path] = field(default_factory=list)


class OhifViewer:
    """Headless Chromium showing OHIF from an :class:`OhifServer`; one page, reloaded per ``open_*``."""

    def __init__(self, server: OhifServer, artifacts_dir: Path, *, timeout_s: float = _VIEWER_S) -> None:
        self.server = server
        self.artifacts_dir = artifacts_dir
        self.timeout_s = timeout_s
        self.console: list[dict[str, Any]] = []
        self._shots = 0
        self._mark = 0
        self._driver = _start_chromium()

    def __enter__(self) -> OhifViewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write the whole console log to the artefact folder and quit the browser."""
        try:
            self._drain_console()
            lines = [f"{e.get('level')} {e.get('message')}" for e in self.console]
            (self.artifacts_dir / "console.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
        finally:
            self._driver.quit()

    # -- public actions -----------------------------------------------------------------------------

    def open_study(self, study_uid: str, *, modality: str = "SEG") -> OhifReport:
        """Open the study, load its (first) ``modality`` series in the viewport and list the segments."""
        report = OhifReport()
        self._load(study_uid)
        self._double_click_series(modality)
        self._click(Selectors.SEGMENTATION_TAB)
        self._poll(lambda: bool(self._texts(Selectors.ROW_TITLE)), "segmentation panel rows")
        report.segment_labels = self._texts(Selectors.ROW_TITLE)
        report.image_index = " ".join(self._texts(Selectors.IMAGE_INDEX))
        self._finish(report, f"{modality.lower()}-overlay")
        return report

    def open_sr(self, study_uid: str, *, expected: int = 1) -> OhifReport:
        """Open the study, load its (first) SR in the viewport and read drawings and measurement panel.

        Waits until an annotation is drawn and ``expected`` rows are listed, or OHIF logs that it
        dropped a group, or the deadline passes; the report then holds what was shown, for the test
        to assert on. Each panel row is then clicked to see the image OHIF jumps to (``row_views``).
        """
        report = OhifReport()
        self._load(study_uid)
        self._double_click_series("SR")

        def drawn() -> bool:  # only the annotations on the image on screen are drawn: wait for one
            return bool(self._attrs(Selectors.ANNOTATION, "data-annotation-uid"))

        # Stop waiting early once OHIF has said it dropped a group or failed: the rest won't come.
        self._poll(lambda: drawn() or self._gave_up(), "an SR annotation drawn")
        complete = drawn()
        report.drawn_annotations = self._attrs(Selectors.ANNOTATION, "data-annotation-uid")
        report.drawn_texts = self._texts(Selectors.ANNOTATION_TEXT)
        report.image_index = " ".join(self._texts(Selectors.IMAGE_INDEX))
        self._screenshot(report, "sr-viewport")
        self._click(Selectors.MEASUREMENT_TAB)

        def listed() -> bool:
            return len(self._texts(Selectors.ROW_TITLE)) >= expected

        if complete:
            self._poll(lambda: listed() or self._gave_up(), "measurement panel rows")
            complete = listed()
        if not complete:  # OHIF reported a failure: a short grace for rows still on their way
            self._poll(listed, "measurement panel rows", timeout_s=_AFTER_FAILURE_S)
        report.measurement_labels = self._texts(Selectors.ROW_TITLE)
        report.measurement_details = self._texts(Selectors.ROW_DETAILS)
        self._screenshot(report, "sr-measurements")
        for index, label in enumerate(report.measurement_labels):
            report.row_views.append(self._jump_to_row(index, label, report))
        self._finish(report, "sr-done")
        return report

    def _jump_to_row(self, index: int, label: str, report: OhifReport) -> RowView:
        """Click a measurement panel row (OHIF jumps to its image) and read what the viewport shows."""
        before = " ".join(self._texts(Selectors.IMAGE_INDEX))
        rows = self._find(Selectors.ROW)
        if index >= len(rows):
            return RowView(label, "", 0)
        self._driver.execute_script("arguments[0].click();", rows[index])
        # A jump changes the image overlay; the first row's image may already be on screen.
        self._poll(lambda: " ".join(self._texts(Selectors.IMAGE_INDEX)) != before, "jump", timeout_s=_JUMP_S)
        self._poll(lambda: bool(self._find(Selectors.ANNOTATION)), f"annotation of row {index + 1}")
        view = RowView(
            label, " ".join(self._texts(Selectors.IMAGE_INDEX)), len(self._find(Selectors.ANNOTATION))
        )
        self._screenshot(report, f"sr-row-{index + 1}")
        return view

    # -- steps --------------------------------------------------------------------------------------

    def _load(self, study_uid: str) -> None:
        self._drain_console()
        self._mark = len(self.console)
        self.server.proxy_errors.clear()
        self._driver.get(f"{self.server.url}/viewer?StudyInstanceUIDs={study_uid}")
        wait_until(
            lambda: bool(self._texts(Selectors.THUMBNAIL_MODALITY)),
            _PAGE_LOAD_S,
            "OHIF's study browser to list the series",
        )
        # OHIF starts a guided tour on a first visit; its "Skip all" button ends it.
        for button in self._find(Selectors.TOUR_BUTTON):
            if "skip" in button.text.lower():
                button.click()

    def _double_click_series(self, modality: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415 - optional dep

        def target() -> Any:
            labels = [e for e in self._find(Selectors.THUMBNAIL_MODALITY) if e.text.strip() == modality]
            return labels[0] if labels else None

        wait_until(lambda: target() is not None, self.timeout_s, f"a {modality} series in the study browser")
        ActionChains(self._driver).double_click(target()).perform()

    def _click(self, selector: str) -> None:
        wait_until(lambda: bool(self._find(selector)), self.timeout_s, f"element {selector}")
        # A script click: an overlay (a tour step, a notification) cannot intercept it.
        self._driver.execute_script("arguments[0].click();", self._find(selector)[0])

    def _finish(self, report: OhifReport, name: str) -> None:
        self._screenshot(report, name)
        self._drain_console()
        for entry in self.console[self._mark :]:
            message = str(entry.get("message", ""))
            severe = entry.get("level") == "SEVERE" or _CONSOLE_FAILURE.search(message)
            if severe and not any(p.search(message) for p in _CONSOLE_NOISE):
                report.console_errors.append(message)
            elif _SR_DROP.search(message):
                report.dropped_annotations.append(message)
        report.console_errors += self.server.proxy_errors

    def _screenshot(self, report: OhifReport, name: str) -> None:
        self._shots += 1
        path = self.artifacts_dir / f"{self._shots:02d}-{name}.png"
        self._driver.save_screenshot(os.fspath(path))
        report.screenshots.append(path)

    # -- browser plumbing ---------------------------------------------------------------------------

    def _drain_console(self) -> None:
        self.console += self._driver.get_log("browser")

    def _find(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By  # noqa: PLC0415 - optional dependency

        found: list[Any] = self._driver.find_elements(By.CSS_SELECTOR, selector)
        return found

    def _texts(self, selector: str) -> list[str]:
        return self._safely(lambda: [e.text.strip() for e in self._find(selector) if e.text.strip()])

    def _attrs(self, selector: str, name: str) -> list[str]:
        return self._safely(lambda: [str(e.get_attribute(name)) for e in self._find(selector)])

    def _safely(self, read: Callable[[], list[str]]) -> list[str]:
        """Read the DOM; React may replace an element between find and read: retry on that."""
        from selenium.common.exceptions import StaleElementReferenceException  # noqa: PLC0415

        for _ in range(5):
            try:
                return read()
            except StaleElementReferenceException:
                continue
        return []

    def _gave_up(self) -> bool:
        """Whether the console, since the page was loaded, says OHIF dropped an SR group or failed."""
        self._drain_console()
        return any(
            _SR_DROP.search(str(e.get("message", ""))) or _CONSOLE_FAILURE.search(str(e.get("message", "")))
            for e in self.console[self._mark :]
        )

    def _poll(self, predicate: Callable[[], bool], what: str, *, timeout_s: float | None = None) -> bool:
        """Like :func:`wait_until` but returns False at the deadline: the caller asserts on the report."""
        try:
            wait_until(predicate, self.timeout_s if timeout_s is None else timeout_s, what)
        except AssertionError:
            return False
        return True


def _start_chromium() -> Any:
    """Start Debian's chromium through chromium-driver; fail/skip naming what is missing."""
    try:
        from selenium import webdriver  # noqa: PLC0415 - optional dependency (dev extras)
        from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    except ImportError:
        missing("Python package 'selenium' missing: pip install -e '.[dev]' (or scripts/bootstrap dev)")
    browser = _require_program(CHROMIUM, "chromium")
    driver = _require_program(CHROMEDRIVER, "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in _CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def _require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"program {name!r} not found on PATH: install the Debian package {package!r}")
    return path


# --- dcmqi (3D Slicer's reader of SEG and TID 1500) ------------------------------------------------


@dataclass(frozen=True)
class DcmqiSegment:
    """One segment as ``segimage2itkimage`` wrote it to its meta JSON (plus its image file)."""

    number: int
    label: str
    category: str
    property_type: str
    algorithm_type: str
    image: Path | None
    """The segment's image (NRRD) as dcmqi exported it, if it wrote one for this segment."""


@dataclass(frozen=True)
class DcmqiMeasurement:
    """One NUM item of a measurement group as ``tid1500reader`` read it."""

    quantity: str
    value: float
    units: str


@dataclass(frozen=True)
class DcmqiMeasurementGroup:
    """One TID 1501/1411 measurement group as ``tid1500reader`` read it."""

    tracking_identifier: str
    tracking_uid: str
    finding: str
    finding_site: str | None
    referenced_segment: int | None
    source_series: str | None
    measurements: tuple[DcmqiMeasurement, ...]


def dcmqi_segments(seg: Path, workdir: Path) -> list[DcmqiSegment]:
    """Run ``segimage2itkimage`` on a SEG file; return the segments it exported, in its order."""
    workdir.mkdir(parents=True, exist_ok=True)
    _run_dcmqi(
        "segimage2itkimage",
        [
            "--inputDICOM",
            os.fspath(seg),
            "--outputDirectory",
            os.fspath(workdir),
            "--prefix",
            "seg",
            "--outputType",
            "nrrd",
        ],
    )
    meta = json.loads((workdir / "seg-meta.json").read_text(encoding="utf-8"))
    segments = []
    # segmentAttributes is a list of groups (one per output file), each a list of segments.
    for group_index, group in enumerate(meta.get("segmentAttributes", []), start=1):
        image = workdir / f"seg-{group_index}.nrrd"
        for item in group:
            segments.append(
                DcmqiSegment(
                    number=int(item["labelID"]),
                    label=str(item.get("SegmentLabel", "")),
                    category=str(item["SegmentedPropertyCategoryCodeSequence"]["CodeMeaning"]),
                    property_type=str(item["SegmentedPropertyTypeCodeSequence"]["CodeMeaning"]),
                    algorithm_type=str(item.get("SegmentAlgorithmType", "")),
                    image=image if image.exists() else None,
                )
            )
    return segments


def dcmqi_measurements(sr: Path, workdir: Path) -> list[DcmqiMeasurementGroup]:
    """Run ``tid1500reader`` on an SR file; return its measurement groups, in document order."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "sr.json"
    _run_dcmqi("tid1500reader", ["--inputDICOM", os.fspath(sr), "--outputMetadata", os.fspath(out)])
    document = json.loads(out.read_text(encoding="utf-8"))
    groups = []
    for group in document.get("Measurements", []):
        site = group.get("FindingSite")
        segment = group.get("ReferencedSegment")
        groups.append(
            DcmqiMeasurementGroup(
                tracking_identifier=str(group.get("TrackingIdentifier", "")),
                tracking_uid=str(group.get("TrackingUniqueIdentifier", "")),
                finding=str(group.get("Finding", {}).get("CodeMeaning", "")),
                finding_site=str(site["CodeMeaning"]) if site else None,
                referenced_segment=int(segment) if segment is not None else None,
                source_series=group.get("SourceSeriesForImageSegmentation"),
                measurements=tuple(
                    DcmqiMeasurement(
                        quantity=str(item["quantity"]["CodeMeaning"]),
                        value=float(item["value"]),
                        units=str(item["units"]["CodeValue"]),
                    )
                    for item in group.get("measurementItems", [])
                ),
            )
        )
    return groups


def _run_dcmqi(program: str, args: list[str]) -> None:
    """Run one dcmqi program (from this Python's ``bin`` folder or PATH); raise with its output on failure."""
    local = Path(sys.executable).parent / program
    exe = os.fspath(local) if local.exists() else shutil.which(program)
    if exe is None:
        missing(f"dcmqi program {program!r} missing: pip install dcmqi (in the dev extras)")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{program} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
