"""Detection (boxes) models end to end: storescu -> node -> Orthanc, on a CT series and a radiograph.

Fixture detector packages (tests/onnx_fixtures.py ``boxes_model``: real ONNX graphs that output
constant boxes) stand in for a real detector. Each box becomes an SR finding drawn as its box
outline (SCOORD POLYLINE) on its key image, in a TID 1410 planar group; there is no SEG.

Data: the lung-kernel series of patient Lung_Dx-A0001 of the TCIA collection Lung-PET-CT-Dx (CC BY
4.0): Li, P., Wang, S., Li, T., Lu, J., HuangFu, Y., & Wang, D. (2020). A Large-Scale CT and PET/CT
Dataset for Lung Cancer Diagnosis [Data set]. The Cancer Imaging Archive.
https://doi.org/10.7937/TCIA.2020.NNC20461; and pydicom-data's RG1_UNCR.dcm, a Philips CR chest
radiograph with lung masses.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from reader.config import CompletionConfig, ModelRef, NodeConfig, Route, SendingConfig
from reader.inference import ModelPackage
from reader.jobs import SeriesStatus
from reader.node import Node
from reader.send import Destination
from tests.onnx_fixtures import boxes_manifest_dict, boxes_model, write_package
from tests.peers import (
    LOCALHOST,
    Orthanc,
    dciodvfy,
    free_port,
    missing,
    require_data,
    require_tool,
    storescu,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning"),
]

DEADLINE_S = 180.0
CT_BOX = [100.0, 120.0, 2.0, 160.0, 170.0, 6.0, 0.9, 1]  # [x0, y0, z0, x1, y1, z1, score, label], model grid
CR_BOX = [40.0, 60.0, 100.0, 140.0, 0.8, 1]  # [x0, y0, x1, y1, score, label] on the 1 mm grid


@pytest.fixture
def node(tmp_path: Path, orthanc: Orthanc) -> Iterator[Node]:
    """A node with a 3-D CT detector and a 2-D CR/DX detector, sending to Orthanc."""
    require_tool("storescu")
    ct = boxes_manifest_dict(dimensions=3, modalities=("CT",))
    ct["preprocessing"]["target_spacing_mm"] = [5.0, 2.0, 2.0]
    ct["preprocessing"]["patch_size"] = [16, 256, 256]
    cr = boxes_manifest_dict(dimensions=2, modalities=("CR", "DX"))
    cr["preprocessing"]["target_spacing_mm"] = [1.0, 1.0]
    models = {
        "ct-boxes": ModelPackage.load(write_package(tmp_path / "ct-pkg", ct, boxes_model([CT_BOX]))),
        "cr-boxes": ModelPackage.load(write_package(tmp_path / "cr-pkg", cr,
                                                    boxes_model([CR_BOX], dimensions=2))),
    }
    config = NodeConfig(
        ae_title="SECONDREADER", bind_address=LOCALHOST, port=free_port(), data_dir=tmp_path / "data",
        completion=CompletionConfig(grace=timedelta(seconds=0.5), idle_timeout=timedelta(seconds=30)),
        sending=SendingConfig(retry_initial=timedelta(seconds=0.5), retry_max=timedelta(seconds=2)),
        models=(ModelRef("ct-boxes", Path("unused")), ModelRef("cr-boxes", Path("unused"))),
        routes=(Route("radiograph", "cr-boxes", modalities=("CR", "DX")),
                Route("ct", "ct-boxes", modalities=("CT",))),
        destinations=(Destination(orthanc.aet, orthanc.host, orthanc.dicom_port),),
    )
    running = Node(config, models)
    running.start()
    yield running
    running.stop()


def _objects(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The SR, SEG and KO instances of ``study_uid`` at Orthanc, by modality."""
    found: dict[str, list[pydicom.Dataset]] = {}
    answer: Any = orthanc.rest_post("/tools/find", {"Level": "Instance", "Expand": True,
                                                    "Query": {"StudyInstanceUID": study_uid}})
    for instance in answer:
        ds = pydicom.dcmread(io.BytesIO(orthanc.download(instance["ID"])))
        if ds.Modality in ("SR", "SEG", "KO"):
            found.setdefault(str(ds.Modality), []).append(ds)
    return found


def _sent(node: Node, orthanc: Orthanc, study_uid: str, series_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Wait for the series to be processed and its SR and KOS to reach Orthanc; return the objects."""
    def arrived() -> bool:
        state = node.jobs.series_state(series_uid)
        if state is not None and state.status in (SeriesStatus.FAILED, SeriesStatus.SKIPPED):
            raise AssertionError(f"series {state.status}: {state.reason}")
        return {"SR", "KO"} <= set(_objects(orthanc, study_uid))
    wait_until(arrived, DEADLINE_S, "the detection SR and KOS in Orthanc")
    return _objects(orthanc, study_uid)


def _check_box_report(objects: dict[str, list[pydicom.Dataset]], image_uids: set[str], tmp_path: Path) -> Any:
    """One SR (TID 1500, one planar group whose box outline lies on a source image), one KOS, no
    SEG, all passing dciodvfy; returns the group."""
    assert "SEG" not in objects, "a detection model makes no SEG"
    assert len(objects["SR"]) == 1 and len(objects["KO"]) == 1
    for modality, datasets in objects.items():
        path = tmp_path / f"{modality}.dcm"
        datasets[0].save_as(path, enforce_file_format=True)
        assert dciodvfy(path) == [], f"{modality} fails dciodvfy"
    buffer = io.BytesIO()
    objects["SR"][0].save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(buffer).content)
    (group,) = report.get_planar_roi_measurement_groups()
    region = group.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    points = np.asarray(region.value).reshape(-1, 2)
    assert len(points) == 5 and tuple(points[0]) == tuple(points[-1])
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in image_uids
    names = {m.name.meaning for m in group.get_measurements()}
    assert {"Long axis", "Short axis"} <= names and "Volume" not in names
    return group


def test_ct_detector_boxes_reach_the_pacs_as_sr_findings(
    node: Node, orthanc: Orthanc, tmp_path: Path
) -> None:
    """A 3-D detector's box on a CT series comes back as an SR finding drawn as its box on its key
    slice, with long and short axis, a KOS and no SEG, all valid."""
    source = require_data("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel")
    files = sorted(source.glob("*.dcm"))[:20]
    out = tmp_path / "ct"
    out.mkdir()
    files = [Path(shutil.copy(f, out)) for f in files]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sent = storescu(LOCALHOST, node.scp.port, node.config.ae_title, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    objects = _sent(node, orthanc, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    _check_box_report(objects, uids, tmp_path)


def test_radiograph_detector_boxes_reach_the_pacs_as_sr_findings(
    node: Node, orthanc: Orthanc, tmp_path: Path
) -> None:
    """The real CR chest radiograph, routed by modality to a 2-D detector, comes back with an SR
    finding drawn as its box on the radiograph, a KOS and no SEG, all valid."""
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        missing("pydicom-data's RG1_UNCR.dcm: pip install pydicom-data (the dev extras)")
    radiograph = tmp_path / "cr" / "RG1_UNCR.dcm"
    radiograph.parent.mkdir()
    shutil.copy(str(path), radiograph)
    header = pydicom.dcmread(radiograph, stop_before_pixels=True)
    sent = storescu(LOCALHOST, node.scp.port, node.config.ae_title, [radiograph])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    objects = _sent(node, orthanc, str(header.StudyInstanceUID), str(header.SeriesInstanceUID))
    group = _check_box_report(objects, {str(header.SOPInstanceUID)}, tmp_path)
    assert group.finding_type is not None
