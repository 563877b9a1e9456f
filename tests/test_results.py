"""Result encoding (reader.results): SEG + TID 1500 SR on the shared CT, validated by dciodvfy."""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from structlog.testing import capture_logs

from reader.errors import EncodingError
from reader.findings import FindingClass, InferenceResult
from reader.results import ResultObjects, encode_results, result_uid
from reader.results.clean import clean_copied_attributes, prepare_source
from reader.results.sr import AI_NOTICE, NO_FINDINGS
from reader.results.uids import result_uids
from reader.results.wording import MASS as MASS_CODE
from reader.results.wording import NODULE, RAW_SCORE
from reader.volume import Volume
from tests.results_helpers import (
    ALGORITHM,
    Box,
    blocks_result,
    dciodvfy_errors,
    negative_result,
    require_dciodvfy,
    save_strict,
)

# The shared CT's Patient's Name has a single component; highdicom warns about it on every object.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

# ---------------------------------------------------------------- fixtures (real CT, no model)


@pytest.fixture(scope="module")
def encoded(volume: Volume, positive: InferenceResult) -> ResultObjects:
    """SEG + SR of the positive result."""
    return encode_results(volume, positive)


@pytest.fixture(scope="module")
def written(encoded: ResultObjects, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The positive SEG and SR written as DICOM files (PS3.10), with strict value validation."""
    folder = tmp_path_factory.mktemp("results")
    assert encoded.seg is not None
    paths = {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm"}
    save_strict(encoded.seg, paths["seg"])
    save_strict(encoded.sr, paths["sr"])
    return paths



def _source(volume: Volume, index: int = 0) -> Dataset:
    return pydicom.dcmread(volume.sources[index].path, stop_before_pixels=True)


def _uid(volume: Volume, kind: str, version: int = 1) -> str:
    return result_uids(volume.series_instance_uid, ALGORITHM, version)(kind)


# ---------------------------------------------------------------- validity (dciodvfy)


def test_seg_and_sr_pass_dciodvfy(written: dict[str, Path]) -> None:
    """The SEG and the SR of a positive result have zero dciodvfy errors."""
    dciodvfy = require_dciodvfy()
    for name, path in written.items():
        assert dciodvfy_errors(dciodvfy, path) == [], name


def test_source_defect_is_real_and_not_copied(volume: Volume, written: dict[str, Path]) -> None:
    """The source's Referenced Study Sequence lacks a Type 1 UID (dciodvfy error); outputs drop it."""
    dciodvfy = require_dciodvfy()
    source_errors = dciodvfy_errors(dciodvfy, volume.sources[0].path)
    assert any("ReferencedSOPClassUID" in line for line in source_errors)
    assert "ReferencedSOPClassUID" not in _source(volume).ReferencedStudySequence[0]
    for path in written.values():
        assert "ReferencedStudySequence" not in pydicom.dcmread(path)


def test_negative_result_gives_valid_sr_only(volume: Volume, tmp_path: Path) -> None:
    """No findings: no SEG, and an SR with no measurement group that says so, zero dciodvfy errors."""
    dciodvfy = require_dciodvfy()
    objects = encode_results(volume, negative_result(volume))
    assert objects.seg is None
    assert objects.datasets == (objects.sr,)
    path = tmp_path / "sr.dcm"
    save_strict(objects.sr, path)
    assert dciodvfy_errors(dciodvfy, path) == []
    sr = hd.sr.srread(path)
    assert _groups(sr) == []
    texts = _texts(sr)
    assert NO_FINDINGS in texts
    assert AI_NOTICE in texts
    assert sr.StudyInstanceUID == volume.study_instance_uid


# ---------------------------------------------------------------- read back


def test_seg_reads_back_with_the_box(
    volume: Volume, box: Box, encoded: ResultObjects, written: dict[str, Path]
) -> None:
    """segread finds one AUTOMATIC segment, named in words, whose frames cover exactly the box."""
    seg = hd.seg.segread(written["seg"])
    assert seg.segment_numbers == [1]
    description = seg.get_segment_description(1)
    assert description.segment_label.startswith("Finding 1: mass ")
    assert description.segmented_property_type == codes.SCT.Mass
    assert description.tracking_id == "Finding 1"
    assert description.tracking_uid == _uid(volume, "finding-1")

    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert description.algorithm_identification is not None
    assert description.algorithm_identification[0].AlgorithmName == ALGORITHM.name
    assert seg.NumberOfFrames == box.slices[1] - box.slices[0] + 1  # empty frames omitted
    assert seg.SeriesNumber == 9901
    assert seg.SeriesDescription == "AI second reader SEG - for review, not for diagnosis"
    assert "not for diagnosis" in seg.ContentDescription
    assert seg.ContentLabel == "AI_FINDINGS"
    assert seg.Manufacturer == ALGORITHM.source
    assert "DERIVED" in seg.ImageType
    middle = (box.slices[0] + box.slices[1]) // 2
    mask = seg.get_pixels_by_source_instance(
        [volume.sources[middle].sop_instance_uid], segment_numbers=[1], combine_segments=True
    )[0]
    expected = np.zeros(mask.shape, dtype=bool)
    expected[box.rows[0] : box.rows[1] + 1, box.columns[0] : box.columns[1] + 1] = True
    assert np.array_equal(mask.astype(bool), expected)


def test_sr_reads_back_with_one_group(
    volume: Volume, positive: InferenceResult, written: dict[str, Path]
) -> None:
    """srread gives one TID 1411 group with tracking UID, rounded measurements, the raw score named as
    such, a reference to SEG segment 1, and the outline on its key slice and its centre."""
    seg = pydicom.dcmread(written["seg"], stop_before_pixels=True)
    sr = hd.sr.srread(written["sr"])
    groups = _groups(sr)
    assert len(groups) == 1
    group = groups[0]
    finding = positive.findings[0]
    assert group.tracking_identifier == "Finding 1"
    assert group.tracking_uid == _uid(volume, "finding-1")
    assert finding.longest_diameter_mm > 30.0
    assert group.finding_type == codes.SCT.Mass
    values = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
    assert values[codes.SCT.Volume.value][1] == "mm3"
    assert finding.volume_mm3 is not None
    assert values[codes.SCT.Volume.value][0] == round(finding.volume_mm3)
    assert values[codes.SCT.LongAxis.value][0] == round(finding.longest_diameter_mm, 1)
    assert values[RAW_SCORE.value] == (87.0, "%")
    assert codes.DCM.CertaintyOfFinding.value not in values
    region, centre = _coordinates(group)
    assert region.GraphicType == "POLYLINE"
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    assert tuple(points[0]) == tuple(points[-1])
    assert tuple(map(tuple, points)) == finding.outline.points
    source = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == volume.sources[finding.outline.slice_index].sop_instance_uid
    assert centre.GraphicType == "POINT"
    assert np.allclose(np.asarray(centre.GraphicData, dtype=float), finding.centroid_mm, atol=1e-3)
    assert centre.ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1, "an Image Library (TID 1600) with the key slice"
    entries = [e for g in library[0].ContentSequence for e in g.get("ContentSequence", [])
               if e.ValueType == "IMAGE"]
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        source.ReferencedSOPInstanceUID]
    item, series = _segment_reference(group)
    assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert item.ReferencedSegmentNumber == 1
    assert series == volume.series_instance_uid
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesNumber == 9902
    assert sr.SeriesDescription == "AI second reader SR - for review, not for diagnosis"
    texts = _texts(sr)
    assert AI_NOTICE in texts and "not for diagnosis" in AI_NOTICE
    assert any(t.startswith("Read series") and volume.series_instance_uid in t for t in texts)
    assert any("not calibrated" in t for t in texts)


def test_objects_join_the_source_study(volume: Volume, written: dict[str, Path]) -> None:
    """SEG and SR carry the source's StudyInstanceUID and PatientID and the algorithm as Manufacturer."""
    source = _source(volume)
    for path in written.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.Manufacturer == ALGORITHM.source
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


# ---------------------------------------------------------------- identity and determinism


def test_uids_are_deterministic_per_result_version(
    volume: Volume, positive: InferenceResult, encoded: ResultObjects
) -> None:
    """Encoding again gives identical UIDs; another result_version gives different ones."""
    again = encode_results(volume, positive)
    other = encode_results(volume, positive, result_version=2)
    assert encoded.seg is not None and again.seg is not None and other.seg is not None
    for a, b, c in ((encoded.seg, again.seg, other.seg), (encoded.sr, again.sr, other.sr)):
        assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
        assert a.SeriesInstanceUID != c.SeriesInstanceUID
        assert a.SOPInstanceUID != c.SOPInstanceUID
    assert encoded.seg.SOPInstanceUID == _uid(volume, "seg-instance")
    assert encoded.sr.SeriesInstanceUID == _uid(volume, "sr-series")


def test_result_uid_is_a_stable_2_25_uid() -> None:
    """result_uid is a valid "2.25." UID, equal for equal inputs, different when any input differs."""
    base = ("1.2.3", "model", "1.0", 1, "seg-series")
    uid = result_uid(*base)
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert result_uid(*base) == uid
    variants = [("1.2.4", *base[1:]), ("1.2.3", "model", "1.1", 1, "seg-series"), (*base[:4], "sr-series")]
    assert all(result_uid(*variant) != uid for variant in variants)
    assert result_uid("1.2", "model", "3", 1, "k") != result_uid("1.2", "model3", "", 1, "k")
    with pytest.raises(ValueError, match="result_version"):
        result_uid("1.2.3", "model", "1.0", 0, "seg-series")


# ---------------------------------------------------------------- segments and classes


def test_each_finding_is_its_own_segment_with_the_same_tracking_identity(volume: Volume, box: Box) -> None:
    """Two findings become SEG segments 1 and 2; each SR group references its own segment and
    carries the same Tracking Identifier and UID as that segment; a small one is a nodule."""
    s0 = box.slices[0]
    small = Box(slices=(s0, s0 + 1), rows=(40, 49), columns=(40, 49))
    result = blocks_result(volume, [box, small], [0.9, 0.6])
    objects = encode_results(volume, result)
    assert objects.seg is not None
    segments = {d.SegmentNumber: d for d in objects.seg.SegmentSequence}
    assert sorted(segments) == [1, 2]
    groups = _groups(objects.sr)
    assert len(groups) == len(segments)
    for group in groups:
        number = _segment_reference(group)[0].ReferencedSegmentNumber
        segment = segments[number]
        assert group.tracking_identifier == f"Finding {number}" == segment.TrackingID
        assert group.tracking_uid == segment.TrackingUID
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.value
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == MASS_CODE.value


def replace_result(
    base: InferenceResult,
    classes: tuple[FindingClass, ...],
    findings: tuple[object, ...],
    label_map: np.ndarray,
) -> InferenceResult:
    """InferenceResult is eq=False and frozen: build a new one from parts."""
    return InferenceResult(
        algorithm=base.algorithm,
        finding_classes=classes,
        findings=findings,  # type: ignore[arg-type]
        label_map=label_map,
        provider=base.provider,
    )


def test_label_without_finding_is_an_encoding_error(volume: Volume, positive: InferenceResult) -> None:
    """Voxels of a label that no finding reports make encoding fail instead of silently vanishing."""
    assert positive.label_map is not None
    label_map = positive.label_map.copy()
    label_map[0, 0:4, 0:4] = 7
    result = replace_result(positive, positive.finding_classes, positive.findings, label_map)
    with pytest.raises(EncodingError, match=r"\[7\]"):
        encode_results(volume, result)


# ---------------------------------------------------------------- cleaning (no data needed)


@pytest.mark.filterwarnings("ignore:The value length:UserWarning", "ignore:Invalid value for VR:UserWarning")
def test_clean_fixes_only_copied_defects() -> None:
    """Broken references and invalid Type 3 values are removed, Type 2 emptied, identity kept."""
    source = Dataset()
    source.PatientID = "X" * 70  # LO > 64: invalid but identity
    source.PatientBirthDate = "19xx0101"  # invalid DA, Type 2
    source.EthnicGroup = "Y" * 20  # SH > 16, Type 3
    source.StudyDescription = "Chest"  # valid
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3"
    source.ReferencedStudySequence = [ref]
    derived = Dataset()
    for element in source:
        derived.add(element)
    derived.SeriesDescription = "ours"
    with capture_logs() as logs:
        repairs = clean_copied_attributes(derived, source)
    actions = {r.attribute: r.action for r in repairs}
    assert actions == {
        "PatientID": "kept-invalid",
        "PatientBirthDate": "emptied",
        "EthnicGroup": "removed",
        "ReferencedStudySequence": "removed",
    }
    assert derived.PatientID == "X" * 70
    assert derived.PatientBirthDate in (None, "")
    assert "EthnicGroup" not in derived and "ReferencedStudySequence" not in derived
    assert derived.StudyDescription == "Chest" and derived.SeriesDescription == "ours"
    assert all("X" * 70 not in str(event) for event in logs)


def test_missing_or_malformed_type2_source_attributes_are_prepared() -> None:
    """Absent Type 2 patient/study attributes are added empty and malformed dates emptied, so that
    highdicom can copy them (it fails, quoting the value, otherwise)."""
    source = Dataset()
    source.PatientName = "Doe^Jane"
    source.StudyDate = "2020-01-02"  # not a DA
    prepared = prepare_source(source)
    assert prepared.PatientBirthDate == "" and prepared.PatientSex == "" and prepared.StudyDate == ""
    assert prepared.PatientName == "Doe^Jane"


def test_logs_carry_no_patient_identity(volume: Volume, positive: InferenceResult) -> None:
    """Encoding logs timing and counts but never the patient's name or ID."""
    source = _source(volume)
    with capture_logs() as logs:
        encode_results(volume, positive)
    assert any(event["event"] == "results.encoded" for event in logs)
    text = repr(logs)
    assert str(source.PatientID) not in text
    assert str(source.PatientName) not in text


def test_encoding_is_quick(volume: Volume, positive: InferenceResult) -> None:
    """Encoding SEG + SR for 64 slices stays well under a few seconds (measured ~0.7 s here)."""
    started = time.perf_counter()
    encode_results(volume, positive)
    assert time.perf_counter() - started < 5.0


def _groups(sr: Dataset) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The TID 1411 groups of an SR (written or read back)."""
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    return list(report.get_volumetric_roi_measurement_groups())


def _segment_reference(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> tuple[Dataset, str]:
    """The Referenced SOP item (SEG instance + segment number) and the source series UID of a group."""
    reference = group.referenced_segment
    assert reference is not None
    return reference[0].ReferencedSOPSequence[0], str(reference[1].UID)


def _coordinates(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> tuple[Dataset, Dataset]:
    """The group's Image Region (SCOORD) and Center (SCOORD3D) content items."""
    items = group[0].ContentSequence
    region = next(i for i in items if i.ValueType == "SCOORD")
    centre = next(i for i in items if i.ValueType == "SCOORD3D")
    assert region.ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region
    assert centre.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Center.value
    return region, centre


def _texts(sr: Dataset) -> list[str]:
    """All TEXT values anywhere in an SR content tree."""
    found: list[str] = []

    def walk(items: Dataset) -> None:
        for item in items.get("ContentSequence", []):
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item)

    walk(sr)
    return found
