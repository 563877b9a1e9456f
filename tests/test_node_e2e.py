"""End to end on real peers: storescu -> reader serve -> Orthanc, validated by dciodvfy and highdicom.

Data: patient Lung_Dx-A0001 of the TCIA collection Lung-PET-CT-Dx (CC BY 4.0): Li, P., Wang, S.,
Li, T., Lu, J., HuangFu, Y., & Wang, D. (2020). A Large-Scale CT and PET/CT Dataset for Lung Cancer
Diagnosis [Data set]. The Cancer Imaging Archive. https://doi.org/10.7937/TCIA.2020.NNC20461
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information
import numpy as np
import pydicom
import pytest

from reader.notify import verify_signature
from tests.node_process import ReaderNode
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
from tests.viewers import (
    OhifServer,
    OhifViewer,
    artifacts,
    dcmqi_measurements,
    dcmqi_segments,
    dicomweb_config,
    ohif_dist,
    store_with_storescu,
)
from tests.worklist_peers import Listener, Receiver

pytestmark = pytest.mark.integration

FAST = """
[completion]
grace_seconds = 1
idle_timeout_seconds = 30
[sending]
retry_initial_seconds = 1
retry_max_seconds = 5
"""
RESULT_DEADLINE_S = 600.0
ACCESSION = "ACC-A0001-2"
WEBHOOK_SECRET = b"e2e-webhook-secret-0123456789"  # inference on 2 busy CPU cores, plus encoding and sending


def _study_series(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    answer = orthanc.rest_post("/tools/find", {"Level": "Series", "Expand": True,
                                               "Query": {"StudyInstanceUID": study_uid}})
    assert isinstance(answer, list)
    return answer


def _results(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for series in _study_series(orthanc, study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SR", "SEG", "KO"):
            for instance in series["Instances"]:
                out.setdefault(modality, []).append(pydicom.dcmread(io.BytesIO(orthanc.download(instance))))
    return out


def _delivered(node: ReaderNode) -> bool:
    """True once the node logged the C-STORE of its results (SEG, SR, KOS on one association)."""
    if node.process.poll() is not None:
        raise AssertionError(f"reader serve died:\n{node.log_tail()}")
    return any("instances" in e for e in node.events("result.sent"))


def _tumour_boxes(annotations: Path) -> dict[str, tuple[int, int, int, int]]:
    """Radiologist boxes by SOP Instance UID: (xmin, ymin, xmax, ymax) in pixels."""
    boxes = {}
    for xml in annotations.glob("*.xml"):
        box = ET.parse(xml).getroot().find("object/bndbox")
        assert box is not None
        boxes[xml.stem] = tuple(int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax"))
    return boxes  # type: ignore[return-value]


def _check_results(orthanc: Orthanc, tmp_path: Path,
                   source: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    results = _results(orthanc, source.StudyInstanceUID)
    assert len(results.get("SR", [])) == 1, "exactly one SR per processed series"
    for modality, datasets in results.items():
        for ds in datasets:
            path = tmp_path / f"{modality}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert dciodvfy(path) == [], f"{modality} fails dciodvfy"
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.PatientID == source.PatientID
    sr = hd.sr.srread(io.BytesIO(_bytes(results["SR"][0])))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    if "SEG" in results:
        seg = hd.seg.segread(io.BytesIO(_bytes(results["SEG"][0])))
        assert seg.SegmentSequence
    return results


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check_in_viewers(orthanc: Orthanc, seg: pydicom.Dataset, sr: pydicom.Dataset, tmp_path: Path) -> None:
    """OHIF lists every segment by label and draws the SR's findings with their measurements; dcmqi
    reads the SEG's segments and the SR's groups with the measurements as encoded."""
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert [s.label for s in dcmqi_segments(seg_path, tmp_path / "dcmqi-seg")] == labels
    groups = dcmqi_measurements(sr_path, tmp_path / "dcmqi-sr")
    assert len(groups) == len(labels)
    assert all({"Volume", "Long axis"} <= {m.quantity for m in g.measurements} for g in groups)
    with OhifServer(ohif_dist(), orthanc) as server, OhifViewer(server, artifacts("e2e")) as viewer:
        shown = viewer.open_study(str(seg.StudyInstanceUID))
        assert shown.segment_labels == labels and shown.console_errors == [], shown
        # OHIF 3.13 draws a finding whose outline is a polygon read-only in the SR viewport, with
        # the SR's own measurements beside it (its measurement panel lists only outlines it can turn
        # into its own tools, such as rectangles): the first finding is drawn on its key image.
        drawn = viewer.open_sr(str(sr.StudyInstanceUID), expected=len(labels))
        assert drawn.drawn_annotations, drawn
        texts = " ".join(drawn.drawn_texts)
        assert "Long axis" in texts and "Volume" in texts and "Probability of a true lesion" in texts, drawn
        assert drawn.dropped_annotations == [] and drawn.console_errors == [], drawn


def _check_groups_and_segments(seg: pydicom.Dataset, sr: pydicom.Dataset, series_dir: Path) -> None:
    """One SR measurement group per SEG segment: group n references segment n with the same tracking
    UID, an outline (SCOORD) on an image of the series read, and a centre (SCOORD3D)."""
    images = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in series_dir.glob("*.dcm")}
    groups = [g for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010"
              for g in c.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "125007"]
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert len(groups) == len(segments) >= 1
    for group in groups:
        items = group.ContentSequence
        reference = next(i for i in items if i.ValueType == "IMAGE").ReferencedSOPSequence[0]
        segment = segments[int(reference.ReferencedSegmentNumber)]
        tracking = next(i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112040").UID
        assert tracking == segment.TrackingUID
        outline = next(i for i in items if i.ValueType == "SCOORD")
        assert outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in images
        assert any(i.ValueType == "SCOORD3D" for i in items)
    assert sorted(segments) == list(range(1, len(groups) + 1))


def _overlaps_tumour(seg_ds: pydicom.Dataset, boxes: dict[str, tuple[int, int, int, int]],
                     segment: int | None = None) -> bool:
    seg = hd.seg.segread(io.BytesIO(_bytes(seg_ds)))
    for sop_uid, (x0, y0, x1, y1) in boxes.items():
        try:
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[sop_uid], combine_segments=True, skip_overlap_checks=True,
                segment_numbers=None if segment is None else [segment])
        except (KeyError, ValueError):
            continue  # no segment on that slice
        if np.any(np.asarray(mask)[0, y0:y1 + 1, x0:x1 + 1]):
            return True
    return False


def test_modality_push_returns_one_result_per_study_to_the_pacs(orthanc_factory: Any, tmp_path: Path) -> None:
    """storescu of both reconstructions of the real CT on one association to a running node puts
    exactly one SR, one SEG and one KOS into Orthanc, in the source study, read from the lung kernel,
    with zero dciodvfy errors: one SEG segment per SR group, each group referencing its own segment,
    its outline on a source image and its centre, and the tumour's segment overlapping the
    radiologist's boxes. OHIF (over Orthanc's DICOMweb, in headless Chromium) lists those segments
    and draws the findings with their measurements; dcmqi reads both objects back."""
    require_tool("storescu")
    orthanc = orthanc_factory(extra_config=dicomweb_config())
    require_tool("dciodvfy")
    series_dir = require_data("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel")
    standard_dir = require_data("lung-pet-ct-dx/ct-A0001-5mm-standard-kernel")
    boxes = _tumour_boxes(require_data("lung-pet-ct-dx/annotations-A0001"))
    source = pydicom.dcmread(sorted(series_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    node = ReaderNode(tmp_path / "node", destinations=[f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"],
                      config_text=FAST)
    try:
        sent = storescu(node.host, node.port, node.ae_title, [series_dir, standard_dir])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: _delivered(node), RESULT_DEADLINE_S, "the node's results sent to Orthanc")
        results = _check_results(orthanc, tmp_path, source)
        assert "SEG" in results, "the model found nothing in a CT with a known adenocarcinoma"
        assert len(results["SEG"]) == 1, "exactly one SEG for the study"
        assert len(results.get("KO", [])) == 1, "a flagged study gets exactly one KOS"
        seg, sr = results["SEG"][0], results["SR"][0]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        _check_groups_and_segments(seg, sr, series_dir)
        tumour = [n for n in range(1, len(seg.SegmentSequence) + 1) if _overlaps_tumour(seg, boxes, n)]
        assert tumour, "no SEG segment overlaps the radiologist's box"
        store_with_storescu(orthanc, sorted(series_dir.glob("*.dcm")))  # the PACS holds the images read
        _check_in_viewers(orthanc, seg, sr, tmp_path)
        completes = node.events("series.complete")
        assert sorted(e["instances"] for e in completes) == [64, 64]
        skipped = [e for e in node.events("series.skipped") if e.get("chosen_series_uid")]
        assert [e["chosen_series_uid"] for e in skipped] == [source.SeriesInstanceUID]
        log_text = node.log_path.read_text()
        for phi in (str(source.PatientName), str(source.PatientID)):
            assert phi not in log_text, "patient identity leaked into the log"
    finally:
        assert node.stop() == 0, node.log_tail()
    status = subprocess.run([sys.executable, "-m", "reader.cli", "status", "--json", "--data-dir",
                             str(node.data_dir)], capture_output=True, text=True, check=True)
    assert '"done": 1' in status.stdout


def test_pacs_routing_returns_results_and_flags_the_worklist(
    orthanc_factory: Any, listener: Callable[..., Listener], receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A study stored in Orthanc and routed by Orthanc itself (REST /modalities/{id}/store) comes back
    with SR, SEG and KOS in the same study (zero dciodvfy errors); the RIS's MLLP listener receives and
    ACKs an ORU^R01 with the accession number and the flag, and the webhook receives a signed event."""
    require_tool("dciodvfy")
    series_dir = require_data("lung-pet-ct-dx/ct-A0001-5mm-standard-kernel")
    files = []
    for f in sorted(series_dir.glob("*.dcm")):  # the sample has no accession number: give it one
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = ACCESSION
        files.append(tmp_path / "ct" / f.name)
        files[-1].parent.mkdir(exist_ok=True)
        ds.save_as(files[-1], enforce_file_format=True)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    ris = listener(ack="AA")
    monkeypatch.setenv("READER_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
    worklist = (f'[hl7]\nsending_facility = "TESTHOSP"\n[[hl7.endpoints]]\nhost = "{LOCALHOST}"\n'
                f'port = {ris.port}\nreceiving_application = "RIS"\n'
                f'[[webhooks]]\nurl = "{receiver.url()}"\nsecret_env = "READER_TEST_WEBHOOK_SECRET"\n')
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"reader": ("SECONDREADER", "127.0.0.1", node_port)})
    for f in files:
        orthanc.upload(f)
    node = ReaderNode(tmp_path / "node", port=node_port,
                      destinations=[f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"],
                      config_text=FAST + worklist)
    try:
        studies = orthanc.studies()
        assert len(studies) == 1
        orthanc.store_to_modality("reader", studies)
        wait_until(lambda: _delivered(node), RESULT_DEADLINE_S,
                   "the node's results sent to Orthanc after Orthanc routed the study")
        results = _check_results(orthanc, tmp_path, source)
        assert orthanc.studies() == studies, "results must join the source study, not make a new one"
        assert "SEG" in results and len(results.get("KO", [])) == 1
        wait_until(lambda: len(ris.messages()) == 1 and len(receiver.received) == 1, 60.0,
                   "the ORU^R01 at the MLLP listener and the event at the webhook")
        message = hl7.parse(ris.messages()[0].replace("\n", "\r"))
        assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        assert str(message.segment("OBR")[3]) == ACCESSION
        assert "flagged" in ris.messages()[0].lower()
        event = receiver.received[0]
        assert verify_signature(WEBHOOK_SECRET, event.body, event.headers)
        body = json.loads(event.body)
        assert body["study"]["accession_number"] == ACCESSION
        assert body["flag"]["state"] == "flagged"
        assert {r["kind"] for r in body["results"]} == {"SR", "SEG", "KOS"}
        sent = node.events("result.sent")
        assert any(e.get("acks") == ["AA"] for e in sent), "the RIS's ACK must be read"
    finally:
        assert node.stop() == 0, node.log_tail()
