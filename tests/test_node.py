"""The node in-process, fed by real DCMTK storescu (and a pynetdicom SCU for hostile input).

A small real ONNX model (tests/onnx_fixtures.py) stands in for the reference model so that these
tests exercise receiving, completion, versioning, routing and dispatch quickly; the reference
model itself runs in tests/test_node_e2e.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from reader import dimse
from reader.config import CompletionConfig, ModelRef, NodeConfig, Route, SendingConfig
from reader.inference import ModelPackage
from reader.jobs import SendState, SeriesStatus
from reader.node import Node
from reader.requestor import keep_responses_for_caller
from reader.send import Destination
from tests.onnx_fixtures import blob_package
from tests.peers import (
    LOCALHOST,
    Orthanc,
    dciodvfy,
    free_port,
    require_data,
    require_tool,
    storescu,
    wait_until,
)

DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """A real ONNX model marking dense (bright) structures, with coarse resampling for speed."""
    return ModelPackage.load(blob_package(tmp_path_factory.mktemp("pkg")))


@pytest.fixture
def ct_slices(tmp_path: Path) -> list[Path]:
    """Twenty consecutive slices of the real lung-kernel CT, copied to a scratch folder."""
    series = require_data("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel")
    files = sorted(series.glob("*.dcm"), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))[20:40]
    out = tmp_path / "ct"
    out.mkdir()
    return [Path(shutil.copy(f, out)) for f in files]


def _config(tmp_path: Path, **changes: object) -> NodeConfig:
    cfg = NodeConfig(
        ae_title="SECONDREADER", bind_address=LOCALHOST, port=free_port(), data_dir=tmp_path / "data",
        completion=CompletionConfig(grace=timedelta(seconds=0.5), idle_timeout=timedelta(seconds=30)),
        sending=SendingConfig(retry_initial=timedelta(seconds=0.2), retry_max=timedelta(seconds=1),
                              max_attempts=3),
        models=(ModelRef("blob", Path("unused")),),
        routes=(Route("ct", "blob", modalities=("CT",)),),
    )
    return replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture
def running(tmp_path: Path, model: ModelPackage) -> Iterator[Node]:
    """A started node without destinations; stopped at teardown."""
    require_tool("storescu")
    node = Node(_config(tmp_path), {"blob": model})
    node.start()
    yield node
    node.stop()


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _wait_status(node: Node, series_uid: str, version: int, status: SeriesStatus) -> None:
    def reached() -> bool:
        state = node.jobs.series_state(series_uid)
        return state is not None and state.version == version and state.status is status
    wait_until(reached, DEADLINE_S, f"series {series_uid} v{version} {status}")


def _send(node: Node, files: list[Path]) -> None:
    result = storescu(LOCALHOST, node.scp.port, node.config.ae_title, files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_series_is_processed_after_release_and_results_kept(running: Node, ct_slices: list[Path]) -> None:
    """A series sent on one association is completed after release, processed, and its SR kept on disk."""
    _send(running, ct_slices)
    series_uid = _series_uid(ct_slices)
    _wait_status(running, series_uid, 1, SeriesStatus.DONE)
    assert running.spool.result_path(series_uid, 1, "sr").is_file()
    stored = running.spool.series_instances(
        str(pydicom.dcmread(ct_slices[0], stop_before_pixels=True).StudyInstanceUID), series_uid)
    assert len(stored) == 20
    assert list((running.spool.root / "tmp").iterdir()) == []


def test_late_instance_gives_a_superseding_version(running: Node, ct_slices: list[Path]) -> None:
    """An instance arriving after processing yields result version 2 with new UIDs whose SR names
    version 1 as its predecessor document; resending the same instances again changes nothing."""
    series_uid = _series_uid(ct_slices)
    _send(running, ct_slices[:-1])
    _wait_status(running, series_uid, 1, SeriesStatus.DONE)
    _send(running, ct_slices[-1:])
    _wait_status(running, series_uid, 2, SeriesStatus.DONE)
    v1 = pydicom.dcmread(running.spool.result_path(series_uid, 1, "sr"))
    v2 = pydicom.dcmread(running.spool.result_path(series_uid, 2, "sr"))
    assert v1.SOPInstanceUID != v2.SOPInstanceUID
    assert v1.StudyInstanceUID == v2.StudyInstanceUID
    predecessor = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == v1.SOPInstanceUID
    assert dciodvfy(running.spool.result_path(series_uid, 2, "sr")) == []
    _send(running, ct_slices)
    wait_until(lambda: running.tracker.tracked() == 0 and not running.jobs.pending_jobs(), DEADLINE_S,
               "the resent series to be judged complete")
    state = running.jobs.series_state(series_uid)
    assert state is not None and state.version == 2


def test_unmatched_series_is_recorded_as_skipped(tmp_path: Path, model: ModelPackage,
                                                 ct_slices: list[Path]) -> None:
    """A series that matches no route is skipped with the reason recorded, and no result is made."""
    require_tool("storescu")
    node = Node(_config(tmp_path, routes=(Route("mr-only", "blob", modalities=("MR",)),)), {"blob": model})
    node.start()
    try:
        _send(node, ct_slices)
        series_uid = _series_uid(ct_slices)
        _wait_status(node, series_uid, 1, SeriesStatus.SKIPPED)
        state = node.jobs.series_state(series_uid)
        assert state is not None and "mr-only: modality CT" in state.reason
        assert not node.spool.result_path(series_uid, 1, "sr").exists()
    finally:
        node.stop()


def test_hostile_uid_gets_a_named_failure_status_and_node_keeps_serving(running: Node,
                                                                         ct_slices: list[Path]) -> None:
    """A UID built to escape the data dir is refused with 0xC000, nothing is written outside the
    spool, and the node still answers C-ECHO and stores valid instances."""
    ds = pydicom.dcmread(ct_slices[0])
    ds.SeriesInstanceUID = "../../../../tmp/escape"
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, running.scp.port, ae_title="SECONDREADER")
    assert assoc.is_established
    keep_responses_for_caller(assoc)  # a C-STORE, then a C-ECHO on one association (reader.requestor)
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == dimse.CANNOT_UNDERSTAND
        assert assoc.send_c_echo().Status == dimse.SUCCESS
    finally:
        assoc.release()
    assert not Path("/tmp/escape").exists()
    assert not any(p.name == "escape" for p in running.spool.root.rglob("*"))
    _send(running, ct_slices[:2])


def test_restart_resumes_a_collecting_series(tmp_path: Path, model: ModelPackage,
                                             ct_slices: list[Path]) -> None:
    """Instances acknowledged before a stop are processed by the next node on the same data dir."""
    require_tool("storescu")
    slow = CompletionConfig(grace=timedelta(seconds=600), idle_timeout=timedelta(seconds=600))
    first = Node(_config(tmp_path, completion=slow), {"blob": model})
    first.start()
    try:
        _send(first, ct_slices)
    finally:
        first.stop()
    series_uid = _series_uid(ct_slices)
    assert first.jobs.series_state(series_uid) is None  # never completed before the stop
    second = Node(_config(tmp_path), {"blob": model})
    second.start()
    try:
        _wait_status(second, series_uid, 1, SeriesStatus.DONE)
    finally:
        second.stop()


def test_sends_retry_then_park_and_reader_retry_requeues(tmp_path: Path, model: ModelPackage,
                                                        ct_slices: list[Path],
                                                        orthanc_factory: object) -> None:
    """A destination that is down gets retried with backoff and parked after max_attempts;
    `reader retry` re-queues it, and it is delivered once the PACS is up."""
    require_tool("storescu")
    dead_port = free_port()
    node = Node(_config(tmp_path, destinations=(Destination("PACS", LOCALHOST, dead_port),)), {"blob": model})
    node.start()
    try:
        _send(node, ct_slices)
        series_uid = _series_uid(ct_slices)
        wait_until(lambda: [t.state for t in node.jobs.sends()] == [SendState.FAILED], DEADLINE_S,
                   "the send to a dead destination to be parked")
        ticket = node.jobs.sends()[0]
        assert ticket.attempts == 3 and "gave up" in ticket.last_error
    finally:
        node.stop()
    status = subprocess.run([sys.executable, "-m", "reader.cli", "status", "--data-dir",
                             str(node.spool.root)], capture_output=True, text=True, check=True)
    assert "Parked sends: 1" in status.stdout
    retry = subprocess.run([sys.executable, "-m", "reader.cli", "retry", "--data-dir", str(node.spool.root)],
                           capture_output=True, text=True, check=True)
    assert "re-queued 1" in retry.stdout
    orthanc: Orthanc = orthanc_factory(aet="PACS", extra_config={"DicomPort": dead_port})  # type: ignore[operator]
    revived = Node(node.config, {"blob": model})
    revived.start()
    try:
        wait_until(lambda: [t.state for t in revived.jobs.sends()] == [SendState.DONE], DEADLINE_S,
                   "the re-queued send to reach Orthanc")
        sr = pydicom.dcmread(revived.spool.result_path(series_uid, 1, "sr"), stop_before_pixels=True)
        assert sr.SOPInstanceUID in orthanc.sop_instance_uids()
    finally:
        revived.stop()


def test_invalid_config_exits_2_before_opening_a_port(tmp_path: Path) -> None:
    """An invalid flag prints one line naming it and exits 2; nothing listens."""
    result = subprocess.run([sys.executable, "-m", "reader.cli", "serve", "--port", "70000",
                             "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("reader: configuration error: --port:")
    assert not (tmp_path / "d").exists()
