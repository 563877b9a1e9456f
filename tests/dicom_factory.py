"""Small synthetic DICOM datasets for tests: CT/MR series, a CR radiograph, Enhanced CT/MR.

Every builder returns pydicom ``Dataset`` objects that tests may alter (delete an attribute, move a
slice) before ``write_datasets`` stores them as Part 10 files. Stored values encode where a slice
belongs: slice ``k`` (in geometric order) holds ``slice_pixels(k, rows, columns)``, so a test can
check ordering from the voxels alone. Geometry follows PS3.3 C.7.6.2 (Image Plane) and, for the
multi-frame objects, C.7.6.16 (Multi-frame Functional Groups).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = [
    "SeriesIds",
    "compressed",
    "cr_image",
    "ct_series",
    "enhanced_series",
    "slice_pixels",
    "write_datasets",
]

_Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class SeriesIds:
    """The identity shared by the instances of one synthetic series (fresh UIDs by default)."""

    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)


def slice_pixels(index: int, rows: int, columns: int) -> npt.NDArray[np.int16]:
    """Stored values of slice ``index``: ``100 * index`` plus a small in-plane ramp (0..96)."""
    ramp = np.arange(rows * columns, dtype=np.int32).reshape(rows, columns) % 97
    return (ramp + 100 * index).astype(np.int16)


def _base(sop_class_uid: UID, ids: SeriesIds, modality: str, instance_number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.Modality = modality
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH-0001"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    return ds


def _normal(row: _Vec3, column: _Vec3) -> npt.NDArray[np.float64]:
    return np.cross(np.asarray(row, dtype=np.float64), np.asarray(column, dtype=np.float64))


def ct_series(
    n_slices: int = 8,
    *,
    ids: SeriesIds | None = None,
    rows: int = 16,
    columns: int = 12,
    modality: str = "CT",
    origin_mm: _Vec3 = (-50.0, -40.0, 100.0),
    row_cosines: _Vec3 = (1.0, 0.0, 0.0),
    column_cosines: _Vec3 = (0.0, 1.0, 0.0),
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.6),
    slice_spacing_mm: float = 2.5,
    rescale: tuple[float, float] | None = (1.0, -1024.0),
) -> list[Dataset]:
    """Single-frame CT (or MR with ``modality="MR"``) slices in geometric order along the normal.

    Instance Numbers run backwards (n..1) so that a loader sorting by them would get it wrong.
    ``rescale`` is (slope, intercept); None leaves the Rescale attributes out (MR).
    """
    ids = ids or SeriesIds()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    normal = _normal(row_cosines, column_cosines)
    datasets = []
    for k in range(n_slices):
        ds = _base(sop_class, ids, modality, instance_number=n_slices - k)
        ds.FrameOfReferenceUID = ids.frame_of_reference_uid
        position = np.asarray(origin_mm) + k * slice_spacing_mm * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [*row_cosines, *column_cosines]
        ds.PixelSpacing = list(pixel_spacing_mm)
        ds.SliceThickness = slice_spacing_mm
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.set_pixel_data(slice_pixels(k, rows, columns), "MONOCHROME2", 16)
        datasets.append(ds)
    return datasets


def cr_image(
    *,
    ids: SeriesIds | None = None,
    rows: int = 20,
    columns: int = 14,
    photometric: str = "MONOCHROME1",
    pixel_spacing_mm: tuple[float, float] | None = None,
    imager_pixel_spacing_mm: tuple[float, float] | None = None,
) -> Dataset:
    """A single-frame CR radiograph: no Image Position/Orientation, no Frame of Reference."""
    ds = _base(ComputedRadiographyImageStorage, ids or SeriesIds(), "CR", instance_number=1)
    if pixel_spacing_mm is not None:
        ds.PixelSpacing = list(pixel_spacing_mm)
    if imager_pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing_mm)
    ramp = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns)
    ds.set_pixel_data(ramp, photometric, 12)
    return ds


def enhanced_series(
    n_frames: int = 6,
    *,
    ids: SeriesIds | None = None,
    modality: str = "CT",
    rows: int = 16,
    columns: int = 12,
    origin_mm: _Vec3 = (-50.0, -40.0, 100.0),
    row_cosines: _Vec3 = (1.0, 0.0, 0.0),
    column_cosines: _Vec3 = (0.0, 1.0, 0.0),
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.6),
    slice_spacing_mm: float = 2.5,
    rescale: tuple[float, float] = (1.0, -1024.0),
    frame_order: Sequence[int] | None = None,
) -> Dataset:
    """One Enhanced CT (or MR) multi-frame instance with per-frame Plane Position.

    Pixel Measures, Plane Orientation and Pixel Value Transformation sit in the shared functional
    groups. ``frame_order[f]`` is the geometric slice index stored as frame ``f`` (default: reversed,
    so frame order and geometric order disagree).
    """
    ids = ids or SeriesIds()
    order = list(frame_order) if frame_order is not None else list(range(n_frames))[::-1]
    sop_class = EnhancedCTImageStorage if modality == "CT" else EnhancedMRImageStorage
    ds = _base(sop_class, ids, modality, instance_number=1)
    ds.FrameOfReferenceUID = ids.frame_of_reference_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing_mm)
    measures.SliceThickness = slice_spacing_mm
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [*row_cosines, *column_cosines]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = rescale
    transform.RescaleType = "HU" if modality == "CT" else "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    normal = _normal(row_cosines, column_cosines)
    per_frame = []
    for k in order:
        item = Dataset()
        plane = Dataset()
        position = np.asarray(origin_mm) + k * slice_spacing_mm * normal
        plane.ImagePositionPatient = [round(float(v), 6) for v in position]
        item.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    frames = np.stack([slice_pixels(k, rows, columns) for k in order])
    ds.set_pixel_data(frames, "MONOCHROME2", 16)
    return ds


def compressed(ds: Dataset, transfer_syntax_uid: UID) -> Dataset:
    """A losslessly compressed deep copy of ``ds``, same SOP Instance UID (RLE, JPEG-LS, JPEG 2000)."""
    out = copy.deepcopy(ds)
    out.compress(transfer_syntax_uid, generate_instance_uid=False)
    return out


def write_datasets(datasets: Sequence[Dataset], directory: Path, *, seed: int = 7) -> list[Path]:
    """Store each dataset as a Part 10 file under ``directory``; returns the paths in input order.

    File names are random-looking (seeded) so that nothing can rely on them sorting like slices.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for ds in datasets:
        path = directory / f"{rng.getrandbits(48):012x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
