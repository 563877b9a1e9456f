"""Helpers for the reliability tests on real processes (crash, outage, back-pressure, load, privacy).

- :func:`write_fixture_model` writes a fast model package (a pointwise ONNX graph from
  ``tests/onnx_fixtures.py`` with coarse resampling), so that these tests measure the node and not
  a network; :func:`serve_config` writes the TOML a ``reader serve`` subprocess reads.
- :func:`write_study` writes a synthetic CT study (``tests/dicom_factory.ct_series``) as Part 10
  files and returns what a test needs to know about it.
- :func:`peak_rss_bytes` reads a process's peak resident set (``VmHWM`` of ``/proc/PID/status``).
- :func:`pacs_results` lists the SR and SEG instances a PACS (Orthanc) holds for a series, in the
  order it received them (Orthanc's change log), with the result version each UID encodes.
- :func:`retention_config` adds a ``[retention]`` table of sub-second sweeps to ``serve_config``;
  :func:`reader_purge` runs ``reader purge --study`` as an administrator does; :func:`log_events`
  reads a command's JSON log events; :func:`refused_port` holds a port that refuses connections.
- :class:`Sender` is a modality sending in the background; :func:`assert_acknowledged_on_disk`
  checks that what it saw acknowledged is on the node's storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from reader.results.uids import result_uid
from reader.spool import Spool
from tests.dicom_factory import SeriesIds, ct_series, write_datasets
from tests.node_process import ReaderNode
from tests.onnx_fixtures import manifest_dict, sigmoid_model, write_package
from tests.peers import LOCALHOST, Orthanc, peer_env, require_tool

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "PacsResult",
    "Sender",
    "Study",
    "assert_acknowledged_on_disk",
    "log_events",
    "pacs_results",
    "peak_rss_bytes",
    "reader_purge",
    "refused_port",
    "retention_config",
    "serve_config",
    "store_responses",
    "write_fixture_model",
    "write_study",
]

MODEL_NAME = "test-blobs"
MODEL_VERSION = "0.0.1"


def fixture_identities() -> tuple[str, ...]:
    """What identifies the fixture models' weights in result UIDs (``model_identity``): the SHA-256
    of each graph ``write_fixture_model`` can write."""
    return tuple("sha256:" + hashlib.sha256(m.SerializeToString()).hexdigest()
                 for m in (sigmoid_model(), sigmoid_model(offset=50.0)))


def write_fixture_model(folder: Path, *, findings: bool = True) -> Path:
    """A model package that runs in well under a second on a small series.

    With ``findings`` the sigmoid model marks every voxel above about -300 HU (in a
    ``write_study`` series: every slice from the ninth on), one finding, so a SEG is made; without,
    the cut is far above any stored value and the SR says "no findings" (no SEG to encode).
    """
    manifest = manifest_dict()
    manifest["preprocessing"]["patch_size"] = [16, 64, 64]
    manifest["preprocessing"]["target_spacing_mm"] = [8.0, 8.0, 8.0]
    manifest["labels"][0]["max_findings"] = 1
    model = sigmoid_model() if findings else sigmoid_model(offset=50.0)
    return write_package(folder, manifest, model)


def serve_config(model_dir: Path, *, grace_seconds: float = 0.5, idle_timeout_seconds: float = 60,
                 retry_initial_seconds: float = 0.2, retry_max_seconds: float = 1.0, max_attempts: int = 1000,
                 association_timeout_seconds: float = 5, min_free_disk_mb: int | None = None) -> str:
    """The TOML for ``reader serve --config``: the fixture model, one CT route, fast completion and
    fast retries, CPU inference only. Destinations are given as ``--send-to`` flags."""
    node = f"[node]\nmin_free_disk_mb = {min_free_disk_mb}\n" if min_free_disk_mb is not None else ""
    return f"""{node}
[completion]
grace_seconds = {grace_seconds}
idle_timeout_seconds = {idle_timeout_seconds}

[sending]
retry_initial_seconds = {retry_initial_seconds}
retry_max_seconds = {retry_max_seconds}
max_attempts = {max_attempts}
association_timeout_seconds = {association_timeout_seconds}

[inference]
providers = ["CPUExecutionProvider"]
fp16 = false

[models.blob]
path = {json.dumps(str(model_dir))}

[[routes]]
name = "ct"
model = "blob"
modalities = ["CT"]
"""


@dataclass(frozen=True)
class Study:
    """A synthetic one-series CT study written as files."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]
    folder: Path


def write_study(folder: Path, n_slices: int = 20, *, rows: int = 64, columns: int = 64,
                patient_name: str = "Synthetic^Phantom", patient_id: str = "SYNTH-0001",
                birth_date: str = "", accession_number: str = "") -> Study:
    """Write one synthetic CT series (fresh UIDs) into ``folder``, one Part 10 file per slice
    (``accession_number``: e.g. one with a STAT prefix of ``[priority] stat_accession_prefixes``)."""
    datasets = ct_series(n_slices, ids=SeriesIds(), rows=rows, columns=columns)
    for ds in datasets:
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth_date  # Type 2 (PS3.3 C.7.1.1): present, maybe empty
        ds.PatientSex = ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101500", accession_number
        ds.ReferringPhysicianName, ds.StudyID = "", "1"
    files = write_datasets(datasets, folder)
    return Study(study_uid=str(datasets[0].StudyInstanceUID), series_uid=str(datasets[0].SeriesInstanceUID),
                 sop_uids=tuple(sorted(str(ds.SOPInstanceUID) for ds in datasets)), files=tuple(files),
                 folder=folder)


def store_responses(host: str, port: int, called_ae: str, files: Sequence[Path], *,
                    timeout_s: float = 300.0) -> list[str]:
    """Send ``files`` with ``storescu -v`` on one association; the text of each C-STORE response
    in order (``"Success"``, ``"Refused: OutOfResources"``...), one per file that got an answer."""
    exe = require_tool("storescu")
    done = subprocess.run([exe, "-v", "-nh", "-aet", "MODALITY", "-aec", called_ae, "-to", "10", "-ta", "10",
                           "-td", "60", host, str(port), *(os.fspath(f) for f in files)],
                          capture_output=True, text=True, timeout=timeout_s, env=peer_env(), check=False)
    prefix = "I: Received Store Response ("
    return [line.strip().removeprefix(prefix).rstrip(")")
            for line in (done.stdout + done.stderr).splitlines() if line.startswith(prefix)]


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a running process (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@dataclass(frozen=True)
class PacsResult:
    """One SR or SEG instance as the PACS holds it."""

    modality: str
    sop_uid: str
    version: int | None  # the result version its UID encodes; None: not a UID of ours for this series
    received_seq: int  # position in Orthanc's change log: higher arrived later
    orthanc_id: str


def _version_of(sop_uid: str, series_uid: str, kind: str, max_version: int) -> int | None:
    for identity in fixture_identities():
        for version in range(1, max_version + 1):
            if result_uid(series_uid, MODEL_NAME, identity, version, kind) == sop_uid:
                return version
    return None


def _arrivals(orthanc: Orthanc) -> dict[str, int]:
    """Orthanc instance id -> sequence number of its (last) NewInstance change."""
    seq: dict[str, int] = {}
    since = 0
    while True:
        page: dict[str, Any] = orthanc.rest_get(f"/changes?since={since}&limit=1000")
        for change in page["Changes"]:
            if change["ChangeType"] == "NewInstance":
                seq[str(change["ID"])] = int(change["Seq"])
        since = int(page["Last"])
        if page["Done"]:
            return seq


def pacs_results(orthanc: Orthanc, study_uid: str, series_uid: str, *,
                 max_version: int = 50) -> list[PacsResult]:
    """The SR and SEG instances in ``study_uid`` at the PACS, oldest arrival first.

    Versions are recognised by recomputing the node's deterministic result UIDs
    (``reader.results.uids.result_uid``) for versions 1..``max_version`` of ``series_uid``.
    """
    arrivals = _arrivals(orthanc)
    found: list[PacsResult] = []
    answer = orthanc.rest_post("/tools/find", {"Level": "Instance", "Expand": True,
                                               "Query": {"StudyInstanceUID": study_uid}})
    for instance in answer:
        sop_uid = str(instance["MainDicomTags"]["SOPInstanceUID"])
        series = orthanc.rest_get(f"/instances/{instance['ID']}/series")
        modality = str(series["MainDicomTags"].get("Modality", ""))
        if modality not in ("SR", "SEG"):
            continue
        kind = "sr-instance" if modality == "SR" else "seg-instance"
        found.append(PacsResult(modality, sop_uid, _version_of(sop_uid, series_uid, kind, max_version),
                                arrivals.get(str(instance["ID"]), -1), str(instance["ID"])))
    return sorted(found, key=lambda r: r.received_seq)


def replace_files(study: Study, files: Sequence[Path]) -> Study:
    """The same study with a different file list (e.g. all but the last slice)."""
    return dataclasses.replace(study, files=tuple(files))


def retention_config(model: Path, **retention: float) -> str:
    """``serve_config`` with a ``[retention]`` table (sub-second sweeps, no disk margin)."""
    table = {"sweep_minutes": 0.005, "disk_margin_mb": 0, "results_days": 0, "history_days": 0, **retention}
    return serve_config(model) + "\n[retention]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())


def reader_purge(data_dir: Path, study_uid: str, *extra: str,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``reader purge --study`` as an administrator runs it."""
    return subprocess.run([sys.executable, "-m", "reader.cli", "purge", "--data-dir", os.fspath(data_dir),
                           "--study", study_uid, *extra], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


def log_events(stderr: str, name: str) -> list[dict[str, Any]]:
    """The JSON log events named ``name`` in a command's stderr."""
    return [e for line in stderr.splitlines() if line.startswith("{")
            if (e := json.loads(line)).get("event") == name]


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening while the block runs: every connection to it is
    refused, and no other process (a peer another test starts) can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        yield int(sock.getsockname()[1])


def assert_acknowledged_on_disk(data_dir: Path, acked: Iterable[Path], label: str = "") -> None:
    """Each file a modality saw acknowledged is stored in ``data_dir`` where the spool keeps it
    (``Spool.instance_path`` of its UIDs) and is that instance; ``label`` starts each message."""
    spool = Spool(data_dir)
    prefix = f"{label}: " if label else ""
    for path in acked:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spool.instance_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                     str(ds.SOPInstanceUID))
        assert stored.is_file(), f"{prefix}acknowledged instance {ds.SOPInstanceUID} lost"
        kept = pydicom.dcmread(stored, stop_before_pixels=True, force=True)
        assert kept.SOPInstanceUID == ds.SOPInstanceUID


class Sender:
    """A modality sending files on one association with ``storescu -v``, in the background
    (``tests/test_crash.py``, ``tests/test_cluster.py``)."""

    def __init__(self, node: ReaderNode, files: Sequence[Path], log_path: Path, *,
                 deadline_s: float = 60.0) -> None:
        self.log_path = log_path
        self.deadline_s = deadline_s
        exe = require_tool("storescu")
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [exe, "-v", "-nh", "-aet", "MODALITY", "-aec", node.ae_title, "-to", "5", "-ta", "5",
                 "-td", "10", node.host, str(node.port), *(os.fspath(f) for f in files)],
                stdout=out, stderr=subprocess.STDOUT, env=peer_env())

    def acknowledged(self) -> set[Path]:
        """Wait (``deadline_s``) for storescu to end; the files it got Success for."""
        self.process.wait(timeout=self.deadline_s)
        acked: set[Path] = set()
        current: Path | None = None
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("I: Sending file: "):
                current = Path(line.removeprefix("I: Sending file: ").strip())
            elif line.startswith("I: Received Store Response (Success)") and current is not None:
                acked.add(current)
                current = None
        return acked
