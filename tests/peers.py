"""Real DICOM peers for tests: Orthanc, DCMTK storescu/echoscu and dicom3tools dciodvfy.

Nothing here mocks the network: each helper runs the real program on ephemeral ports and polls
with a deadline (:func:`wait_until`) instead of sleeping. A missing tool or data set fails the test
when ``CI=true`` and skips it otherwise, naming the Debian package or path that is missing.

Fixtures exported for ``tests/conftest.py``: ``orthanc_factory`` (a callable that starts an Orthanc
with a given configuration and stops it at teardown) and ``orthanc`` (one default Orthanc).

Debian's DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in the environment, so
every peer started here gets it (see /work/shared/STYLE.md, performance notes).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = [
    "LOCALHOST",
    "SHARED_DATA",
    "Orthanc",
    "OrthancFactory",
    "dciodvfy",
    "echoscu",
    "free_port",
    "missing",
    "orthanc",
    "orthanc_factory",
    "peer_env",
    "require_data",
    "require_tool",
    "storescu",
    "wait_until",
]

LOCALHOST = "127.0.0.1"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``/work/shared/data`` for this checkout: shared test data, never copied into the repo."""

_DEBIAN_PACKAGE = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dcmdump": "dcmtk",
    "dcmconv": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmdjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmdjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "Orthanc": "orthanc",
    "dciodvfy": "dicom3tools",
    "systemd-analyze": "systemd",
    "kubectl": "kubectl",
    "prometheus": "prometheus",
    "rsyslogd": "rsyslog",
}
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_POLL_S = 0.05
_TOOL_TIMEOUT_S = 120.0
_ORTHANC_START_S = 30.0
_ORTHANC_STOP_S = 10.0
_HTTP_TIMEOUT_S = 60.0


def missing(message: str) -> NoReturn:
    """Fail under CI (``CI=true``), skip elsewhere: a missing prerequisite is never silent."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the absolute path of the program ``name``; fail under CI or skip if it is absent."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        package = _DEBIAN_PACKAGE.get(name, "the package providing it")
        missing(f"program {name!r} not found on PATH: install the Debian package {package!r}")
    return path


def require_data(relative: str) -> Path:
    """Return ``SHARED_DATA / relative``; fail under CI or skip if that path does not exist."""
    path = SHARED_DATA / relative
    if not path.exists():
        missing(f"shared test data missing: {path}")
    return path


def free_port() -> int:
    """An unused TCP port on the loopback interface (the OS picks it; reuse races are unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it returns True; raise AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(_POLL_S)


def peer_env() -> dict[str, str]:
    """The environment for DCMTK-based peers: ours plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


# --- DCMTK and dicom3tools command-line peers ------------------------------------------------------


def storescu(
    host: str,
    port: int,
    called_ae: str,
    paths: Sequence[Path],
    calling_ae: str = "MODALITY",
    *,
    timeout_s: float = _TOOL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Send ``paths`` (files or directories, scanned recursively) with DCMTK ``storescu`` on one association.

    ``-nh`` keeps going after a failed store; the caller checks ``returncode`` and the output.
    """
    exe = require_tool("storescu")
    args = [exe, "-aet", calling_ae, "-aec", called_ae, "-nh", "-to", "10", "-ta", "10", "-td", "30"]
    if any(p.is_dir() for p in paths):
        args += ["+sd", "+r"]
    args += [host, str(port), *(os.fspath(p) for p in paths)]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, env=peer_env(), check=False
    )


def echoscu(
    host: str, port: int, called_ae: str, calling_ae: str = "MODALITY", *, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Send one C-ECHO (PS3.4 Annex A, Verification) with DCMTK ``echoscu``."""
    exe = require_tool("echoscu")
    args = [exe, "-aet", calling_ae, "-aec", called_ae, "-to", "10", "-ta", "10", host, str(port)]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, env=peer_env(), check=False
    )


def dciodvfy(path: Path, *, timeout_s: float = _TOOL_TIMEOUT_S) -> list[str]:
    """Validate one file against its IOD (PS3.3) with ``dciodvfy``; return its lines containing "Error"."""
    exe = require_tool("dciodvfy")
    done = subprocess.run(
        [exe, os.fspath(path)], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


# --- Orthanc ---------------------------------------------------------------------------------------


class OrthancRestError(AssertionError):
    """Orthanc answered a REST call with an HTTP error; the message holds its body."""


class Orthanc:
    """A real Orthanc process with its own storage, ports and log under ``workdir``.

    Start it with :meth:`start`; it answers DICOM as ``aet`` on ``LOCALHOST:dicom_port`` and REST on
    ``http://LOCALHOST:http_port``. Orthanc listens on every interface; only its HTTP server is
    restricted to loopback (``RemoteAccessAllowed`` false).
    """

    def __init__(
        self, process: subprocess.Popen[bytes], workdir: Path, aet: str, dicom_port: int, http_port: int,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.process = process
        self.workdir = workdir
        self.aet = aet
        self.host = LOCALHOST
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.log_path = workdir / "orthanc.log"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._authorization = None
        if credentials is not None:
            token = base64.b64encode(":".join(credentials).encode("utf-8")).decode("ascii")
            self._authorization = f"Basic {token}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        always_allow_store: bool = True,
        always_allow_echo: bool = True,
        check_called_aet: bool = False,
        extra_config: Mapping[str, Any] | None = None,
    ) -> Orthanc:
        """Write a configuration into ``workdir``, start Orthanc and wait until REST ``/system`` answers.

        ``modalities`` maps a name to ``(AE title, host, port)`` (Orthanc's ``DicomModalities``);
        ``extra_config`` keys override the defaults written here: ``DicomPort`` and ``HttpPort``
        choose the ports (to start again on the same ones), and with ``AuthenticationEnabled`` the
        REST calls of this helper log in as the first of the ``RegisteredUsers``.
        """
        exe = require_tool("Orthanc")
        workdir.mkdir(parents=True, exist_ok=True)
        storage = workdir / "storage"
        storage.mkdir(exist_ok=True)
        dicom_port, http_port = free_port(), free_port()
        while http_port == dicom_port:
            http_port = free_port()
        config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": os.fspath(storage),
            "IndexDirectory": os.fspath(storage),
            "TemporaryDirectory": os.fspath(workdir),
            "Plugins": [],
            "LuaScripts": [],
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
            "DicomAlwaysAllowStore": always_allow_store,
            "DicomAlwaysAllowEcho": always_allow_echo,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomScuTimeout": 30,
            "StableAge": 1,
            "SaveJobs": False,
            "HttpTimeout": 60,
            "WebDavEnabled": False,
        }
        config.update(extra_config or {})
        dicom_port, http_port = int(config["DicomPort"]), int(config["HttpPort"])
        users = config.get("RegisteredUsers") or {}
        credentials = next(iter(users.items())) if config["AuthenticationEnabled"] and users else None
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log_path = workdir / "orthanc.log"
        with (workdir / "orthanc.stdout").open("wb") as console:
            process = subprocess.Popen(
                [exe, "--verbose", f"--logfile={log_path}", os.fspath(config_path)],
                cwd=workdir,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        server = cls(process, workdir, aet, dicom_port, http_port, credentials)
        try:
            wait_until(server._answers_rest, _ORTHANC_START_S, f"Orthanc REST /system on port {http_port}")
        except BaseException:
            server.stop()
            raise
        return server

    # -- REST ---------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Root of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    def _request(self, method: str, path: str, body: bytes | None, content_type: str) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self._authorization is not None:
            request.add_header("Authorization", self._authorization)
        try:
            with self._opener.open(request, timeout=_HTTP_TIMEOUT_S) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise OrthancRestError(f"Orthanc {method} {path} -> HTTP {exc.code}: {detail}") from exc

    def _answers_rest(self) -> bool:
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"Orthanc exited with code {code} while starting:\n{self.log_tail()}")
        try:
            self._request("GET", "/system", None, "")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    def rest_get(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return json.loads(self._request("GET", path, None, ""))

    def rest_post(self, path: str, body: object) -> Any:
        """POST ``body`` (bytes are sent raw, anything else as JSON) and decode the JSON answer."""
        if isinstance(body, bytes):
            raw, kind = body, "application/octet-stream"
        else:
            raw, kind = json.dumps(body).encode("utf-8"), "application/json"
        return json.loads(self._request("POST", path, raw, kind))

    def rest_put(self, path: str, body: object) -> bytes:
        """PUT ``body`` as JSON; return the raw answer (Orthanc answers some PUTs with an empty body)."""
        return self._request("PUT", path, json.dumps(body).encode("utf-8"), "application/json")

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        ids: list[str] = self.rest_get("/instances")
        return ids

    def studies(self) -> list[str]:
        """Orthanc identifiers of every stored study."""
        ids: list[str] = self.rest_get("/studies")
        return ids

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance (one REST call per instance)."""
        return {
            str(self.rest_get(f"/instances/{iid}")["MainDicomTags"]["SOPInstanceUID"])
            for iid in self.instances()
        }

    def add_modality(self, name: str, ae: str, host: str, port: int) -> None:
        """Declare a DICOM modality (``PUT /modalities/{name}``) that Orthanc may C-STORE to."""
        self.rest_put(f"/modalities/{name}", {"AET": ae, "Host": host, "Port": port})

    def upload(self, path: Path) -> str:
        """Store one DICOM file through REST (``POST /instances``); return its Orthanc identifier."""
        answer = self.rest_post("/instances", path.read_bytes())
        return str(answer["ID"])

    def download(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance (``GET /instances/{id}/file``)."""
        return self._request("GET", f"/instances/{instance_id}/file", None, "")

    def store_to_modality(self, name: str, resources: list[str]) -> Any:
        """C-STORE ``resources`` (Orthanc ids of instances/series/studies) to a modality, synchronously."""
        return self.rest_post(f"/modalities/{name}/store", {"Resources": resources, "Synchronous": True})

    # -- lifecycle ----------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of Orthanc's log and console output, for failure messages."""
        chunks = []
        for path in (self.workdir / "orthanc.stdout", self.log_path):
            if path.exists():
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(chunks)

    def stop(self) -> None:
        """Terminate Orthanc, wait for it with a deadline, and kill it if it does not exit."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=_ORTHANC_STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=_ORTHANC_STOP_S)

    def kill(self) -> None:
        """Kill Orthanc at once (its storage is disposable); a graceful stop takes about 3.5 s."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=_ORTHANC_STOP_S)


OrthancFactory = Callable[..., Orthanc]
"""``orthanc_factory(**kwargs)`` takes the keyword arguments of :meth:`Orthanc.start` but ``workdir``."""


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start Orthancs with chosen configurations under ``tmp_path``; kill all of them at teardown."""
    started: list[Orthanc] = []

    def start(**kwargs: Any) -> Orthanc:
        server = Orthanc.start(tmp_path / f"orthanc-{len(started)}", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Orthanc:
    """One Orthanc with the default configuration (AE ``ORTHANC``, accepts any store and echo)."""
    return orthanc_factory()
