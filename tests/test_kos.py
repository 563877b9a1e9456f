"""Key Object Selection of a flagged study (reader.results.kos) on the shared CT, checked by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from structlog.testing import capture_logs

from reader.errors import EncodingError
from reader.findings import InferenceResult
from reader.flag import FlagDecision, FlagRule, FlagState, decide
from reader.results import ResultObjects, encode_results, result_uid
from reader.results.kos import KOS_SERIES_DESCRIPTION, KOS_SERIES_NUMBER, encode_kos
from reader.volume import Volume
from tests.results_helpers import (
    ALGORITHM,
    Box,
    dciodvfy_errors,
    require_dciodvfy,
    save_strict,
)

# The shared CT's Patient's Name has a single component; highdicom warns about it on every object.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

RULE = FlagRule(min_score=0.5)


@pytest.fixture(scope="module")
def objects(volume: Volume, positive: InferenceResult) -> ResultObjects:
    """SEG + SR of the positive result."""
    return encode_results(volume, positive)


@pytest.fixture(scope="module")
def kos(volume: Volume, positive: InferenceResult, objects: ResultObjects) -> Dataset:
    """The KOS of the flagged positive result."""
    return encode_kos(
        volume, positive, seg=objects.seg, sr=objects.sr, result_version=1,
        decision=decide(RULE, positive.findings),
    )


@pytest.fixture(scope="module")
def written(kos: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The KOS as a DICOM file (PS3.10), written with value validation raising."""
    path = tmp_path_factory.mktemp("kos") / "kos.dcm"
    save_strict(kos, path)
    return path


def test_kos_passes_dciodvfy(written: Path) -> None:
    """The KOS has zero dciodvfy errors (the source's broken Referenced Study Sequence is not copied)."""
    dciodvfy = require_dciodvfy()
    assert dciodvfy_errors(dciodvfy, written) == []
    assert "ReferencedStudySequence" not in pydicom.dcmread(written)


def test_kos_reads_back_with_key_images_sr_and_seg(
    volume: Volume, box: Box, objects: ResultObjects, written: Path
) -> None:
    """highdicom reads the KOS: title For Physician Review, one key image per finding (its key slice),
    the SEG and the SR, and a description naming the finding in words."""
    assert objects.seg is not None
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(written))
    title = document.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "128201",
        "DCM",
        "For Physician Review",
    )
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
        for item in document.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    key = (box.slices[0] + box.slices[1]) // 2
    slices = [volume.sources[key].sop_instance_uid]
    expected = {uid: "IMAGE" for uid in slices}
    expected[str(objects.seg.SOPInstanceUID)] = "IMAGE"
    expected[str(objects.sr.SOPInstanceUID)] = "COMPOSITE"
    assert referenced == expected
    for uid in (*slices, objects.sr.SOPInstanceUID):
        assert document.resolve_reference(str(uid))[0] == volume.study_instance_uid
    descriptions = [
        str(item.TextValue)
        for item in document.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert len(descriptions) == 1
    assert "Finding 1: mass " in descriptions[0] and "not for diagnosis" in descriptions[0]


def test_kos_series_identity(volume: Volume, written: Path) -> None:
    """Series 9903 with its description, deterministic UIDs, the source study and patient."""
    ds = pydicom.dcmread(written)
    source = pydicom.dcmread(volume.sources[0].path, stop_before_pixels=True)
    assert ds.Modality == "KO"
    assert ds.SeriesNumber == KOS_SERIES_NUMBER
    assert ds.SeriesDescription == KOS_SERIES_DESCRIPTION
    assert KOS_SERIES_DESCRIPTION == "AI second reader KOS - flagged for review, not for diagnosis"
    series = volume.series_instance_uid
    assert ds.SeriesInstanceUID == result_uid(series, ALGORITHM.name, ALGORITHM.version, 1, "kos-series")
    assert ds.SOPInstanceUID == result_uid(series, ALGORITHM.name, ALGORITHM.version, 1, "kos-instance")
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID
    assert ds.Manufacturer == ALGORITHM.source


def test_new_result_version_gives_new_uids(
    volume: Volume, positive: InferenceResult, objects: ResultObjects, kos: Dataset
) -> None:
    """The same result version gives the same UIDs again; version 2 gives other ones."""
    decision = decide(RULE, positive.findings)
    again = encode_kos(volume, positive, seg=objects.seg, sr=objects.sr, result_version=1, decision=decision)
    other = encode_kos(volume, positive, seg=objects.seg, sr=objects.sr, result_version=2, decision=decision)
    assert again.SOPInstanceUID == kos.SOPInstanceUID
    assert other.SOPInstanceUID != kos.SOPInstanceUID
    assert other.SeriesInstanceUID != kos.SeriesInstanceUID


def test_no_kos_for_unflagged_or_inconsistent(
    volume: Volume, positive: InferenceResult, objects: ResultObjects
) -> None:
    """An unflagged decision, a missing SEG or an unknown triggering finding is an EncodingError."""
    unflagged = decide(FlagRule(min_score=0.99), positive.findings)
    assert unflagged.state is FlagState.REVIEWED_NO_FLAG
    flagged = decide(RULE, positive.findings)
    unknown = FlagDecision(FlagState.FLAGGED, "rule", (7,))
    cases = [(unflagged, objects.seg, "only made for a flagged"), (flagged, None, "SEG is required"),
             (unknown, objects.seg, r"lacks: \[7\]")]
    for decision, seg, message in cases:
        with pytest.raises(EncodingError, match=message):
            encode_kos(volume, positive, seg=seg, sr=objects.sr, result_version=1, decision=decision)


def test_kos_logs_carry_no_patient_identity(
    volume: Volume, positive: InferenceResult, objects: ResultObjects
) -> None:
    """Encoding the KOS logs counts and timing, never the patient's name or ID."""
    source = pydicom.dcmread(volume.sources[0].path, stop_before_pixels=True)
    with capture_logs() as logs:
        encode_kos(volume, positive, seg=objects.seg, sr=objects.sr, result_version=1,
                   decision=decide(RULE, positive.findings))
    assert any(event["event"] == "results.kos_encoded" for event in logs)
    assert str(source.PatientID) not in repr(logs)
    assert str(source.PatientName) not in repr(logs)
