"""Helpers for tests/test_results.py: a minimal series loader and a hand-made inference result.

The loader is deliberately small (single-frame, axial, sorted by Image Position (Patient) z, PS3.3
C.7.6.2) so that the result-encoding tests do not depend on ``reader.volume.load_volume``.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from reader.findings import AlgorithmIdentity, Code, Finding, FindingClass, InferenceResult, Outline
from reader.inference.postprocess import outline_of
from reader.volume import SourceInstance, Volume
from tests.peers import missing

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lung-pet-ct-dx"
CT_DIR = DATA_DIR / "ct-A0001-5mm-lung-kernel"
ANNOTATION_DIR = DATA_DIR / "annotations-A0001"
DCIODVFY = "dciodvfy"

ALGORITHM = AlgorithmIdentity(
    name="lung-lesion-unet",
    version="1.0.0",
    family=Code("123110", "DCM", "Artificial Intelligence"),
    source="dicom-second-reader project",
)
LESION = FindingClass(
    label=1,
    name="Lung lesion",
    category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
    property_type=Code("27925004", "SCT", "Nodule"),
    site=Code("39607008", "SCT", "Lung"),
)


def require(condition: bool, what: str) -> None:
    """Fail when CI is "true", else skip, naming what is missing (never skip silently)."""
    if not condition:
        missing(f"missing: {what}")


def require_ct() -> Path:
    """The shared CT series directory, or fail/skip naming it."""
    require(CT_DIR.is_dir() and len(list(CT_DIR.glob("*.dcm"))) == 64, f"64-slice CT series at {CT_DIR}")
    return CT_DIR


def require_dciodvfy() -> str:
    """Path of dciodvfy (dicom3tools), or fail/skip naming it."""
    path = shutil.which(DCIODVFY) or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)
    require(path is not None, "dciodvfy (dicom3tools) on PATH or at /usr/bin/dciodvfy")
    assert path is not None
    return path


def load_series(directory: Path) -> Volume:
    """Load single-frame axial slices sorted by Image Position (Patient) z into a Volume (HU)."""
    datasets = [(path, pydicom.dcmread(path)) for path in sorted(directory.glob("*.dcm"))]
    datasets.sort(key=lambda item: float(item[1].ImagePositionPatient[2]))
    first = datasets[0][1]
    voxels = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for _, ds in datasets
        ]
    )
    z = [float(ds.ImagePositionPatient[2]) for _, ds in datasets]
    orientation = [float(v) for v in first.ImageOrientationPatient]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    return Volume(
        voxels=voxels,
        spacing_mm=(abs(z[1] - z[0]), row_spacing, column_spacing),
        origin_mm=(
            float(first.ImagePositionPatient[0]),
            float(first.ImagePositionPatient[1]),
            float(first.ImagePositionPatient[2]),
        ),
        row_cosines=(orientation[0], orientation[1], orientation[2]),
        column_cosines=(orientation[3], orientation[4], orientation[5]),
        sources=tuple(
            SourceInstance(
                path=path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID)
            )
            for path, ds in datasets
        ),
        modality=str(first.Modality),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )


@dataclass(frozen=True)
class Box:
    """The radiologist's tumour box: slice indices (inclusive) and pixel bounds (inclusive)."""

    slices: tuple[int, int]
    rows: tuple[int, int]
    columns: tuple[int, int]


def tumour_box(volume: Volume) -> Box:
    """Union of the annotation boxes (PASCAL VOC xml named by SOP Instance UID) over the volume."""
    index = {source.sop_instance_uid: i for i, source in enumerate(volume.sources)}
    hits: list[tuple[int, int, int, int, int]] = []
    for xml_path in ANNOTATION_DIR.glob("*.xml"):
        slice_index = index.get(xml_path.stem)
        if slice_index is None:
            continue
        box = ET.parse(xml_path).getroot().find("object/bndbox")
        assert box is not None
        hits.append(
            (
                slice_index,
                int(box.findtext("xmin", "0")),
                int(box.findtext("ymin", "0")),
                int(box.findtext("xmax", "0")),
                int(box.findtext("ymax", "0")),
            )
        )
    require(bool(hits), f"annotation boxes for this series in {ANNOTATION_DIR}")
    return Box(
        slices=(min(h[0] for h in hits), max(h[0] for h in hits)),
        rows=(min(h[2] for h in hits), max(h[4] for h in hits)),
        columns=(min(h[1] for h in hits), max(h[3] for h in hits)),
    )


SQUARE = Outline(slice_index=3, points=((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)))
"""A one-pixel outline on slice 3, for findings whose drawing does not matter to a test."""


def block_finding(volume: Volume, box: Box, *, number: int = 1, score: float = 0.87) -> Finding:
    """A finding that is the block ``box`` (no model is run), measured as postprocess would."""
    s0, s1 = box.slices
    r0, r1 = box.rows
    c0, c1 = box.columns
    count = (s1 - s0 + 1) * (r1 - r0 + 1) * (c1 - c0 + 1)
    ds, dr, dc = volume.spacing_mm
    extent = np.array([(s1 - s0) * ds, (r1 - r0) * dr, (c1 - c0) * dc])
    centre = volume.voxel_to_patient(((s0 + s1) / 2, (r0 + r1) / 2, (c0 + c1) / 2))
    key = (s0 + s1) // 2
    plane = np.ones((r1 - r0 + 1, c1 - c0 + 1), dtype=bool)
    return Finding(
        number=number,
        finding_class=LESION,
        score=score,
        voxel_count=count,
        volume_mm3=count * ds * dr * dc,
        longest_diameter_mm=float(np.linalg.norm(extent)),
        centroid_mm=centre,
        slice_indices=tuple(range(s0, s1 + 1)),
        outline=Outline(slice_index=key, points=outline_of(plane, (r0, c0))),
    )


def blocks_result(volume: Volume, boxes: list[Box], scores: list[float] | None = None) -> InferenceResult:
    """An InferenceResult whose finding n is the block ``boxes[n - 1]`` (label-map value n)."""
    label_map = np.zeros(volume.voxels.shape, dtype=np.uint8)
    findings = []
    for number, box in enumerate(boxes, start=1):
        s0, s1 = box.slices
        r0, r1 = box.rows
        c0, c1 = box.columns
        label_map[s0 : s1 + 1, r0 : r1 + 1, c0 : c1 + 1] = number
        score = 0.87 if scores is None else scores[number - 1]
        findings.append(block_finding(volume, box, number=number, score=score))
    return InferenceResult(
        algorithm=ALGORITHM,
        finding_classes=(LESION,),
        findings=tuple(findings),
        label_map=label_map,
        provider="CPUExecutionProvider",
    )


def lesion_result(volume: Volume, box: Box, score: float = 0.87) -> InferenceResult:
    """An InferenceResult with one finding: a block filling the tumour box (no model is run)."""
    return blocks_result(volume, [box], [score])


def negative_result(volume: Volume) -> InferenceResult:
    """An InferenceResult without findings (all-zero label map)."""
    return InferenceResult(
        algorithm=ALGORITHM,
        finding_classes=(LESION,),
        findings=(),
        label_map=np.zeros(volume.voxels.shape, dtype=np.uint8),
        provider="CPUExecutionProvider",
    )


def dciodvfy_errors(dciodvfy: str, path: Path) -> list[str]:
    """Run dciodvfy on a file and return its lines that start with "Error"."""
    completed = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def volume() -> Volume:
    """The 64-slice shared CT as a Volume."""
    return load_series(require_ct())


@pytest.fixture(scope="module")
def box(volume: Volume) -> Box:
    """The radiologist's tumour box on that CT."""
    return tumour_box(volume)


@pytest.fixture(scope="module")
def positive(volume: Volume, box: Box) -> InferenceResult:
    """One finding filling the tumour box, score 0.87."""
    return lesion_result(volume, box)


MASS = FindingClass(
    label=2,
    name="Mass",
    category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
    property_type=Code("4147007", "SCT", "Mass"),
    site=None,
)
"""A second finding class (SCT 4147007 Mass), for tests with more than one class."""


def save_strict(dataset: Dataset, path: Path) -> None:
    """Write with the File Meta Information enforced and value validation raising."""
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    try:
        dataset.save_as(path, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode
