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

__all__ = ["AlgorithmIdentity", "Code", "Finding", "FindingClass", "InferenceResult"]


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
class Finding:
    """One detected lesion: a connected component of its class in the label map."""

    number: int  # 1-based, ordered by descending score; Tracking Identifier "finding <number>"
    finding_class: FindingClass
    score: float  # the model's maximum probability inside the component, 0..1
    voxel_count: int
    volume_mm3: float
    longest_diameter_mm: float
    centroid_mm: tuple[float, float, float]  # patient coordinates (x, y, z), PS3.3 C.7.6.2.1.1
    slice_indices: tuple[int, ...]  # indices into Volume.sources of the slices it touches

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")
        if self.voxel_count <= 0 or not self.slice_indices:
            raise ValueError("a finding covers at least one voxel on one slice")


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """The model's output on one volume, already mapped back to the volume's own voxel grid."""

    algorithm: AlgorithmIdentity
    finding_classes: tuple[FindingClass, ...]
    findings: tuple[Finding, ...]
    # uint8, same shape as Volume.voxels: 0 background, else FindingClass.label; only voxels of
    # reported findings are set (components dropped by thresholds are cleared).
    label_map: npt.NDArray[np.uint8]
    provider: str  # the onnxruntime execution provider that actually ran, e.g. "CPUExecutionProvider"

    @property
    def positive(self) -> bool:
        """True when at least one finding was reported."""
        return bool(self.findings)
