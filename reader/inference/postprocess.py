"""Native-grid probabilities -> findings: threshold, connected components, measurements.

Each finding becomes one TID 1500 measurement group (PS3.16 TID 1411 Volumetric ROI
Measurements) and one SEG segment of its own (PS3.3 C.8.20.2): the label map holds each kept
component as its finding number. Measured: volume, longest diameter (the largest distance between
two voxel centres of the component), centroid in patient coordinates (PS3.3 C.7.6.2.1.1), the
slices it touches, its key slice (where its area is largest) with its outline there, and, where
the package's anatomy can tell, its side (``LungGate.site``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from reader.findings import Code, Finding, Outline
from reader.inference import anatomy
from reader.inference.manifest import LabelSpec
from reader.volume import Volume

__all__ = [
    "Box",
    "ChannelSelection",
    "LungGate",
    "Piece",
    "extract_findings",
    "findings_from_pieces",
    "longest_diameter_mm",
    "outline_of",
    "select_labels",
]

MAX_FINDINGS = 255  # label-map values are finding numbers (uint8): at most this many per series

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
    outline: Outline
    box: tuple[slice, ...]
    mask: npt.NDArray[np.bool_]


Box = tuple[slice, ...]
# (native box, values): a part of a label's native-grid probabilities; zero outside every part.
Piece = tuple[Box, npt.NDArray[np.float32]]
# (box, margin mm) -> the native mask of that box of the lung field grown by the margin, or None
# when the volume has no lung field.
BoxGate = Callable[[Box, float], npt.NDArray[np.bool_] | None]


class LungGate(Protocol):
    """The lung field of one volume (``reader.inference.anatomy.lung_gate``)."""

    def __call__(self, box: Box, margin_mm: float, /) -> npt.NDArray[np.bool_] | None:
        """The native mask of ``box`` of the lung field grown by ``margin_mm``; None: no lungs."""

    def site(self, point_mm: tuple[float, float, float], /) -> Code | None:
        """The side (left or right lung) of a point in patient coordinates; None when unsure."""


@dataclass(frozen=True, eq=False)
class _Component:
    """A connected component of one label that passed the score, volume and lung filters."""

    score: float
    count: int
    ids: npt.NDArray[np.int32]  # component ids of the box it was found in
    ident: int
    origin: tuple[int, ...]  # where ``ids[0, 0, 0]`` lies in the volume
    local: Box  # its bounding box inside ``ids``

    @property
    def box(self) -> Box:
        return tuple(
            slice(o + inner.start, o + inner.stop) for o, inner in zip(self.origin, self.local, strict=True)
        )

    def mask(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.ids[self.local] == self.ident, dtype=np.bool_)

    def first_voxel(self) -> tuple[int, ...]:
        """Its first voxel in raster order: ``ndimage.label`` numbers components in that order."""
        first = np.argwhere(self.mask())[0]
        return tuple(int(f) + b.start for f, b in zip(first, self.box, strict=True))


def _structure(in_plane_only: bool) -> npt.NDArray[np.bool_]:
    structure = np.asarray(ndimage.generate_binary_structure(3, 3), dtype=np.bool_)
    if in_plane_only:
        structure[0] = False
        structure[2] = False
    return structure


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
    ``min_lung_fraction``, enough of it lies in the lungs or within ``lung_margin_mm`` of them);
    then the ``max_findings`` best per label.
    Returns the findings and a uint8 label map holding only the kept components.
    """
    labels = tuple(labels)
    structure = _structure(in_plane_only)
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    origin = (0,) * selection.winner.ndim
    gate: BoxGate | None = None
    if lung is not None:
        field = lung
        shape = (int(field.shape[0]), int(field.shape[1]), int(field.shape[2]))

        def gate(box: Box, margin_mm: float) -> npt.NDArray[np.bool_] | None:
            return anatomy.within_margin(
                lambda b: field[b], (box[0], box[1], box[2]), margin_mm, volume.spacing_mm, shape
            )

    found = {
        label.value: _components(
            label, selection, origin=origin, structure=structure, voxel_mm3=voxel_mm3, lung=gate
        )
        for label in labels
    }
    return _findings(labels, found, volume, selection.winner.shape, voxel_mm3, site=None)


def findings_from_pieces(
    channels: Sequence[tuple[LabelSpec, Sequence[Piece]]],
    volume: Volume,
    in_plane_only: bool,
    lung: LungGate | None = None,
) -> tuple[tuple[Finding, ...], npt.NDArray[np.uint8]]:
    """:func:`extract_findings` of :func:`select_labels` for probabilities given as pieces.

    Each label's probabilities are the pieces (later ones overwrite earlier ones where they
    overlap) and zero elsewhere, which must not reach its threshold (> 0). Pieces that overlap or
    touch are gathered into clusters: no component can cross from one cluster to another, so
    labels are selected and components found cluster by cluster, never on the whole volume. The
    results are exactly those of the dense path. Piece lists are emptied as their pieces are
    used, so that each piece's memory goes once it has been copied into its cluster.
    """
    shape = volume.shape
    structure = _structure(in_plane_only)
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    labels = tuple(label for label, _ in channels)
    if any(label.threshold <= 0.0 for label in labels):
        raise ValueError("a zero threshold selects voxels outside every piece: use the dense path")
    found: dict[int, list[_Component]] = {label.value: [] for label in labels}
    for cluster in _clusters([box for _, pieces in channels for box, _ in pieces]):
        size = tuple(b.stop - b.start for b in cluster)
        local: list[tuple[LabelSpec, npt.NDArray[np.float32]]] = []
        for label, pieces in channels:
            inside = [(box, values) for box, values in pieces if _contains(cluster, box)]
            if not inside:
                continue
            if isinstance(pieces, list):  # consumed: each piece lies in one cluster only
                pieces[:] = [(box, values) for box, values in pieces if not _contains(cluster, box)]
            probability = np.zeros(size, dtype=np.float32)
            for box, values in inside:
                probability[_shift(box, cluster)] = values
            del inside
            local.append((label, probability))
        selection = _select_in_place(local[0]) if len(local) == 1 else select_labels(local, size)
        del local
        origin = tuple(b.start for b in cluster)
        gate: BoxGate | None = None
        if lung is not None:
            gate = _shifted_gate(lung, cluster)
        for label in labels:
            found[label.value].extend(
                _components(
                    label, selection, origin=origin, structure=structure, voxel_mm3=voxel_mm3, lung=gate
                )
            )
    return _findings(labels, found, volume, shape, voxel_mm3, site=None if lung is None else lung.site)


def _select_in_place(channel: tuple[LabelSpec, npt.NDArray[np.float32]]) -> ChannelSelection:
    """:func:`select_labels` of one label, reusing its (private) probability array as ``probability``."""
    label, probability = channel
    take = probability >= np.float32(label.threshold)
    winner = np.zeros(probability.shape, dtype=np.uint8)
    winner[take] = label.value
    np.logical_not(take, out=take)
    probability[take] = 0.0
    return ChannelSelection(winner=winner, probability=probability)


def _shifted_gate(lung: BoxGate, cluster: Box) -> BoxGate:
    """The gate of a cluster: local boxes are offset by the cluster's corner."""

    def gate(box: Box, margin_mm: float) -> npt.NDArray[np.bool_] | None:
        return lung(
            tuple(slice(c.start + b.start, c.start + b.stop) for c, b in zip(cluster, box, strict=True)),
            margin_mm,
        )

    return gate


def _contains(outer: Box, inner: Box) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner, strict=True))


def _shift(box: Box, cluster: Box) -> Box:
    return tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, cluster, strict=True))


def _clusters(boxes: Sequence[Box]) -> list[Box]:
    """Bounding boxes of groups of ``boxes`` that overlap or touch (26-connectivity), transitively."""
    merged: list[list[int]] = [[v for b in box for v in (b.start, b.stop)] for box in boxes]
    changed = True
    while changed:
        changed = False
        out: list[list[int]] = []
        for box in merged:
            for other in out:
                if all(
                    box[2 * a] <= other[2 * a + 1] and other[2 * a] <= box[2 * a + 1]
                    for a in range(len(box) // 2)
                ):
                    for a in range(len(box) // 2):
                        other[2 * a] = min(other[2 * a], box[2 * a])
                        other[2 * a + 1] = max(other[2 * a + 1], box[2 * a + 1])
                    changed = True
                    break
            else:
                out.append(list(box))
        merged = out
    return sorted(tuple(slice(m[2 * a], m[2 * a + 1]) for a in range(len(m) // 2)) for m in merged)


def _components(
    label: LabelSpec,
    selection: ChannelSelection,
    *,
    origin: tuple[int, ...],
    structure: npt.NDArray[np.bool_],
    voxel_mm3: float,
    lung: BoxGate | None,
) -> list[_Component]:
    """The components of ``label`` in ``selection`` (lying at ``origin``) that pass its filters."""
    mask = selection.winner == label.value
    region = _bounding_box(mask)
    if region is None:
        return []
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
    keep[0] = False
    if lung is not None and label.min_lung_fraction > 0.0 and keep.any():
        field = lung(region, label.lung_margin_mm)
        if field is not None:
            inside = np.bincount(components[field], minlength=count + 1)
            keep &= inside >= label.min_lung_fraction * counts
    boxes = ndimage.find_objects(components)
    corner = tuple(o + r.start for o, r in zip(origin, region, strict=True))
    found = []
    for ident in np.flatnonzero(keep):
        local = boxes[int(ident) - 1]
        assert local is not None  # every id in 1..count has voxels
        found.append(
            _Component(float(scores[ident]), int(counts[ident]), components, int(ident), corner, local)
        )
    return found


def _findings(
    labels: Sequence[LabelSpec],
    found: dict[int, list[_Component]],
    volume: Volume,
    shape: tuple[int, ...],
    voxel_mm3: float,
    *,
    site: Callable[[tuple[float, float, float]], Code | None] | None,
) -> tuple[tuple[Finding, ...], npt.NDArray[np.uint8]]:
    """The ``max_findings`` best components of each label, measured and numbered by descending
    score (at most :data:`MAX_FINDINGS`), and the label map holding each as its finding number."""
    candidates: list[_Candidate] = []
    for label in labels:
        ranked = sorted(found.get(label.value, []), key=lambda c: (-c.score, -c.count, c.first_voxel()))
        candidates.extend(
            _measure(label, mask=component.mask(), box=component.box, score=component.score,
                     voxel_mm3=voxel_mm3, volume=volume)
            for component in ranked[: label.max_findings]
        )
    candidates.sort(key=lambda c: (-c.score, c.label.value, -c.voxel_count, c.first_voxel))
    label_map = np.zeros(shape, dtype=np.uint8)
    findings = []
    for number, c in enumerate(candidates[:MAX_FINDINGS], start=1):
        label_map[c.box][c.mask] = number
        findings.append(Finding(
            number=number,
            finding_class=c.label.finding_class,
            score=c.score,
            voxel_count=c.voxel_count,
            volume_mm3=c.volume_mm3,
            longest_diameter_mm=c.longest_diameter_mm,
            centroid_mm=c.centroid_mm,
            slice_indices=c.slice_indices,
            outline=c.outline,
            site=None if site is None else site(c.centroid_mm),
        ))
    return tuple(findings), label_map


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
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))  # the first of the largest: deterministic
    return _Candidate(
        label=label,
        score=min(1.0, max(0.0, score)),
        voxel_count=voxels,
        volume_mm3=voxels * voxel_mm3,
        longest_diameter_mm=longest_diameter_mm(mask, volume.spacing_mm),
        centroid_mm=volume.voxel_to_patient((float(centre[0]), float(centre[1]), float(centre[2]))),
        slice_indices=tuple(int(s) for s in slices),
        first_voxel=(int(first[0]), int(first[1]), int(first[2])),
        outline=Outline(slice_index=key + box[0].start,
                        points=outline_of(mask[key], (box[1].start, box[2].start))),
        box=box,
        mask=mask,
    )


def outline_of(mask: npt.NDArray[np.bool_], corner: tuple[int, int]) -> tuple[tuple[float, float], ...]:
    """A closed polygon around the True pixels of a 2-D ``mask`` whose [0, 0] lies at (row, column)
    ``corner`` of the image: the convex hull of the pixels' corners, in SCOORD image coordinates
    (column, row; (0, 0) is the top-left corner of the top-left pixel), counter-clockwise on screen
    (scipy's order), last point = first. Every pixel of the mask lies inside it.
    """
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("an outline needs at least one pixel")
    r = rows.astype(np.float64) + corner[0]
    c = columns.astype(np.float64) + corner[1]
    corners = np.unique(np.concatenate([
        np.stack([c, r], axis=1), np.stack([c + 1, r], axis=1),
        np.stack([c, r + 1], axis=1), np.stack([c + 1, r + 1], axis=1),
    ]), axis=0)
    hull = ConvexHull(corners)  # >= 4 distinct corners, never collinear: a pixel is a square
    points = [(float(x), float(y)) for x, y in corners[hull.vertices]]
    return (*points, points[0])


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
