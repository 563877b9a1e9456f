"""Shared helpers of the benchmarks: private network namespace, synthetic CT, the servers, results.

Every benchmark runs its servers (the node, DCMTK ``storescp``, Orthanc) on ``127.0.0.1`` only,
and when it runs as root inside a private network namespace (``unshare -n``, then
``ip link set lo up``): storescp 3.6.7 and Orthanc 1.10 listen on every interface. DCMTK peers get
``TCP_NODELAY=1`` in their environment (Debian's DCMTK leaves Nagle on otherwise).

The synthetic CT is a chest-like phantom (air, soft tissue, two lungs, a few bright nodules) of
512 x 512 int16 slices with Rescale Slope 1 and Intercept -1024 (PS3.3 C.8.2.1), written once per
shape into a cache folder and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime
import pydicom
import pynetdicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"
NETNS_MARK = "READER_BENCH_NETNS"
DEFAULT_WORK = Path(os.environ.get("READER_BENCH_WORK", "/tmp/reader-bench"))
RESULTS = REPO / "bench" / "results"
REFERENCE_MODEL = REPO / "models" / "lung-lesion-unet"
_POLL_S = 0.02


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every bench script shares: ``--model DIR`` and ``--work DIR``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="model package (default: models/lung-lesion-unet, else a fixture model)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder for data and peers")
    return p

if str(REPO) not in sys.path:  # the scripts run as files: make ``reader`` and ``tests`` importable
    sys.path.insert(0, str(REPO))


# --- environment -----------------------------------------------------------------------------------


def enter_private_netns() -> bool:
    """Re-run this script inside a private network namespace when root; True when inside one.

    Without root (or without ``unshare``) the script goes on in the host namespace, binding and
    connecting on 127.0.0.1 only, and says so.
    """
    if os.environ.get(NETNS_MARK) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return True
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare is not None and shutil.which("ip") is not None:
        env = {**os.environ, NETNS_MARK: "1"}
        os.execve(unshare, [unshare, "-n", sys.executable, *sys.argv], env)
    print("warning: not root or no unshare: servers run in the host network namespace "
          "(storescp and Orthanc then listen on every interface)", file=sys.stderr)
    return False


def peer_env() -> dict[str, str]:
    """Environment for DCMTK-based programs (storescu, storescp, Orthanc): Nagle off."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll ``predicate()`` until true; raise TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(_POLL_S)


def _version(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, Any]:
    """The machine and software a figure comes from."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "onnxruntime": onnxruntime.__version__,
        "dcmtk": _version(["storescu", "--version"]),
        "orthanc": _version([orthanc_exe(), "--version"]),
        "private_netns": os.environ.get(NETNS_MARK) == "1",
        "load_average_start": list(os.getloadavg()),
        "date_utc": datetime.utcnow().isoformat(timespec="seconds") + "Z",
    }


def orthanc_exe() -> str:
    """The Orthanc program (Debian installs it in /usr/sbin)."""
    search = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
    return shutil.which("Orthanc", path=search) or "Orthanc"


# --- statistics and output -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (pasteable into bench/README.md)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def write_json(name: str, payload: Mapping[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (or under ``out_dir``) with the load average at the end."""
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    body = {**payload, "load_average_end": list(os.getloadavg())}
    path.write_text(json.dumps(body, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


# --- synthetic CT ----------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    """A deterministic UID under 2.25 (PS3.5 B.2) from ``parts``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:15]
    return "2.25." + str(int.from_bytes(digest, "big"))


def phantom_slice(index: int, rows: int, columns: int, n_slices: int) -> npt.NDArray[np.int16]:
    """Stored values (HU + 1024) of slice ``index``: body ellipse, two lungs, three solid nodules
    (40 HU, 14, 20 and 25 mm across; 0.7 mm pixels, 1.25 mm slices) that the reference model finds."""
    y, x = np.ogrid[:rows, :columns]
    cy, cx = rows / 2, columns / 2
    hu = np.full((rows, columns), -1000.0, dtype=np.float32)
    hu[((y - cy) / (0.40 * rows)) ** 2 + ((x - cx) / (0.46 * columns)) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        dx = (x - cx - side * 0.2 * columns) / (0.15 * columns)
        lung = ((y - cy) / (0.30 * rows)) ** 2 + dx**2 <= 1
        hu[lung] = -850.0
    z = index / max(1, n_slices - 1)
    for radius_mm, (ny, nx, nz) in zip((7.0, 10.0, 12.5), ((0.45, 0.32, 0.3), (0.55, 0.70, 0.5),
                                                          (0.40, 0.62, 0.75)), strict=True):
        dz_mm = (z - nz) * (n_slices - 1) * 1.25
        r2 = (radius_mm**2 - dz_mm**2) / 0.7**2  # in pixels squared
        if r2 > 0:
            hu[(y - ny * rows) ** 2 + (x - nx * columns) ** 2 <= r2] = 40.0
    ramp = np.arange(rows * columns, dtype=np.int32).reshape(rows, columns)
    noise = ((ramp * 7919 + index * 104729) % 21) - 10
    return (hu + 1024 + noise).astype(np.int16)


def synthetic_ct(n_slices: int, folder: Path, *, tag: str = "ct", rows: int = 512,
                 columns: int = 512) -> list[Path]:
    """Write (once) a synthetic CT series of ``n_slices`` under ``folder``; returns its files.

    Study and series UIDs derive from ``tag`` and the shape, so two tags are two distinct studies.
    """
    done = folder.parent / f"{folder.name}.complete"
    if done.exists():
        return sorted(folder.glob("*.dcm"))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    key = (tag, n_slices, rows, columns)
    ds = _ct_header(key, rows, columns)
    paths = []
    for k in range(n_slices):
        ds.SOPInstanceUID = _uid(*key, "sop", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-179.2, -179.2, round(-k * 1.25, 3)]
        ds.SliceLocation = round(-k * 1.25, 3)
        ds.PixelData = phantom_slice(k, rows, columns, n_slices).tobytes()
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    done.write_text("ok\n")
    return paths


def _ct_header(key: tuple[object, ...], rows: int, columns: int) -> Dataset:
    """The header shared by every slice of a synthetic series (PS3.3 A.3 CT Image IOD)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = _uid(*key, "study")
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.FrameOfReferenceUID = _uid(*key, "for")
    ds.Modality = "CT"
    ds.PatientName = "Bench^Phantom"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = "BENCH" + _uid(*key)[-6:]
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "reader-bench"
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "Bench synthetic chest CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.25
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


# --- model packages --------------------------------------------------------------------------------


def model_dir(requested: Path | None, work: Path) -> tuple[Path, str]:
    """The model package to benchmark and what it is.

    ``requested`` when given; else the reference model when its ``model.onnx`` exists; else a fixture
    package (``tests/onnx_fixtures``: a pointwise sigmoid that marks voxels above ~200 HU) with the
    reference manifest's preprocessing, so every stage but the network itself is the real one.
    """
    if requested is not None:
        return requested.resolve(), f"given: {requested}"
    if (REFERENCE_MODEL / "model.onnx").exists():
        return REFERENCE_MODEL, "reference lung-lesion-unet"
    from tests import onnx_fixtures  # noqa: PLC0415 - needs onnx, a dev dependency: only when used

    manifest = tomllib.loads((REFERENCE_MODEL / "model.toml").read_text(encoding="utf-8"))
    manifest["model"]["name"] = "bench-fixture"
    manifest["model"]["version"] = "0.0.1"
    manifest["model"].pop("onnx_fp16", None)
    folder = work / "fixture-model"
    onnx_fixtures.write_package(folder, manifest, onnx_fixtures.sigmoid_model(offset=0.86, scale=40.0))
    return folder, "fixture (pointwise sigmoid, reference preprocessing: 4x2x2 mm, 32x128x128 patches)"


# --- servers ---------------------------------------------------------------------------------------


@dataclass
class Server:
    """A started server process listening on ``LOCALHOST:port`` with AE title ``aet``."""

    name: str
    process: subprocess.Popen[bytes]
    aet: str
    port: int
    workdir: Path
    http_port: int = 0
    siblings: list[Server] = field(default_factory=list)  # more processes of the same target

    def stop(self) -> None:
        """Terminate (siblings too), then kill after 15 s."""
        for sibling in self.siblings:
            sibling.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)

    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        """Orthanc REST call (JSON answer)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://{LOCALHOST}:{self.http_port}{path}", data=body,
                                         method=method)
        with opener.open(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None


def _listening(port: int, process: subprocess.Popen[bytes], name: str) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"{name} exited with {process.returncode} while starting")
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_storescp(workdir: Path, *, max_pdu: int = 131072, fork: bool = False) -> Server:
    """DCMTK storescp writing every instance into ``workdir/out`` (its default, not bit-preserving);
    ``fork``: ``--fork``, a child process per association."""
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = shutil.which("storescp") or "storescp"
    log = (workdir / "storescp.log").open("ab")
    process = subprocess.Popen([exe, "-aet", "STORESCP", "-pdu", str(max_pdu), "-od", str(out),
                                *(["--fork"] if fork else []), str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=peer_env())
    wait_until(lambda: _listening(port, process, "storescp"), 30, "storescp")
    return Server("storescp", process, "STORESCP", port, workdir)


def start_orthanc(workdir: Path, *, modalities: Mapping[str, tuple[str, str, int]] | None = None,
                  max_pdu: int = 131072) -> Server:
    """Orthanc with its own storage under ``workdir``, DICOM and REST on free ports, default logging."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "TemporaryDirectory": str(workdir), "Plugins": [], "LuaScripts": [], "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "StableAge": 60,
        "SaveJobs": False, "MaximumPduLength": max_pdu, "WebDavEnabled": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = (workdir / "orthanc.stdout").open("ab")
    process = subprocess.Popen([orthanc_exe(), f"--logfile={workdir / 'orthanc.log'}",
                                str(workdir / "orthanc.json")], cwd=workdir, stdout=log,
                               stderr=subprocess.STDOUT, env=peer_env())
    server = Server("orthanc", process, "ORTHANC", port, workdir, http_port)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode} while starting")
        try:
            server.rest("/system")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    wait_until(answers, 60, "Orthanc REST")
    return server


def start_node(workdir: Path, model: Path, *, config_extra: str = "", destinations: Sequence[str] = (),
               process_series: bool = True, variant: Sequence[str] = (), name: str = "node",
               web: bool = True) -> Server:
    """``reader serve`` (``python -m reader.cli``) on 127.0.0.1 with ``model`` as its only model.

    ``process_series=False`` routes nothing (a route needing a million instances), so ingest runs are not
    disturbed by processing: the series are recorded as skipped after reading one header.
    ``variant`` (``--no-fsync``, ``--no-tune``) runs it through ``bench/node_variant.py``.
    ``web=False`` turns its HTTP server off (``[web] enabled = false``); otherwise the bound port
    is in ``http_port``.
    """
    port = free_port()
    data = workdir / "data"
    min_instances = 1 if process_series else 1_000_000
    config = (f'[models.bench]\npath = "{model}"\n\n[[routes]]\nname = "bench"\nmodel = "bench"\n'
              f'modalities = ["CT"]\nmin_instances = {min_instances}\n{config_extra}\n')
    if not web:
        config += "\n[web]\nenabled = false\n"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "reader.toml").write_text(config)
    launcher = [str(REPO / "bench" / "node_variant.py"), *variant] if variant else ["-m", "reader.cli"]
    cmd = [sys.executable, *launcher, "serve", "--config", str(workdir / "reader.toml"),
           "--bind", LOCALHOST, "--port", str(port), "--ae-title", "SECONDREADER", "--data-dir", str(data)]
    if web:
        cmd += ["--web-port", "0"]  # any free port: 8080 may be taken
    for dest in destinations:
        cmd += ["--send-to", dest]
    log = (workdir / "node.log").open("ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wait_until(lambda: _listening(port, process, "reader serve"), 120, "reader serve")
    server = Server(name, process, "SECONDREADER", port, workdir)
    if web:
        wait_until(lambda: bool(node_events(server, "web.listening")), 60, "reader serve's HTTP server")
        server.http_port = int(node_events(server, "web.listening")[-1]["port"])
    return server


def node_events(server: Server, name: str | None = None) -> list[dict[str, Any]]:
    """JSON events of a node's log so far (only ``name`` when given)."""
    out = []
    for line in (server.workdir / "node.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
    return out


def event_time(event: Mapping[str, Any]) -> float:
    """The POSIX time of a node event (its ISO UTC ``timestamp``)."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def storescu(server: Server, folder: Path, *, calling_ae: str = "BENCHSCU") -> float:
    """Send every file of ``folder`` with DCMTK storescu on one association; returns wall seconds."""
    exe = shutil.which("storescu") or "storescu"
    args = [exe, "-aet", calling_ae, "-aec", server.aet, "-to", "30", "-ta", "30", "-td", "60",
            "+sd", LOCALHOST, str(server.port), str(folder)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=peer_env(), check=False, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {server.name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


@contextlib.contextmanager
def servers(*started: Server) -> Iterator[None]:
    """Stop the servers however the block ends."""
    try:
        yield
    finally:
        for server in started:
            server.stop()


def rss_peak_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
