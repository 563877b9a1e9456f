"""Instances of one series -> one geometry-checked volume in Hounsfield units.

PS3.3 C.7.6.2 (Image Plane Module) defines the geometry used here: Image Position (Patient),
Image Orientation (Patient), Pixel Spacing; C.11.1 (Modality LUT) gives Rescale Slope/Intercept.
Multi-frame objects (Enhanced CT/MR, PS3.3 C.7.6.16 Multi-frame Functional Groups) carry the same
attributes per frame in the Plane Position (C.7.6.16.2.3), Plane Orientation (C.7.6.16.2.4), Pixel
Measures (C.7.6.16.2.1) and Pixel Value Transformation (C.7.6.16.2.9) functional groups.

``load_volume`` reads every file once (pixel data deferred), checks that the instances form one
trustworthy stack, sorts them along the slice normal and decodes one slice at a time into a
preallocated array of the stored values (int16 for CT: half the bytes of float32 HU), keeping each
slice's rescale and each instance's header (without Pixel Data) for result encoding. What it
rejects raises ``VolumeError(reason, detail)``; the reasons are stable codes:

``no_instances``                      no paths were given
``unreadable_file``                   not a DICOM file pydicom can parse
``not_an_image``                      no pixel data, or a non-image SOP class (SR, SEG, PR, RT, ...)
``missing_attribute``                 a required attribute is absent; the detail starts with its keyword
``invalid_attribute``                 an attribute has the wrong multiplicity or an impossible value
``unsupported_pixel_format``          Samples per Pixel other than 1 (colour)
``absurd_dimensions``                 rows x columns x frames is zero or above 2**31
``mixed_series``                      instances of more than one study, series or modality
``mixed_multiframe``                  multi-frame and single-frame instances together
``inconsistent_size``                 Rows/Columns differ between instances
``inconsistent_orientation``          Image Orientation (Patient) differs beyond the tolerance
``inconsistent_spacing``              Pixel Spacing differs beyond the tolerance
``inconsistent_frame_of_reference``   Frame of Reference UID differs
``conflicting_duplicate``             one SOP Instance UID received twice with different content
``duplicate_position``                two different slices at the same position along the normal
``gantry_tilt``                       Gantry/Detector Tilt != 0, or slice origins drift in-plane
``slice_gap``                         a step between slices is a multiple of the usual one (missing slices)
``nonuniform_spacing``                steps between slices differ by more than the tolerance
``bad_pixel_data``                    pixel data that cannot be decoded (truncated, corrupt)

A file that cannot be opened at all raises ``StorageError``: that is the spool's failure, not the
input's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import iter_pixels, pixel_array

from reader import codecs
from reader.errors import ConfigError, StorageError, VolumeError

__all__ = ["GeometryTolerances", "SourceInstance", "Volume", "load_volume", "rescale_into"]

log = structlog.get_logger(__name__)

codecs.register()  # the JPEG family decodes through imagecodecs (BSD-3-Clause), see reader.codecs


@dataclass(frozen=True)
class SourceInstance:
    """One slice of the volume: the stored file and the instance (and frame) it came from.

    ``header`` is the instance's dataset as ``load_volume`` parsed it, without Pixel Data and what
    follows it (like ``dcmread(path, stop_before_pixels=True)``), so result encoding need not read
    the file again; None when the volume was built some other way. Treat it as read-only: the
    slices of one multi-frame instance share it.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, for slices taken from a multi-frame instance
    header: Dataset | None = field(default=None, compare=False, repr=False)


_Region = tuple[slice, slice, slice]
_ALL: _Region = (slice(None), slice(None), slice(None))


@dataclass(frozen=True, eq=False, init=False)
class Volume:
    """A series as a 3-D array, slice 0 first along the slice normal (row x column cosines).

    A single-frame radiograph (CR/DX) is a volume of one slice.

    The pixels are kept as decoded (``stored``, e.g. int16: half the bytes of float32) with each
    slice's Rescale Slope and Intercept (PS3.3 C.11.1.1.2); :meth:`hu` converts any region, and
    :attr:`voxels` is the whole volume in float32 HU (computed on first use, then kept). Images
    whose values need a Modality LUT Sequence or do not fit 16-bit integers are stored in float32
    HU already (slope 1, intercept 0). Build one from ``voxels=`` (float32 HU) or from ``stored=``
    with ``rescale_slope``/``rescale_intercept`` (one value per slice).
    """

    stored: npt.NDArray[Any]  # (slices, rows, columns) stored values, or float32 HU
    rescale_slope: tuple[float, ...]  # per slice
    rescale_intercept: tuple[float, ...]  # per slice
    spacing_mm: tuple[float, float, float]  # (between slices, between rows, between columns)
    origin_mm: tuple[float, float, float]  # Image Position (Patient) of slice 0, (x, y, z)
    row_cosines: tuple[float, float, float]  # direction of increasing column index
    column_cosines: tuple[float, float, float]  # direction of increasing row index
    sources: tuple[SourceInstance, ...]  # one per slice, in slice order
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None

    def __init__(
        self,
        *,
        spacing_mm: tuple[float, float, float],
        origin_mm: tuple[float, float, float],
        row_cosines: tuple[float, float, float],
        column_cosines: tuple[float, float, float],
        sources: tuple[SourceInstance, ...],
        modality: str,
        study_instance_uid: str,
        series_instance_uid: str,
        frame_of_reference_uid: str | None,
        voxels: npt.NDArray[np.float32] | None = None,
        stored: npt.NDArray[Any] | None = None,
        rescale_slope: Sequence[float] | None = None,
        rescale_intercept: Sequence[float] | None = None,
    ) -> None:
        if (voxels is None) == (stored is None):
            raise ValueError("give either voxels (float32 HU) or stored values, not both")
        if voxels is not None:
            if rescale_slope is not None or rescale_intercept is not None:
                raise ValueError("voxels are rescaled already: no rescale_slope/rescale_intercept")
            pixels: npt.NDArray[Any] = voxels
            slopes: tuple[float, ...] = (1.0,) * int(voxels.shape[0]) if voxels.ndim else ()
            intercepts: tuple[float, ...] = (0.0,) * len(slopes)
        else:
            assert stored is not None
            pixels = stored
            count = int(stored.shape[0]) if stored.ndim else 0
            slopes = (1.0,) * count if rescale_slope is None else tuple(float(v) for v in rescale_slope)
            intercepts = (
                (0.0,) * count if rescale_intercept is None else tuple(float(v) for v in rescale_intercept)
            )
            if len(slopes) != count or len(intercepts) != count:
                raise ValueError(f"need one rescale slope and intercept per slice ({count})")
        fields = {
            "stored": pixels,
            "rescale_slope": slopes,
            "rescale_intercept": intercepts,
            "spacing_mm": spacing_mm,
            "origin_mm": origin_mm,
            "row_cosines": row_cosines,
            "column_cosines": column_cosines,
            "sources": sources,
            "modality": modality,
            "study_instance_uid": study_instance_uid,
            "series_instance_uid": series_instance_uid,
            "frame_of_reference_uid": frame_of_reference_uid,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        s = self.stored.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def is_hu(self) -> bool:
        """True when ``stored`` already holds float32 HU (no rescale left to apply)."""
        return (
            self.stored.dtype == np.float32
            and all(v == 1.0 for v in self.rescale_slope)
            and all(v == 0.0 for v in self.rescale_intercept)
        )

    @property
    def uniform_rescale(self) -> tuple[float, float] | None:
        """(slope, intercept) shared by every slice, or None when they differ."""
        if not self.rescale_slope:
            return None
        pair = (self.rescale_slope[0], self.rescale_intercept[0])
        same = all(v == pair[0] for v in self.rescale_slope) and all(
            v == pair[1] for v in self.rescale_intercept
        )
        return pair if same else None

    @functools.cached_property
    def voxels(self) -> npt.NDArray[np.float32]:
        """The whole volume in float32 HU, (slices, rows, columns); computed once, then kept.

        It costs 4 bytes a voxel for the volume's lifetime: prefer :meth:`hu` for a region.
        """
        if self.is_hu:
            return cast("npt.NDArray[np.float32]", self.stored)
        return self.hu()

    def hu(self, region: _Region = _ALL) -> npt.NDArray[np.float32]:
        """A new float32 array of ``stored[region] * slope + intercept`` (steps allowed).

        Exactly the values of ``voxels[region]``, without converting the rest of the volume.
        """
        part = self.stored[region]
        out = np.empty(part.shape, dtype=np.float32)
        slices = range(self.stored.shape[0])[region[0]]
        slopes = [self.rescale_slope[k] for k in slices]
        intercepts = [self.rescale_intercept[k] for k in slices]
        if slopes and all(v == slopes[0] for v in slopes) and all(v == intercepts[0] for v in intercepts):
            rescale_into(out, part, slopes[0], intercepts[0])
        else:
            for k, (slope, intercept) in enumerate(zip(slopes, intercepts, strict=True)):
                rescale_into(out[k], part[k], slope, intercept)
        return out

    @property
    def slice_normal(self) -> tuple[float, float, float]:
        """Unit normal of the slices (row cosines x column cosines)."""
        n = np.cross(np.asarray(self.row_cosines), np.asarray(self.column_cosines))
        return (float(n[0]), float(n[1]), float(n[2]))

    def voxel_to_patient(self, index: tuple[float, float, float]) -> tuple[float, float, float]:
        """Patient coordinates (x, y, z) in mm of a (slice, row, column) index."""
        s, r, c = index
        p = (
            np.asarray(self.origin_mm)
            + c * self.spacing_mm[2] * np.asarray(self.row_cosines)
            + r * self.spacing_mm[1] * np.asarray(self.column_cosines)
            + s * self.spacing_mm[0] * np.asarray(self.slice_normal)
        )
        return (float(p[0]), float(p[1]), float(p[2]))


@dataclass(frozen=True)
class GeometryTolerances:
    """How far real scanner output may stray from an ideal regular grid before a series is rejected."""

    orientation: float = 1e-3  # max |difference| of any direction cosine between slices
    orientation_unit: float = 1e-2  # max deviation of a cosine vector's length from 1, and of row.col from 0
    pixel_spacing_relative: float = 1e-3  # max relative difference of Pixel Spacing between slices
    duplicate_position_mm: float = 1e-2  # slices closer than this along the normal share a position
    slice_spacing_relative: float = 0.10  # max relative deviation of a step (or a slice) from the grid
    in_plane_drift_pixels: float = 0.25  # max in-plane drift of slice origins, in pixels; more is a tilt
    gantry_tilt_deg: float = 1e-3  # |Gantry/Detector Tilt| above this is a tilted acquisition

    def __post_init__(self) -> None:
        for tolerance in dataclasses.fields(self):
            value = getattr(self, tolerance.name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"volume.{tolerance.name}", f"must be a positive number, got {value!r}")


_DEFAULT_TOLERANCES = GeometryTolerances()
_MAX_VOXELS = 2**31
_DEFER_BYTES = 4096  # pixel data (and other large values) are read only when decoded
_FIRST_PIXEL_TAG = 0x7FE00008  # Float Pixel Data; Double Float Pixel Data and Pixel Data follow
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_MODULE = ("BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")
# SOP classes that may sit in an imaging series but are not images (PS3.4 B.5): SR, presentation
# states, raw data / registration / segmentation / surface, encapsulated documents, RT objects.
_NON_IMAGE_SOP_ROOTS = (
    "1.2.840.10008.5.1.4.1.1.88",
    "1.2.840.10008.5.1.4.1.1.11",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.104",
    "1.2.840.10008.5.1.4.1.1.481",
)
_RT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.1"
_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    NotImplementedError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    EOFError,
    struct.error,
)
_PARSE_ERRORS = (InvalidDicomError, ValueError, TypeError, EOFError, KeyError, IndexError, struct.error)

_Vec3 = tuple[float, float, float]
_Cosines = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class _Frame:
    """Geometry and rescale of one candidate slice: a single-frame instance or one frame of a multi-frame."""

    frame_index: int | None  # 0-based frame of a multi-frame instance
    position: _Vec3 | None
    orientation: _Cosines | None
    pixel_spacing: tuple[float, float] | None
    slice_step_mm: float | None  # Spacing Between Slices, else Slice Thickness: used for a lone slice
    slope: float
    intercept: float
    gantry_tilt_deg: float


@dataclass(frozen=True)
class _Instance:
    """The header of one instance, read once: everything the checks and the decoder need."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    modality: str
    rows: int
    columns: int
    multiframe: bool
    photometric: str
    imager_pixel_spacing: tuple[float, float] | None
    uses_modality_lut: bool
    frames: tuple[_Frame, ...]


@dataclass(frozen=True)
class _Geometry:
    """Where the sorted slices lie: slice k is candidate ``order[k]``."""

    order: tuple[int, ...]
    origin_mm: _Vec3
    row_cosines: _Vec3
    column_cosines: _Vec3
    spacing_mm: _Vec3


def load_volume(paths: Sequence[Path], *, tolerances: GeometryTolerances = _DEFAULT_TOLERANCES) -> Volume:
    """Read the instances of one series and return them as a geometry-checked volume.

    Slices are sorted along the normal (row x column cosines, PS3.3 C.7.6.2.1.1), never by Instance
    Number; voxels are ``stored value * Rescale Slope + Rescale Intercept`` (PS3.3 C.11.1.1.2).
    Raises ``VolumeError`` with one of the reasons in the module docstring.
    """
    started = time.perf_counter()
    if not paths:
        raise VolumeError("no_instances", "no files given")
    instances, datasets = _read_instances(paths)
    _check_series(instances)
    candidates = [(i, frame) for i, inst in enumerate(instances) for frame in inst.frames]
    first = instances[0]
    _check_total_size(len(candidates), first.rows, first.columns)
    geometry = _geometry(candidates, instances, tolerances)

    slot_of = {(candidates[c][0], candidates[c][1].frame_index): k for k, c in enumerate(geometry.order)}
    stack = _Stack((len(candidates), first.rows, first.columns))
    headers = _decode_into(stack, instances, datasets, slot_of)
    if first.photometric == "MONOCHROME1":
        log.info("volume.monochrome1_kept", series_uid=first.series_uid, inverted=False)

    sources = tuple(
        _source(instances[candidates[c][0]], candidates[c][1], headers[candidates[c][0]])
        for c in geometry.order
    )
    volume = Volume(
        stored=stack.array(),
        rescale_slope=stack.slope,
        rescale_intercept=stack.intercept,
        spacing_mm=geometry.spacing_mm,
        origin_mm=geometry.origin_mm,
        row_cosines=geometry.row_cosines,
        column_cosines=geometry.column_cosines,
        sources=sources,
        modality=first.modality,
        study_instance_uid=first.study_uid,
        series_instance_uid=first.series_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
    )
    log.info(
        "volume.loaded",
        series_uid=first.series_uid,
        slices=len(sources),
        rows=first.rows,
        columns=first.columns,
        seconds=round(time.perf_counter() - started, 4),
    )
    return volume


def _source(inst: _Instance, frame: _Frame, header: Dataset | None) -> SourceInstance:
    number = None if frame.frame_index is None else frame.frame_index + 1
    return SourceInstance(
        inst.path, inst.sop_class_uid, inst.sop_instance_uid, frame_number=number, header=header
    )


# --- reading headers -------------------------------------------------------------------------


def _read_instances(paths: Sequence[Path]) -> tuple[list[_Instance], list[Dataset | None]]:
    """Parse every file once; drop re-sent copies of one SOP instance, reject conflicting ones."""
    instances: list[_Instance] = []
    datasets: list[Dataset | None] = []
    seen: dict[str, int] = {}
    for raw_path in paths:
        path = Path(raw_path)
        ds = _read_dataset(path)
        try:
            inst = _instance(path, ds)
        except _PARSE_ERRORS as exc:
            raise VolumeError("invalid_attribute", f"{path.name}: {exc}") from exc
        prior = seen.get(inst.sop_instance_uid)
        if prior is None:
            seen[inst.sop_instance_uid] = len(instances)
            instances.append(inst)
            datasets.append(ds)
        elif dataclasses.replace(inst, path=instances[prior].path) == instances[prior]:
            log.info("volume.duplicate_dropped", sop_instance_uid=inst.sop_instance_uid)
        else:
            raise VolumeError(
                "conflicting_duplicate",
                f"SOP Instance UID {inst.sop_instance_uid} received twice with different content",
            )
    return instances, datasets


def _read_dataset(path: Path) -> Dataset:
    """``dcmread`` with large values (pixel data) deferred until they are decoded."""
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except _PARSE_ERRORS as exc:
        raise VolumeError("unreadable_file", f"{path.name}: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path.name}: {exc}") from exc


def _instance(path: Path, ds: Dataset) -> _Instance:
    """Extract and validate the header of one instance."""
    sop_class_uid = _text(ds, "SOPClassUID")
    if _is_non_image(sop_class_uid):
        raise VolumeError("not_an_image", f"{path.name}: SOP class {sop_class_uid}")
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise VolumeError("not_an_image", f"{path.name}: no pixel data")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if min(rows, columns, n_frames) <= 0 or rows * columns * n_frames > _MAX_VOXELS:
        raise VolumeError("absurd_dimensions", f"{path.name}: {n_frames} x {rows} x {columns}")
    for keyword in _PIXEL_MODULE:
        _required(ds, keyword)
    if _int(ds, "SamplesPerPixel") != 1:
        raise VolumeError("unsupported_pixel_format", f"{path.name}: SamplesPerPixel {ds.SamplesPerPixel}")
    modality = _text(ds, "Modality")
    multiframe = (
        n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    )
    uses_lut = (
        not multiframe and modality != "CT" and "RescaleSlope" not in ds and "ModalityLUTSequence" in ds
    )
    frames = (
        _functional_group_frames(ds, n_frames, modality) if multiframe else (_classic_frame(ds, modality),)
    )
    imager = _floats(ds, "ImagerPixelSpacing", 2)
    return _Instance(
        path=path,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID") or "") or None,
        modality=modality,
        rows=rows,
        columns=columns,
        multiframe=multiframe,
        photometric=_text(ds, "PhotometricInterpretation"),
        imager_pixel_spacing=None if imager is None else (imager[0], imager[1]),
        uses_modality_lut=uses_lut,
        frames=frames,
    )


def _is_non_image(sop_class_uid: str) -> bool:
    if sop_class_uid == _RT_IMAGE_STORAGE:
        return False
    return any(sop_class_uid == root or sop_class_uid.startswith(root + ".") for root in _NON_IMAGE_SOP_ROOTS)


def _classic_frame(ds: Dataset, modality: str) -> _Frame:
    """Geometry of a single-frame instance, from its top-level Image Plane attributes."""
    slope, intercept = _rescale(ds, modality)
    return _Frame(
        frame_index=None,
        position=_vec3(ds, "ImagePositionPatient"),
        orientation=_cosines(ds),
        pixel_spacing=_pair(ds, "PixelSpacing"),
        slice_step_mm=_slice_step(ds),
        slope=slope,
        intercept=intercept,
        gantry_tilt_deg=_float(ds, "GantryDetectorTilt") or 0.0,
    )


_MACROS = (
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
    "CTAcquisitionDetailsSequence",
)


def _functional_group_frames(ds: Dataset, n_frames: int, modality: str) -> tuple[_Frame, ...]:
    """Per-frame geometry of a multi-frame instance: each macro per frame, else shared, else top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise VolumeError("missing_attribute", "PerFrameFunctionalGroupsSequence")
    if len(per_frame) != n_frames:
        raise VolumeError(
            "invalid_attribute",
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n_frames} frames",
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared_seq[0] if shared_seq else Dataset()
    shared = {keyword: _macro(shared_item, keyword) for keyword in _MACROS}
    frames = []
    for index, item in enumerate(per_frame):
        macro = {keyword: _macro(item, keyword) or shared[keyword] for keyword in _MACROS}
        position, orientation = macro["PlanePositionSequence"], macro["PlaneOrientationSequence"]
        measures = macro["PixelMeasuresSequence"]
        acquisition = macro["CTAcquisitionDetailsSequence"] or ds
        slope, intercept = _rescale(macro["PixelValueTransformationSequence"] or ds, modality)
        frames.append(
            _Frame(
                frame_index=index,
                position=None if position is None else _vec3(position, "ImagePositionPatient"),
                orientation=None if orientation is None else _cosines(orientation),
                pixel_spacing=None if measures is None else _pair(measures, "PixelSpacing"),
                slice_step_mm=None if measures is None else _slice_step(measures),
                slope=slope,
                intercept=intercept,
                gantry_tilt_deg=_float(acquisition, "GantryDetectorTilt") or 0.0,
            )
        )
    return tuple(frames)


def _macro(item: Dataset, keyword: str) -> Dataset | None:
    sequence = item.get(keyword)
    return sequence[0] if sequence else None


def _rescale(source: Dataset, modality: str) -> tuple[float, float]:
    """Rescale Slope and Intercept (PS3.3 C.11.1); required for CT, identity otherwise."""
    slope, intercept = _float(source, "RescaleSlope"), _float(source, "RescaleIntercept")
    if modality == "CT":
        if slope is None:
            raise VolumeError("missing_attribute", "RescaleSlope")
        if intercept is None:
            raise VolumeError("missing_attribute", "RescaleIntercept")
    if slope == 0.0:
        raise VolumeError("invalid_attribute", "RescaleSlope is 0")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _slice_step(source: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float(source, keyword)
        if value is not None and value > 0:
            return value
    return None


def _required(ds: Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    if value is None or (isinstance(value, str | bytes | MultiValue | list) and len(value) == 0):
        raise VolumeError("missing_attribute", keyword)
    return value


def _text(ds: Dataset, keyword: str) -> str:
    return str(_required(ds, keyword)).strip()


def _int(ds: Dataset, keyword: str) -> int:
    value = _required(ds, keyword)
    if not isinstance(value, int):
        raise VolumeError("invalid_attribute", f"{keyword} is not an integer")
    return value


def _floats(source: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """A numeric attribute of exactly ``count`` finite values, or None when absent or empty."""
    value = source.get(keyword)
    if value is None:
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if not items or items == [""]:
        return None
    if len(items) != count:
        raise VolumeError("invalid_attribute", f"{keyword} has {len(items)} values, expected {count}")
    try:
        numbers = tuple(float(item) for item in items)
    except (TypeError, ValueError) as exc:
        raise VolumeError("invalid_attribute", f"{keyword} is not numeric") from exc
    if not all(math.isfinite(number) for number in numbers):
        raise VolumeError("invalid_attribute", f"{keyword} is not finite")
    return numbers


def _float(source: Dataset, keyword: str) -> float | None:
    values = _floats(source, keyword, 1)
    return None if values is None else values[0]


def _pair(source: Dataset, keyword: str) -> tuple[float, float] | None:
    values = _floats(source, keyword, 2)
    return None if values is None else (values[0], values[1])


def _vec3(source: Dataset, keyword: str) -> _Vec3 | None:
    values = _floats(source, keyword, 3)
    return None if values is None else (values[0], values[1], values[2])


def _cosines(source: Dataset) -> _Cosines | None:
    v = _floats(source, "ImageOrientationPatient", 6)
    return None if v is None else (v[0], v[1], v[2], v[3], v[4], v[5])


# --- checks ----------------------------------------------------------------------------------


def _check_series(instances: list[_Instance]) -> None:
    """All instances: one study/series/modality, one kind (multi-frame or not), one size, one FoR."""
    first = instances[0]
    for inst in instances[1:]:
        if (inst.study_uid, inst.series_uid, inst.modality) != (
            first.study_uid,
            first.series_uid,
            first.modality,
        ):
            raise VolumeError(
                "mixed_series", f"{inst.path.name} belongs to another series than {first.path.name}"
            )
        if inst.multiframe != first.multiframe:
            raise VolumeError("mixed_multiframe", f"{inst.path.name} and {first.path.name}")
        if (inst.rows, inst.columns) != (first.rows, first.columns):
            raise VolumeError(
                "inconsistent_size",
                f"{inst.path.name} is {inst.rows}x{inst.columns}, "
                f"{first.path.name} is {first.rows}x{first.columns}",
            )
        if inst.frame_of_reference_uid != first.frame_of_reference_uid:
            raise VolumeError("inconsistent_frame_of_reference", f"{inst.path.name} and {first.path.name}")


def _check_total_size(slices: int, rows: int, columns: int) -> None:
    if slices * rows * columns > _MAX_VOXELS:
        raise VolumeError("absurd_dimensions", f"{slices} x {rows} x {columns}")


def _geometry(
    candidates: list[tuple[int, _Frame]], instances: list[_Instance], tol: GeometryTolerances
) -> _Geometry:
    """Check the slices form one regular, untilted stack and return its sorted geometry."""
    frames = [frame for _, frame in candidates]
    tilted = max(abs(frame.gantry_tilt_deg) for frame in frames)
    if tilted > tol.gantry_tilt_deg:
        raise VolumeError("gantry_tilt", f"GantryDetectorTilt {tilted:g} deg")
    if len(frames) == 1:
        return _single_slice_geometry(frames[0], instances[candidates[0][0]], tol)
    n = len(frames)
    positions = np.array([_need(f.position, "ImagePositionPatient", n) for f in frames], dtype=np.float64)
    cosines = np.array([_need(f.orientation, "ImageOrientationPatient", n) for f in frames], dtype=np.float64)
    pixel = np.array([_need(f.pixel_spacing, "PixelSpacing", n) for f in frames], dtype=np.float64)

    row, column = _unit_cosines(cosines[0], tol)
    worst = float(np.max(np.abs(cosines - cosines[0])))
    if worst > tol.orientation:
        raise VolumeError("inconsistent_orientation", f"direction cosines differ by up to {worst:.4g}")
    if np.any(pixel <= 0):
        raise VolumeError("invalid_attribute", "PixelSpacing is not positive")
    spread = float(np.max(np.abs(pixel - pixel[0]) / pixel[0]))
    if spread > tol.pixel_spacing_relative:
        raise VolumeError("inconsistent_spacing", f"PixelSpacing differs by up to {spread:.2%}")

    normal = np.cross(row, column)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    _check_duplicates(steps, along, tol)
    _check_in_plane_drift(positions, normal, float(pixel[0].min()), tol)
    slice_spacing = float(along[-1] - along[0]) / (n - 1)
    _check_steps(steps, along, slice_spacing, tol)
    return _Geometry(
        order=tuple(int(i) for i in order),
        origin_mm=_tuple3(positions[0]),
        row_cosines=_tuple3(row),
        column_cosines=_tuple3(column),
        spacing_mm=(slice_spacing, float(pixel[0][0]), float(pixel[0][1])),
    )


def _need(value: tuple[float, ...] | None, keyword: str, slices: int) -> tuple[float, ...]:
    if value is None:
        raise VolumeError("missing_attribute", f"{keyword} (needed to stack {slices} slices)")
    return value


def _unit_cosines(
    cosines: npt.NDArray[np.float64], tol: GeometryTolerances
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row and column direction cosines, checked to be unit length and orthogonal, then normalised."""
    row, column = cosines[:3], cosines[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(column)))
    if (
        max(abs(length - 1.0) for length in lengths) > tol.orientation_unit
        or abs(float(row @ column)) > tol.orientation_unit
    ):
        raise VolumeError("invalid_attribute", "ImageOrientationPatient is not two orthogonal unit vectors")
    return row / lengths[0], column / lengths[1]


def _check_duplicates(
    steps: npt.NDArray[np.float64], along: npt.NDArray[np.float64], tol: GeometryTolerances
) -> None:
    close = np.flatnonzero(steps < tol.duplicate_position_mm)
    if close.size:
        raise VolumeError(
            "duplicate_position",
            f"{close.size} slice(s) share a position with another, "
            f"first at {along[close[0]]:.3f} mm along the normal",
        )


def _check_in_plane_drift(
    positions: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    pixel_mm: float,
    tol: GeometryTolerances,
) -> None:
    """Slice origins must lie on one line along the normal; an in-plane drift means a tilted gantry."""
    offsets = positions - positions[0]
    along = offsets @ normal
    drift = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] > tol.in_plane_drift_pixels * pixel_mm:
        angle = math.degrees(math.atan2(float(drift[worst]), abs(float(along[worst]))))
        raise VolumeError(
            "gantry_tilt",
            f"slice origins drift {drift[worst]:.2f} mm in-plane over {abs(along[worst]):.1f} mm "
            f"(about {angle:.2f} deg)",
        )


def _check_steps(
    steps: npt.NDArray[np.float64], along: npt.NDArray[np.float64], spacing: float, tol: GeometryTolerances
) -> None:
    """Steps between slices must be uniform: a multiple of the usual step is a gap, else irregular."""
    usual = float(np.median(steps))
    ratios = steps / usual
    for k in np.flatnonzero(np.abs(ratios - 1.0) > tol.slice_spacing_relative):
        multiple = round(float(ratios[k]))
        if multiple >= 2 and abs(ratios[k] - multiple) <= tol.slice_spacing_relative * multiple:
            raise VolumeError(
                "slice_gap",
                f"step of {steps[k]:.3f} mm after slice {k} where {usual:.3f} mm is usual: "
                f"about {multiple - 1} slice(s) missing",
            )
    worst = int(np.argmax(np.abs(ratios - 1.0)))
    if abs(ratios[worst] - 1.0) > tol.slice_spacing_relative:
        raise VolumeError(
            "nonuniform_spacing",
            f"step of {steps[worst]:.3f} mm after slice {worst} where {usual:.3f} mm is usual",
        )
    grid = along[0] + spacing * np.arange(along.size)
    off = float(np.max(np.abs(along - grid)))
    if off > tol.slice_spacing_relative * spacing:
        raise VolumeError(
            "nonuniform_spacing", f"a slice lies {off:.3f} mm off a regular {spacing:.3f} mm grid"
        )


def _single_slice_geometry(frame: _Frame, inst: _Instance, tol: GeometryTolerances) -> _Geometry:
    """One slice: its own plane if it has one; a radiograph gets the identity plane at the origin."""
    if frame.position is None:
        origin: _Vec3 = (0.0, 0.0, 0.0)
        row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        cosines = _need(frame.orientation, "ImageOrientationPatient", 1)
        row, column = _unit_cosines(np.asarray(cosines, dtype=np.float64), tol)
        origin = frame.position
    pixel = _single_slice_pixel_spacing(frame, inst)
    step = frame.slice_step_mm
    if step is None:
        step = 1.0
        if frame.position is not None:
            log.info("volume.spacing_assumed", series_uid=inst.series_uid, axis="slice", spacing_mm=step)
    return _Geometry(
        order=(0,),
        origin_mm=origin,
        row_cosines=_tuple3(row),
        column_cosines=_tuple3(column),
        spacing_mm=(step, pixel[0], pixel[1]),
    )


def _single_slice_pixel_spacing(frame: _Frame, inst: _Instance) -> tuple[float, float]:
    """Pixel Spacing, else Imager Pixel Spacing (PS3.3 C.8.11.4, at the detector), else 1 mm, logged."""
    for source, spacing in (
        ("PixelSpacing", frame.pixel_spacing),
        ("ImagerPixelSpacing", inst.imager_pixel_spacing),
    ):
        if spacing is not None and min(spacing) > 0:
            if source != "PixelSpacing":
                log.info("volume.spacing_assumed", series_uid=inst.series_uid, axis="pixel", source=source)
            return spacing
    log.info(
        "volume.spacing_assumed", series_uid=inst.series_uid, axis="pixel", source="default", spacing_mm=1.0
    )
    return (1.0, 1.0)


def _tuple3(values: npt.NDArray[np.float64]) -> _Vec3:
    return (float(values[0]), float(values[1]), float(values[2]))


# --- decoding --------------------------------------------------------------------------------


class _Stack:
    """The volume's pixels as they are decoded: stored values while they fit, else float32 HU.

    The array is allocated at the first slice, with that slice's integer type when it is at most
    16 bits and rescaled linearly; a later slice of another type that does not fit (or one that
    needs a Modality LUT) turns the whole stack into float32 HU, converting the slices so far.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.slope = [1.0] * shape[0]
        self.intercept = [0.0] * shape[0]
        self._array: npt.NDArray[Any] | None = None
        self._filled = np.zeros(shape[0], dtype=bool)

    def array(self) -> npt.NDArray[Any]:
        assert self._array is not None and bool(self._filled.all())
        return self._array

    def put(self, slot: int, stored: npt.NDArray[Any], frame: _Frame, inst: _Instance, ds: Dataset) -> None:
        """Place one decoded frame at ``slot``."""
        if stored.shape != self.shape[1:]:
            raise VolumeError(
                "bad_pixel_data", f"{inst.path.name}: decoded shape {stored.shape}, expected {self.shape[1:]}"
            )
        keep = not inst.uses_modality_lut and stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2
        if self._array is None:
            self._array = np.empty(self.shape, dtype=stored.dtype if keep else np.float32)
        elif self._array.dtype != np.float32 and not (keep and np.can_cast(stored.dtype, self._array.dtype)):
            self._to_hu()
        if self._array.dtype == np.float32 and not (keep and stored.dtype == np.float32):
            if inst.uses_modality_lut:
                self._array[slot] = apply_modality_lut(stored, ds)
            else:
                rescale_into(self._array[slot], stored, frame.slope, frame.intercept)
        else:
            self._array[slot] = stored
            self.slope[slot], self.intercept[slot] = frame.slope, frame.intercept
        self._filled[slot] = True

    def _to_hu(self) -> None:
        assert self._array is not None
        hu = np.empty(self.shape, dtype=np.float32)
        for k in np.flatnonzero(self._filled):
            rescale_into(hu[k], self._array[k], self.slope[k], self.intercept[k])
        self._array = hu
        self.slope = [1.0] * self.shape[0]
        self.intercept = [0.0] * self.shape[0]


def _decode_into(
    stack: _Stack,
    instances: list[_Instance],
    datasets: list[Dataset | None],
    slot_of: dict[tuple[int, int | None], int],
) -> list[Dataset]:
    """Decode one frame at a time straight into its slot of the stack; return the headers.

    Each dataset loses its Pixel Data (and what follows it) once decoded, leaving the header.
    """
    headers: list[Dataset] = []
    for i, inst in enumerate(instances):
        ds = datasets[i]
        assert ds is not None  # each dataset is decoded once, then kept as a header
        plugin = codecs.decoding_plugin(str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")))
        with _pixel_errors(inst):
            if inst.multiframe:
                decoded = 0
                for index, frame_pixels in enumerate(iter_pixels(ds, decoding_plugin=plugin)):
                    if index >= len(inst.frames):
                        break
                    stack.put(slot_of[(i, index)], frame_pixels, inst.frames[index], inst, ds)
                    decoded += 1
                if decoded != len(inst.frames):
                    raise VolumeError(
                        "bad_pixel_data", f"{inst.path.name}: {decoded} of {len(inst.frames)} frames"
                    )
            else:
                pixels = pixel_array(ds, decoding_plugin=plugin)
                stack.put(slot_of[(i, None)], pixels, inst.frames[0], inst, ds)
        _strip_pixels(ds)
        headers.append(ds)
        datasets[i] = None
    return headers


def _strip_pixels(ds: Dataset) -> None:
    """Drop Pixel Data and everything after it, as ``dcmread(stop_before_pixels=True)`` would."""
    del ds[_FIRST_PIXEL_TAG:]


@contextmanager
def _pixel_errors(inst: _Instance) -> Iterator[None]:
    """Turn a decoder's failure into ``bad_pixel_data``; a vanished file stays a storage failure."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot read pixel data of {inst.path.name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise VolumeError("bad_pixel_data", f"{inst.path.name}: {exc}") from exc


def rescale_into(
    out: npt.NDArray[np.float32], stored: npt.NDArray[Any], slope: float, intercept: float
) -> None:
    """``out = stored * slope + intercept`` in float32 without a float64 temporary (PS3.3 C.11.1.1.2)."""
    if slope == 1.0:
        out[...] = stored
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)
