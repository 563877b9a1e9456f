"""Native-grid probabilities -> findings: threshold, connected components, measurements.

Each finding becomes one TID 1500 measurement group (PS3.16 TID 1411 Volumetric ROI
Measurements) and one region of its SEG segment (PS3.3 C.8.20.2): volume, longest diameter (the
largest distance between two voxel centres of the component), centroid in patient coordinates
(PS3.3 C.7.6.2.1.1) and the slices it touches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from reader.findings import Finding
from reader.inference.manifest import LabelSpec
from reader.volume import Volume

__all__ = ["ChannelSelection", "extract_findings", "longest_diameter_mm", "select_labels"]

_HULL_MIN_POINTS = 64  # below this the all-pairs distance is cheaper than a hull
_PAIR_BLOCK = 1_000_000  # distances computed per block when falling back to all pairs


@dataclass(frozen=True, eq=False)
class ChannelSelection:
    """Which label each native voxel belongs to (0: none) and the probability that won it."""

    winner: npt.NDArray[np.uint8]  # label value per voxel
    probability: npt.NDArray[np.float32]  # the winning label's probability; meaningless where 0


def select_labels(
    channels: Iterable[tuple[LabelSpec, npt.NDArray[np.float32]]], shape: tuple[int, ...]
) -> ChannelSelection:
    """Threshold each label's probability map; where several pass, the most probable label wins.

    ``channels`` may be a generator so only one native-grid probability map is alive at a time.
    The outputs start as zeros (pages the OS only commits where a label is written).
    """
    winner = np.zeros(shape, dtype=np.uint8)
    best = np.zeros(shape, dtype=np.float32)
    for label, probability in channels:
        take = probability >= np.float32(label.threshold)
        take &= (probability > best) | (winner == 0)
        winner[take] = label.value
        best[take] = probability[take]
    return ChannelSelection(winner=winner, probability=best)


@dataclass(frozen=True)
class _Candidate:
    label: LabelSpec
    score: float
    voxel_count: int
    volume_mm3: float
    longest_diameter_mm: float
    centroid_mm: tuple[float, float, float]
    slice_indices: tuple[int, ...]
    first_voxel: tuple[int, int, int]


def extract_findings(
    selection: ChannelSelection,
    labels: Iterable[LabelSpec],
    volume: Volume,
    in_plane_only: bool,
    lung: npt.NDArray[np.bool_] | None = None,
) -> tuple[tuple[Finding, ...], npt.NDArray[np.uint8]]:
    """Connected components of each label, filtered, measured and numbered by descending score.

    Components connect with 26-connectivity, or 8-connectivity within a slice when
    ``in_plane_only`` (2-D models). A component is kept when its maximum probability reaches
    ``min_score`` and its volume ``min_volume_mm3`` (and, with a ``lung`` field and a label's
    ``min_lung_fraction``, enough of it lies in the lungs); then the ``max_findings`` best per label.
    Returns the findings and a uint8 label map holding only the kept components.
    """
    structure = ndimage.generate_binary_structure(3, 3)
    if in_plane_only:
        structure[0] = False
        structure[2] = False
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    label_map = np.zeros(selection.winner.shape, dtype=np.uint8)
    candidates: list[_Candidate] = []
    for label in labels:
        mask = selection.winner == label.value
        region = _bounding_box(mask)
        if region is None:
            continue
        # Label only inside the foreground's bounding box: int32 labels of the whole volume cost 4x it.
        components, count = ndimage.label(mask[region], structure=structure)
        del mask
        foreground = components > 0
        ids = components[foreground]
        counts = np.bincount(ids, minlength=count + 1)
        scores = np.zeros(count + 1, dtype=np.float64)
        np.maximum.at(scores, ids, selection.probability[region][foreground])
        del foreground, ids
        keep = (scores >= label.min_score) & (counts * voxel_mm3 >= label.min_volume_mm3)
        if lung is not None and label.min_lung_fraction > 0.0:
            inside = np.bincount(components[lung[region]], minlength=count + 1)
            keep &= inside >= label.min_lung_fraction * counts
        keep[0] = False
        kept = [int(i) for i in np.flatnonzero(keep)]
        kept.sort(key=lambda i: (-scores[i], -counts[i], i))
        boxes = ndimage.find_objects(components)
        for component in kept[: label.max_findings]:
            local = boxes[component - 1]
            assert local is not None  # every id in 1..count has voxels
            box = tuple(
                slice(outer.start + inner.start, outer.start + inner.stop)
                for outer, inner in zip(region, local, strict=True)
            )
            piece = components[local] == component
            label_map[box][piece] = label.value
            candidates.append(
                _measure(
                    label,
                    mask=piece,
                    box=box,
                    score=float(scores[component]),
                    voxel_mm3=voxel_mm3,
                    volume=volume,
                )
            )
        del components
    candidates.sort(key=lambda c: (-c.score, c.label.value, -c.voxel_count, c.first_voxel))
    findings = tuple(
        Finding(
            number=number,
            finding_class=c.label.finding_class,
            score=c.score,
            voxel_count=c.voxel_count,
            volume_mm3=c.volume_mm3,
            longest_diameter_mm=c.longest_diameter_mm,
            centroid_mm=c.centroid_mm,
            slice_indices=c.slice_indices,
        )
        for number, c in enumerate(candidates, start=1)
    )
    return findings, label_map


def _bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``; None when there is none."""
    box: list[slice] = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _measure(
    label: LabelSpec,
    *,
    mask: npt.NDArray[np.bool_],
    box: tuple[slice, ...],
    score: float,
    voxel_mm3: float,
    volume: Volume,
) -> _Candidate:
    offset = np.array([s.start for s in box], dtype=np.float64)
    voxels = int(mask.sum())
    centre = np.asarray(ndimage.center_of_mass(mask), dtype=np.float64) + offset
    slices = np.flatnonzero(mask.any(axis=(1, 2))) + box[0].start
    first = np.argwhere(mask)[0] + offset.astype(np.int64)
    return _Candidate(
        label=label,
        score=min(1.0, max(0.0, score)),
        voxel_count=voxels,
        volume_mm3=voxels * voxel_mm3,
        longest_diameter_mm=longest_diameter_mm(mask, volume.spacing_mm),
        centroid_mm=volume.voxel_to_patient((float(centre[0]), float(centre[1]), float(centre[2]))),
        slice_indices=tuple(int(s) for s in slices),
        first_voxel=(int(first[0]), int(first[1]), int(first[2])),
    )


def longest_diameter_mm(mask: npt.NDArray[np.bool_], spacing_mm: tuple[float, ...]) -> float:
    """Largest distance in mm between two voxel centres of ``mask`` (orthonormal grid assumed).

    Only boundary voxels can be the ends of the longest chord, and only convex-hull vertices among
    them: the hull keeps this cheap for large components.
    """
    axes = tuple(a for a in range(mask.ndim) if mask.shape[a] > 1)
    if not axes:
        return 0.0
    flat = mask.reshape(tuple(mask.shape[a] for a in axes))
    inner = ndimage.binary_erosion(flat, structure=ndimage.generate_binary_structure(flat.ndim, 1))
    points = np.argwhere(flat & ~inner).astype(np.float64) * np.array([spacing_mm[a] for a in axes])
    if len(points) >= _HULL_MIN_POINTS and points.shape[1] >= 2:
        points = _hull_vertices(points)
    return _max_pairwise_distance(points)


def _hull_vertices(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    try:
        return np.asarray(points[ConvexHull(points).vertices], dtype=np.float64)
    except QhullError:  # degenerate (e.g. all points on one oblique plane): all pairs instead
        return points


def _max_pairwise_distance(points: npt.NDArray[np.float64]) -> float:
    count = len(points)
    block = max(1, _PAIR_BLOCK // max(count, 1))
    best = 0.0
    for start in range(0, count, block):
        diff = points[start : start + block, None, :] - points[None, :, :]
        best = max(best, float(np.einsum("ijk,ijk->ij", diff, diff).max()))
    return float(np.sqrt(best))
