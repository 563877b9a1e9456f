"""Detection models (``output.kind = "boxes"``): boxes on the model grid -> findings on the native grid.

The contract (``models/MANIFEST.md``, "Boxes models"): the model runs once on the whole prepared
image, a 3-D model on the volume ``(1, 1, D, H, W)``, a 2-D model on each slice ``(1, 1, H, W)``,
padded at the far end of each axis up to ``patch_size``. It outputs one float tensor of shape
``(N, 8)`` (3-D) ``[x0, y0, z0, x1, y1, z1, score, label]`` or ``(N, 6)`` (2-D)
``[x0, y0, x1, y1, score, label]``, a leading axis of 1 allowed. Coordinates are pixel edges of the
model's input, as torchvision and COCO have them: x is the column, y the row, z the slice, and
(0, 0) is the top-left corner of the first pixel, so a box around pixel (r, c) alone is
``[c, r, c + 1, r + 1]``. ``score`` is in [0, 1], ``label`` a label value of the manifest.

The node maps each box back to the native grid (the grids are corner-aligned, as in
:mod:`reader.inference.preprocess`), drops boxes under their label's ``min_score``, suppresses
overlaps per label (greedy non-maximum suppression at ``output.nms_iou``), keeps the
``max_findings`` best per label and numbers the findings 1..N by descending score. A row scoring
below every label's ``min_score`` is ignored whatever it holds (padding rows of a fixed-size
output); any other row must be well formed, or the whole output is refused with
:class:`reader.errors.InferenceError`: non-finite values, a score outside [0, 1], an unknown label,
corners not in order (x1 <= x0), or a box that lies wholly outside the model input. A box reaching
past the image is clipped to it (detectors do draw boxes over the edge); one that lies only in the
padding is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from reader.errors import InferenceError
from reader.findings import Finding, Outline
from reader.inference.manifest import LabelSpec, ModelManifest
from reader.volume import Volume

__all__ = ["Box", "Runner", "boxes_to_findings", "detect", "non_maximum_suppression", "read_boxes"]

# One padded image (spatial axes only) through the graph -> its raw output tensor.
Runner = Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]

_EPS = 1e-3  # a box edge this close to a pixel edge (in pixels) counts as on it: float32 outputs


@dataclass(frozen=True)
class Box:
    """A box as edge coordinates ``(slice, row, column)``: it covers ``lo[a] <= u <= hi[a]`` per axis."""

    label: LabelSpec
    score: float
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @property
    def volume(self) -> float:
        """The box's size in (model or native) voxels."""
        return math.prod(h - lo for lo, h in zip(self.lo, self.hi, strict=True))


def detect(
    image: npt.NDArray[np.float32],
    *,
    run: Runner,
    manifest: ModelManifest,
    volume: Volume,
    fill: float | None,
) -> tuple[Finding, ...]:
    """Findings of a boxes model on the prepared ``image`` (slices, rows, columns) of ``volume``.

    ``fill`` pads the image up to ``patch_size`` (``None``: with the image minimum).
    """
    patch = manifest.preprocessing.patch_size
    labels = manifest.labels
    grid = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    found: list[Box] = []
    if manifest.input.dimensions == 3:
        raw = run(_pad_to(image, patch, fill))
        found += read_boxes(
            raw, labels, image_shape=grid, input_shape=_padded(grid, patch), name=_name(manifest)
        )
    else:
        in_plane = (grid[1], grid[2])
        for index in range(grid[0]):
            raw = run(_pad_to(image[index], patch, fill))
            found += read_boxes(
                raw, labels, image_shape=in_plane, input_shape=_padded(in_plane, patch),
                name=_name(manifest), slice_index=index,
            )
    native = [_to_native(box, grid, volume.shape) for box in found]
    kept = non_maximum_suppression([b for b in native if b is not None], manifest.output.nms_iou)
    return boxes_to_findings(kept, volume)


def _name(manifest: ModelManifest) -> str:
    return f"{manifest.model.name} output {manifest.output.tensor!r}"


def _padded(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(s, p) for s, p in zip(shape, patch, strict=True))


def _pad_to(
    image: npt.NDArray[np.float32], patch: Sequence[int], fill: float | None
) -> npt.NDArray[np.float32]:
    """``image`` padded at the far end of each axis up to ``patch``; coordinates stay the same."""
    pads = [(0, max(0, p - s)) for s, p in zip(image.shape, patch, strict=True)]
    if not any(after for _, after in pads):
        return image
    value = float(image.min()) if fill is None else fill
    return np.pad(image, pads, mode="constant", constant_values=value)


def read_boxes(
    raw: npt.NDArray[Any],
    labels: Sequence[LabelSpec],
    *,
    image_shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    name: str,
    slice_index: int | None = None,
) -> list[Box]:
    """The boxes a model output holds that reach their label's ``min_score``, clipped to the image.

    ``image_shape`` is the prepared image's (slices, rows, columns), or (rows, columns) with the
    ``slice_index`` of a 2-D model; ``input_shape`` the same padded, as the model saw it. Boxes are
    returned on the model grid as edge coordinates (slice, row, column). Raises
    :class:`InferenceError` for an output that breaks the contract (module docstring).
    """
    dims = len(image_shape)
    width = 2 * dims + 2
    out = np.asarray(raw)
    if out.ndim == 3 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 2 or out.shape[1] != width:
        raise InferenceError(
            f"{name} has shape {tuple(np.asarray(raw).shape)}, expected (N, {width}) boxes "
            f"[{', '.join(_columns(dims))}]"
        )
    if out.dtype.kind not in "fiu":
        raise InferenceError(f"{name} holds {out.dtype}, expected numbers")
    values = out.astype(np.float64)
    if not np.isfinite(values).all():
        raise InferenceError(f"{name} holds NaN or infinite values")
    scores = values[:, 2 * dims]
    outside = scores[(scores < 0.0) | (scores > 1.0)]
    if outside.size:
        raise InferenceError(f"{name} has scores outside [0, 1]: {sorted(set(outside.tolist()))[:5]}")
    by_value = {label.value: label for label in labels}
    floor = min(label.min_score for label in labels)
    boxes: list[Box] = []
    for row in values[scores >= floor]:
        score, value = float(row[2 * dims]), float(row[2 * dims + 1])
        label = by_value.get(int(value)) if value.is_integer() else None
        if label is None:
            raise InferenceError(f"{name} has a box of label {value:g}, not among {sorted(by_value)}")
        # (x, y[, z]) in the output -> (slice, row, column) order
        lo_xyz, hi_xyz = row[:dims], row[dims : 2 * dims]
        lo, hi = tuple(float(v) for v in lo_xyz[::-1]), tuple(float(v) for v in hi_xyz[::-1])
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            raise InferenceError(f"{name} has a box with corners not in order (x0 < x1 ...): {row.tolist()}")
        if any(h <= 0.0 or low >= size for low, h, size in zip(lo, hi, input_shape, strict=True)):
            raise InferenceError(
                f"{name} has a box outside the model input {tuple(input_shape[::-1])} (x, y[, z]): "
                f"{row.tolist()}; coordinates must be pixels of the input"
            )
        if score < label.min_score:
            continue
        lo = tuple(max(0.0, v) for v in lo)
        hi = tuple(min(float(size), v) for v, size in zip(hi, image_shape, strict=True))
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue  # only in the padding
        if slice_index is not None:
            lo, hi = (float(slice_index), *lo), (float(slice_index + 1), *hi)
        boxes.append(Box(label=label, score=score, lo=_three(lo), hi=_three(hi)))
    return boxes


def _columns(dims: int) -> list[str]:
    axes = ["x", "y", "z"][:dims]
    return [f"{a}0" for a in axes] + [f"{a}1" for a in axes] + ["score", "label"]


def _three(values: tuple[float, ...]) -> tuple[float, float, float]:
    return (values[0], values[1], values[2])


def _to_native(box: Box, grid: tuple[int, int, int], native: tuple[int, int, int]) -> Box | None:
    """``box`` (edge coordinates on the model grid) on the native grid, clipped to it.

    The grids are corner-aligned: voxel centre i of the model grid (edge coordinate i + 0.5) lies at
    native centre ``i * (native - 1) / (grid - 1)``.
    """
    lo: list[float] = []
    hi: list[float] = []
    for a in range(3):
        scale = (native[a] - 1) / (grid[a] - 1) if grid[a] > 1 else 1.0
        lo.append(max(0.0, (box.lo[a] - 0.5) * scale + 0.5))
        hi.append(min(float(native[a]), (box.hi[a] - 0.5) * scale + 0.5))
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return Box(label=box.label, score=box.score, lo=_three(tuple(lo)), hi=_three(tuple(hi)))


def _iou(a: Box, b: Box) -> float:
    inter = math.prod(
        max(0.0, min(ah, bh) - max(al, bl)) for al, ah, bl, bh in zip(a.lo, a.hi, b.lo, b.hi, strict=True)
    )
    if inter <= 0.0:
        return 0.0
    return inter / (a.volume + b.volume - inter)


def non_maximum_suppression(boxes: Sequence[Box], iou: float) -> list[Box]:
    """Per label, best score first: drop a box whose IoU with a kept one exceeds ``iou``; keep at most
    the label's ``max_findings``. Returns every kept box, best score first (ties: label, then order)."""
    kept: list[Box] = []
    for value in sorted({b.label.value for b in boxes}):
        ranked = sorted((b for b in boxes if b.label.value == value), key=lambda b: -b.score)
        chosen: list[Box] = []
        for box in ranked:
            if len(chosen) == box.label.max_findings:
                break
            if all(_iou(box, other) <= iou for other in chosen):
                chosen.append(box)
        kept += chosen
    return sorted(kept, key=lambda b: -b.score)


def boxes_to_findings(boxes: Sequence[Box], volume: Volume) -> tuple[Finding, ...]:
    """One :class:`Finding` per box (native edge coordinates), numbered 1..N in the given order."""
    return tuple(_finding(number, box, volume) for number, box in enumerate(boxes, start=1))


def _finding(number: int, box: Box, volume: Volume) -> Finding:
    """The finding of one box: its rectangle on its centre slice, its sides, centre and slices."""
    (z0, y0, x0), (z1, y1, x1) = box.lo, box.hi
    covered = [
        range(math.floor(low + _EPS), max(math.floor(low + _EPS) + 1, math.ceil(h - _EPS)))
        for low, h in zip(box.lo, box.hi, strict=True)
    ]
    slices = covered[0]
    key = min(max(math.floor((z0 + z1) / 2.0), slices.start), slices.stop - 1)
    sides = sorted(((x1 - x0) * volume.spacing_mm[2], (y1 - y0) * volume.spacing_mm[1]))
    centre = ((z0 + z1) / 2.0 - 0.5, (y0 + y1) / 2.0 - 0.5, (x0 + x1) / 2.0 - 0.5)
    return Finding(
        number=number,
        finding_class=box.label.finding_class,
        score=box.score,
        voxel_count=math.prod(len(r) for r in covered),
        volume_mm3=None,
        longest_diameter_mm=sides[1],
        short_axis_mm=sides[0],
        centroid_mm=volume.voxel_to_patient(centre),
        slice_indices=tuple(slices),
        outline=Outline(slice_index=key, points=((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))),
    )
