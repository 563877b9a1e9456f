"""Our SEG and TID 1500 SR open in the viewers radiologists use: OHIF 3 and 3D Slicer's dcmqi.

The objects are encoded from the shared CT (lung-kernel series) with one finding filling the
radiologist's tumour box (tests/results_helpers.py), sent with the CT to a real Orthanc with its
DICOMweb plugin over DICOM (storescu), and opened in OHIF in headless Chromium (tests/viewers.py);
dcmqi reads the same files. Screenshots and the browser console go to ``test-artifacts/viewers``
(``VIEWER_ARTIFACTS`` overrides it).

Shared CT: Li, P., Wang, S., Li, T., Lu, J., HuangFu, Y., & Wang, D. (2020). A Large-Scale CT and
PET/CT Dataset for Lung Cancer Diagnosis [Data set]. The Cancer Imaging Archive.
https://doi.org/10.7937/TCIA.2020.NNC20461 (CC BY 4.0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from reader.findings import InferenceResult
from reader.results import encode_results
from reader.results.wording import length_mm, volume_mm3
from reader.volume import Volume
from tests.peers import Orthanc
from tests.results_helpers import Box, blocks_result
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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.viewers,
    # The shared CT's Patient's Name has a single component; highdicom warns about it on every object.
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning"),
]

MEASUREMENT_GROUP = "125007"  # DCM "Measurement Group" (TID 1501 / 1411)
IMAGING_MEASUREMENTS = "126010"  # DCM "Imaging Measurements" (TID 1500 row 6)
FINDING = "121071"  # DCM "Finding"
TRACKING_UID = "112040"  # DCM "Tracking Unique Identifier"


@dataclass(frozen=True)
class Published:
    """The encoded objects, their files, and the study they joined."""

    study_uid: str
    seg: Dataset
    sr: Dataset
    seg_path: Path
    sr_path: Path


def _concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The SR's measurement groups (TID 1500 > Imaging Measurements > Measurement Group)."""
    return [
        group
        for container in sr.ContentSequence
        if _concept(container) == IMAGING_MEASUREMENTS
        for group in container.ContentSequence
        if _concept(group) == MEASUREMENT_GROUP
    ]


def _child(group: Dataset, concept: str) -> Dataset:
    return next(item for item in group.ContentSequence if _concept(item) == concept)


def key_image(group: Dataset) -> str | None:
    """SOP Instance UID of the image the group's first SCOORD is drawn on (None without a SCOORD)."""
    for item in group.ContentSequence:
        if item.ValueType == "SCOORD":
            return str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


@pytest.fixture(scope="module")
def positive(volume: Volume, box: Box) -> InferenceResult:
    """Two findings: the tumour box, and a small block on another slice."""
    middle = (box.slices[0] + box.slices[1]) // 2
    small = Box(slices=(middle + 8, middle + 9), rows=(240, 252), columns=(140, 152))
    return blocks_result(volume, [box, small], [0.9, 0.7])


@pytest.fixture(scope="module")
def published(
    volume: Volume, positive: InferenceResult, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    """SEG + SR of the two findings, written to files."""
    encoded = encode_results(volume, positive)
    assert encoded.seg is not None
    folder = tmp_path_factory.mktemp("objects")
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    encoded.seg.save_as(seg_path, enforce_file_format=True)
    encoded.sr.save_as(sr_path, enforce_file_format=True)
    return Published(volume.study_instance_uid, encoded.seg, encoded.sr, seg_path, sr_path)


@pytest.fixture(scope="module")
def pacs(volume: Volume, published: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb holding the CT series, the SEG and the SR (sent over DICOM)."""
    config = dicomweb_config()
    orthanc = Orthanc.start(tmp_path_factory.mktemp("orthanc"), extra_config=config)
    try:
        store_with_storescu(
            orthanc, [*(s.path for s in volume.sources), published.seg_path, published.sr_path]
        )
        yield orthanc
    finally:
        orthanc.kill()


@pytest.fixture(scope="module")
def viewer(pacs: Orthanc) -> Iterator[OhifViewer]:
    """OHIF over that Orthanc, in one headless Chromium for the module."""
    with OhifServer(ohif_dist(), pacs) as server, OhifViewer(server, artifacts("ohif")) as ohif:
        yield ohif


# ---------------------------------------------------------------- OHIF 3


def test_ohif_overlays_the_seg_and_lists_each_segment_by_label(
    viewer: OhifViewer, published: Published
) -> None:
    """OHIF loads our SEG as an overlay and its segmentation panel lists every segment by its label."""
    report = viewer.open_study(published.study_uid)
    expected = [str(segment.SegmentLabel) for segment in published.seg.SegmentSequence]
    assert report.segment_labels == expected, report
    assert report.console_errors == [], report.console_errors
    assert all(path.is_file() for path in report.screenshots)


def test_ohif_draws_each_sr_finding_with_its_measurements(
    viewer: OhifViewer, published: Published, volume: Volume
) -> None:
    """OHIF draws every SR measurement group on its key image and lists each in its measurement panel."""
    groups = measurement_groups(published.sr)
    assert len(groups) == len(published.seg.SegmentSequence), "one SR measurement group per SEG segment"
    report = viewer.open_sr(published.study_uid, expected=len(groups))
    keys = [key_image(group) for group in groups]
    assert None not in keys, (
        f"measurement groups without a SCOORD on a key image; OHIF said: "
        f"{report.dropped_annotations + report.console_errors}"
    )
    assert report.dropped_annotations == [], report.dropped_annotations
    # Clicking a panel row makes OHIF jump to that measurement's image, whose overlay starts with
    # "I:<Instance Number>"; Cornerstone draws an annotation only while its image is on screen.
    numbers = {s.sop_instance_uid: s.path for s in volume.sources}
    expected_images = sorted(
        f"I:{pydicom.dcmread(numbers[str(key)], stop_before_pixels=True).InstanceNumber}" for key in keys
    )
    assert sorted(view.image_index.split(" ")[0] for view in report.row_views) == expected_images, report
    assert all(view.annotations >= 1 for view in report.row_views), report.row_views
    findings = sorted(str(_child(g, FINDING).ConceptCodeSequence[0].CodeMeaning) for g in groups)
    assert sorted(report.measurement_labels) == findings, report
    assert len(report.measurement_details) == len(groups) and all(report.measurement_details), report
    assert report.console_errors == [], report.console_errors


# ---------------------------------------------------------------- dcmqi (3D Slicer)


def test_dcmqi_reads_each_seg_segment(published: Published, tmp_path: Path) -> None:
    """dcmqi's segimage2itkimage exports every SEG segment with its label and codes."""
    segments = dcmqi_segments(published.seg_path, tmp_path / "seg")
    expected = [
        (int(s.SegmentNumber), str(s.SegmentLabel), str(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning))
        for s in published.seg.SegmentSequence
    ]
    assert [(s.number, s.label, s.property_type) for s in segments] == expected
    assert all(s.image is not None and s.image.stat().st_size > 0 for s in segments)


def test_dcmqi_reads_each_sr_measurement_group(
    published: Published, positive: InferenceResult, tmp_path: Path
) -> None:
    """dcmqi's tid1500reader reads one group per SEG segment, each with its segment and measurements."""
    groups = dcmqi_measurements(published.sr_path, tmp_path / "sr")
    numbers = {int(s.SegmentNumber) for s in published.seg.SegmentSequence}
    assert len(groups) == len(numbers) == len(positive.findings)
    tracking = [str(_child(g, TRACKING_UID).UID) for g in measurement_groups(published.sr)]
    assert [g.tracking_uid for g in groups] == tracking
    for group, finding in zip(groups, positive.findings, strict=True):
        assert group.referenced_segment in numbers
        assert group.source_series == published.seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        values = {m.quantity: m.value for m in group.measurements}
        assert finding.volume_mm3 is not None
        assert values["Volume"] == volume_mm3(finding.volume_mm3)
        assert values["Long axis"] == length_mm(finding.longest_diameter_mm)
