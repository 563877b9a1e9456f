"""What a model found in one series: the hand-over from inference to result encoding.

Vocabulary follows the standard: a *finding class* is a SEG segment (PS3.3 C.8.20.2, Segment
Sequence) described by Segmented Property Category (CID 7150) and Type (CID 7151); a *finding* is
one TID 1500 measurement group (PS3.16 TID 1411 Volumetric ROI Measurements) with a tracking
identifier, its class, a finding site and measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["AlgorithmIdentity", "Code", "Finding", "FindingClass", "InferenceResult", "Outline"]


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Table 8.8-1): Code Value, Coding Scheme Designator, Code Meaning."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or not self.scheme or not self.meaning:
            raise ValueError(f"a code needs value, scheme and meaning: {self!r}")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Algorithm Identification (TID 4019): name, version, family (CID 7162) and source."""

    name: str
    version: str
    family: Code
    source: str
    # SHA-256 (hex) of the ONNX graph that ran, from the manifest (checked at load): what identifies
    # the weights in result UIDs and in the SR; empty only for hand-made results in tests.
    weights_sha256: str = ""


@dataclass(frozen=True)
class FindingClass:
    """One segment of the SEG: the value it has in the label map and what it means."""

    label: int  # value in InferenceResult.label_map and SEG Segment Number, 1-based
    name: str  # Segment Label
    category: Code  # Segmented Property Category, CID 7150
    property_type: Code  # Segmented Property Type, CID 7151
    site: Code | None  # Finding Site / Anatomic Region, e.g. SCT 39607008 Lung

    def __post_init__(self) -> None:
        if not 1 <= self.label <= 255:
            raise ValueError(f"label must be in 1..255, got {self.label}")


@dataclass(frozen=True)
class Outline:
    """Where a finding is drawn: a closed polygon on one source slice (its *key slice*).

    Encoded as an SR SCOORD POLYLINE (PS3.3 C.18.6) selected from that image, which viewers draw.
    ``points`` are image coordinates (column, row) as SCOORD has them: (0.0, 0.0) is the top-left
    corner of the top-left pixel, so a pixel centre (r, c) is at (c + 0.5, r + 0.5); the last point
    repeats the first.
    """

    slice_index: int  # index into Volume.sources: the slice where the finding is largest
    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.slice_index < 0:
            raise ValueError(f"slice_index must be >= 0, got {self.slice_index}")
        if len(self.points) < 4 or self.points[0] != self.points[-1]:
            raise ValueError("an outline is a closed polygon: at least 3 corners, last point = first")


@dataclass(frozen=True)
class Finding:
    """One detected lesion: a connected component of its class in the label map, or one box.

    In the SEG, finding ``number`` is segment ``number`` (label-map value ``number``).
    """

    number: int  # 1-based, ordered by descending score; Tracking Identifier "finding <number>"
    finding_class: FindingClass
    score: float  # the model's maximum probability inside the component, 0..1
    voxel_count: int  # voxels of the component; for a box, the voxels the box covers
    volume_mm3: float | None  # None for a box (a detector measures no volume)
    longest_diameter_mm: float  # a box: its longer side on the key slice
    centroid_mm: tuple[float, float, float]  # patient coordinates (x, y, z), PS3.3 C.7.6.2.1.1
    slice_indices: tuple[int, ...]  # indices into Volume.sources of the slices it touches
    outline: Outline  # its outline on the key slice (where its area is largest)
    # Where it lies, as far as the package's anatomy can tell (e.g. SCT "Left lung"); None: the
    # class's own site stands (never a guessed one).
    site: Code | None = None
    # The score mapped through the package's calibration (probability that the finding is a true
    # lesion, measured on the validation set); None when the package ships no calibration.
    calibrated_score: float | None = None
    short_axis_mm: float | None = None  # a box: its shorter side on the key slice; else None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")
        if self.calibrated_score is not None and not 0.0 <= self.calibrated_score <= 1.0:
            raise ValueError(f"calibrated_score must be in [0, 1], got {self.calibrated_score}")
        if self.voxel_count <= 0 or not self.slice_indices:
            raise ValueError("a finding covers at least one voxel on one slice")


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """The model's output on one volume, already mapped back to the volume's own voxel grid."""

    algorithm: AlgorithmIdentity
    finding_classes: tuple[FindingClass, ...]
    findings: tuple[Finding, ...]
    # uint8, same shape as Volume.voxels: 0 background, else the Finding.number of the finding the
    # voxel belongs to (= its SEG segment number); only voxels of reported findings are set. None
    # for detection models (``output.kind = "boxes"``): their findings are boxes, with no SEG.
    label_map: npt.NDArray[np.uint8] | None
    provider: str  # the onnxruntime execution provider that actually ran, e.g. "CPUExecutionProvider"
    precision: str = "fp32"  # of the graph that ran: "fp32", or "fp16" for a package's fp16 graph

    @property
    def positive(self) -> bool:
        """True when at least one finding was reported."""
        return bool(self.findings)
