"""STAT work goes first: C-STORE Priority HIGH, or an accession-number prefix rule, puts a series
ahead of routine series already queued (issue: second-reader flagging and worklist integration)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from reader.config import WorklistConfig
from reader.findings import InferenceResult
from reader.inference import ModelPackage
from reader.jobs import SeriesStatus
from reader.node import PRIORITY_STAT, Node
from reader.requestor import keep_responses_for_caller
from reader.results.uids import result_uid
from reader.volume import Volume
from tests.peers import LOCALHOST, require_data, require_tool, storescu, wait_until
from tests.test_node import DEADLINE_S, _config, model

__all__ = ["model"]


class GatedModel:
    """A real model whose first run waits for the test to open the gate; records the run order."""

    def __init__(self, inner: ModelPackage) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        """The rest (algorithm, provider, precision) as the real package has it."""
        return getattr(self.inner, name)

    def run(self, volume: Volume) -> InferenceResult:
        self.order.append(volume.series_instance_uid)
        self.entered.set()
        self.gate.wait(DEADLINE_S)
        return self.inner.run(volume)


def _copy_series(files: list[Path], out: Path, name: str, accession: str) -> list[Path]:
    """The slices as a new study of one series (new study, series and SOP instance UIDs) with
    ``accession``: each is read on its own (a route reads one series per study)."""
    out.mkdir(parents=True)
    series_uid = result_uid(name, "test", "1", 1, "series")
    study_uid = result_uid(name, "test", "1", 1, "study")
    paths = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = result_uid(name, "test", "1", 1, str(i))
        ds.AccessionNumber = accession
        paths.append(out / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _send_high_priority(port: int, files: list[Path]) -> None:
    ae = AE(ae_title="EDMODALITY")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate(LOCALHOST, port, ae_title="SECONDREADER")
    assert assoc.is_established
    keep_responses_for_caller(assoc)  # several requests on one association (reader.requestor)
    try:
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f), priority=1).Status == 0
    finally:
        assoc.release()


def test_stat_series_overtake_queued_routine_ones(tmp_path: Path, model: ModelPackage) -> None:
    """With routine series queued behind one in progress, a series sent at C-STORE Priority HIGH and
    one whose accession number has a STAT prefix are both processed before the queued routine ones."""
    require_tool("storescu")
    source = sorted(require_data("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel").glob("*.dcm"))[:16]
    series = {name: _copy_series(source, tmp_path / name, name, accession)
              for name, accession in (("routine-a", "R1"), ("routine-b", "R2"), ("routine-c", "R3"),
                                      ("stat-priority", "R4"), ("stat-accession", "ED42"))}
    uid = {name: str(pydicom.dcmread(files[0]).SeriesInstanceUID) for name, files in series.items()}
    gated = GatedModel(model)
    cfg = replace(_config(tmp_path), worklist=WorklistConfig(stat_accession_prefixes=("ED",)))
    node = Node(cfg, {"blob": cast(Any, gated)})
    node.start()
    try:
        for name in ("routine-a", "routine-b", "routine-c"):
            assert storescu(LOCALHOST, node.scp.port, "SECONDREADER", series[name]).returncode == 0
        wait_until(gated.entered.is_set, DEADLINE_S, "the first routine series to reach the model")
        wait_until(lambda: len(node.jobs.pending_jobs()) == 3, DEADLINE_S, "the other routine series queued")
        _send_high_priority(node.scp.port, series["stat-priority"])
        assert storescu(LOCALHOST, node.scp.port, "SECONDREADER", series["stat-accession"]).returncode == 0
        wait_until(lambda: sum(j.priority == PRIORITY_STAT for j in node.jobs.pending_jobs()) == 2,
                   DEADLINE_S, "both STAT series queued")
        gated.gate.set()
        wait_until(lambda: all((s := node.jobs.series_state(u)) is not None and s.status is SeriesStatus.DONE
                               for u in uid.values()), DEADLINE_S, "all five series processed")
    finally:
        gated.gate.set()
        node.stop()
    order = [next(n for n, u in uid.items() if u == series_uid) for series_uid in gated.order]
    assert order[0] == "routine-a"
    assert set(order[1:3]) == {"stat-priority", "stat-accession"}, order
    assert set(order[3:]) == {"routine-b", "routine-c"}

