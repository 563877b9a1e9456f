"""Anatomical gates for findings: the lung field of a chest CT.

A lung-lesion model's false positives sit mostly outside the lungs (heart border, hila, diaphragm,
upper abdomen, neck). :func:`lung_field` finds the lungs by Hounsfield units alone, so a model
package can require a finding to lie mostly inside them, or within a margin of them
(``min_lung_fraction`` and ``lung_margin_mm`` in its manifest, ``models/MANIFEST.md``).

Method, on a grid of about 2 mm in plane (voxels taken with a stride, not interpolated): voxels
below -400 HU, minus the air outside the body (components touching the in-plane border); the two
largest remaining components are the lungs (the second only if at least a tenth of the first);
then a 10 mm in-plane closing and per-slice hole filling take in vessels, nodules and lesions at
the pleura or the mediastinum. The mask is repeated back onto the native grid.

:class:`LungField` does the closing and filling only for the slices asked about (they are
independent per slice), inside the lungs' bounding box, and maps only the asked box back onto the
native grid: a postprocessing step that gates a few findings pays for a few slices.

:func:`lung_gate` also tells a finding's side. The lungs are often one component (joined at the
trachea), so the midline is the middle of the lung field's extent across the patient (the image
columns must run along the patient's x axis, PS3.3 C.7.6.2.1.1: +x is the patient's left), and
each side must hold at least :data:`_MIN_SIDE_FRACTION` of the lung field (no side after a
pneumonectomy or a collapsed lung). A point within :data:`SIDE_MARGIN_MM` of the midline gets no
side: never a guessed one. Lobes are not told apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from scipy import ndimage

from reader.findings import Code
from reader.volume import Volume

__all__ = ["LEFT_LUNG", "RIGHT_LUNG", "SIDE_MARGIN_MM", "LungField", "LungGate", "lung_field", "lung_gate",
           "within_margin"]

LEFT_LUNG = Code("44029006", "SCT", "Left lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
SIDE_MARGIN_MM = 15.0  # points nearer than this to the midline get no side
_MIN_SIDE_FRACTION = 0.2  # each side of the midline holds at least this fraction of the lung field
_ALONG_X = 0.9  # |row direction cosine x| at least this: image columns run along the patient's x

log = structlog.get_logger(__name__)

_AIR_HU = -400.0
_GRID_MM = 2.0
_CLOSING_MM = 10.0
_SLAB = 32  # slices converted to HU at a time while thresholding
_Box = tuple[slice, slice, slice]


def _disk(radius: int) -> npt.NDArray[np.bool_]:
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    structure = np.zeros((1, 2 * radius + 1, 2 * radius + 1), dtype=bool)
    structure[0] = xx * xx + yy * yy <= radius * radius
    return structure


def _stride(spacing_mm: tuple[float, float, float]) -> int:
    return max(1, round(_GRID_MM / min(spacing_mm[1], spacing_mm[2])))


class LungField:
    """The lungs of one volume; :meth:`mask` gives the native-grid mask of any box.

    Build it with :meth:`of_volume` or :meth:`of_voxels`; both return None when no lungs are found.
    """

    def __init__(self, lungs: npt.NDArray[np.bool_], stride: int, radius: int,
                 native_shape: tuple[int, int, int]) -> None:
        self._lungs = lungs  # the kept components on the strided grid, before closing
        self._closed = np.zeros(lungs.shape, dtype=bool)
        self._done = np.zeros(lungs.shape[0], dtype=bool)
        self._stride = stride
        self._radius = radius
        self._shape = native_shape

    @classmethod
    def of_volume(cls, volume: Volume) -> LungField | None:
        """The lung field of ``volume``, thresholding its HU on the strided grid a slab at a time."""
        stride = _stride(volume.spacing_mm)
        step = slice(None, None, stride)
        slices = volume.shape[0]
        small = np.empty((slices, len(range(volume.shape[1])[step]), len(range(volume.shape[2])[step])),
                         dtype=bool)
        for start in range(0, slices, _SLAB):
            stop = min(slices, start + _SLAB)
            np.less(volume.hu((slice(start, stop), step, step)), _AIR_HU, out=small[start:stop])
        components, count = _label(small)
        del small  # before the lungs' own mask is made
        return cls._of_components(components, count, stride, volume.spacing_mm, volume.shape)

    @classmethod
    def of_voxels(cls, voxels: npt.NDArray[np.float32],
                  spacing_mm: tuple[float, float, float]) -> LungField | None:
        """The lung field of a float32 HU array."""
        stride = _stride(spacing_mm)
        components, count = _label(voxels[:, ::stride, ::stride] < _AIR_HU)
        shape = (int(voxels.shape[0]), int(voxels.shape[1]), int(voxels.shape[2]))
        return cls._of_components(components, count, stride, spacing_mm, shape)

    @classmethod
    def _of_components(cls, components: npt.NDArray[np.integer[Any]], count: int, stride: int,
                       spacing_mm: tuple[float, float, float],
                       native_shape: tuple[int, int, int]) -> LungField | None:
        """The two largest air components not touching the in-plane border: the lungs."""
        if count == 0:
            return None
        sizes = np.zeros(count + 1, dtype=np.int64)
        for start in range(0, components.shape[0], _SLAB):  # bincount widens to int64: a slab at a time
            sizes += np.bincount(components[start:start + _SLAB].ravel(), minlength=count + 1)
        outside = np.unique(np.concatenate([components[:, 0, :].ravel(), components[:, -1, :].ravel(),
                                            components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
        sizes[outside] = 0
        sizes[0] = 0
        largest = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0]
        if not largest:
            log.info("anatomy.lung_field_missing")
            return None
        keep = [i for i in largest if sizes[i] >= 0.1 * sizes[largest[0]]]
        lungs = components == keep[0]  # np.isin would make an index copy of the whole array
        for other in keep[1:]:
            lungs |= components == other
        del components
        radius = max(1, round(_CLOSING_MM / (stride * spacing_mm[1])))
        return cls(lungs, stride, radius, native_shape)

    def midline_column(self) -> float | None:
        """The native column half-way across the lung field, or None when one side holds less than
        :data:`_MIN_SIDE_FRACTION` of it."""
        per_column = self._lungs.sum(axis=(0, 1), dtype=np.int64)
        columns = np.flatnonzero(per_column)
        if columns.size == 0:
            return None
        middle = (int(columns[0]) + int(columns[-1]) + 1) / 2.0  # strided grid, between pixel edges
        total = float(per_column.sum())
        below = float(per_column[: int(middle)].sum())
        if min(below, total - below) < _MIN_SIDE_FRACTION * total:
            return None
        return middle * self._stride

    def mask(self, box: _Box | None = None) -> npt.NDArray[np.bool_]:
        """The lungs on the native grid inside ``box`` (unit steps; None: the whole volume)."""
        whole = (slice(None), slice(None), slice(None))
        z, y, x = (range(size)[b] for size, b in zip(self._shape, box or whole, strict=True))
        if len(z) == 0 or len(y) == 0 or len(x) == 0:
            return np.zeros((len(z), len(y), len(x)), dtype=bool)
        self._close(z.start, z.stop)
        s = self._stride
        rows = np.arange(y.start, y.stop) // s  # native index -> strided-grid index
        columns = np.arange(x.start, x.stop) // s
        return np.ascontiguousarray(self._closed[z.start:z.stop][:, rows][:, :, columns])

    def _close(self, start: int, stop: int) -> None:
        """Close (10 mm disk) and fill holes in the slices ``start:stop`` not done yet.

        Both are per-slice operations (the disk is flat), and their result lies within the
        lungs' bounding box grown by the radius; computed in that box grown by one more pixel,
        whose rim is then background on every side, the holes are the same as in the full slice.
        """
        todo = np.flatnonzero(~self._done[start:stop]) + start
        if todo.size == 0:
            return
        first, last = int(todo[0]), int(todo[-1]) + 1
        lungs = self._lungs[first:last]
        rows = np.flatnonzero(lungs.any(axis=(0, 2)))
        if rows.size:
            columns = np.flatnonzero(lungs.any(axis=(0, 1)))
            margin = self._radius + 1
            r0, r1 = max(0, int(rows[0]) - margin), min(lungs.shape[1], int(rows[-1]) + 1 + margin)
            c0, c1 = max(0, int(columns[0]) - margin), min(lungs.shape[2], int(columns[-1]) + 1 + margin)
            closed = ndimage.binary_closing(lungs[:, r0:r1, c0:c1], structure=_disk(self._radius))
            for k in range(closed.shape[0]):
                if not self._done[first + k]:
                    self._closed[first + k, r0:r1, c0:c1] = ndimage.binary_fill_holes(closed[k])
        self._done[first:last] = True


def _label(air: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.integer[Any]], int]:
    """Connected components of ``air``, numbered in uint16 (half of int32) unless there are too many."""
    try:
        components, count = ndimage.label(air, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth": more than 65535 components
        components, count = ndimage.label(air)
    return np.asarray(components), int(count)


def lung_field(voxels: npt.NDArray[np.float32],
               spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.bool_] | None:
    """Boolean mask of the lungs on the native grid of ``voxels`` (HU), or None when no lungs are
    found (not a chest CT, or the body touches the field of view all round)."""
    field = LungField.of_voxels(voxels, spacing_mm)
    return None if field is None else field.mask()


class LungGate:
    """The lung field of one volume, built on first use: ``gate(box, margin_mm)`` is the native mask
    of ``box`` of the lung field grown by the margin (None: no lungs found), ``gate.site(point)``
    the side of a point (:data:`LEFT_LUNG`, :data:`RIGHT_LUNG`, or None when unsure)."""

    def __init__(self, volume: Volume) -> None:
        self._volume = volume
        self._built: list[LungField | None] = []

    def _field(self) -> LungField | None:
        if not self._built:
            self._built.append(LungField.of_volume(self._volume))
        return self._built[0]

    def _mask(self, box: _Box) -> npt.NDArray[np.bool_] | None:
        field = self._field()
        return None if field is None else field.mask(box)

    def __call__(self, box: tuple[slice, ...], margin_mm: float = 0.0, /) -> npt.NDArray[np.bool_] | None:
        v = self._volume
        return within_margin(self._mask, (box[0], box[1], box[2]), margin_mm, v.spacing_mm, v.shape)

    def site(self, point_mm: tuple[float, float, float], /) -> Code | None:
        v = self._volume
        if abs(v.row_cosines[0]) < _ALONG_X:
            return None
        field = self._field()
        middle = None if field is None else field.midline_column()
        if middle is None:
            return None
        # the point's column, then its distance from the midline along the patient's x axis
        column = sum((p - o) * r for p, o, r in zip(point_mm, v.origin_mm, v.row_cosines, strict=True))
        offset_mm = (column - (middle - 0.5) * v.spacing_mm[2]) * np.sign(v.row_cosines[0])
        if abs(offset_mm) < SIDE_MARGIN_MM:
            return None
        return LEFT_LUNG if offset_mm > 0 else RIGHT_LUNG


def lung_gate(volume: Volume) -> LungGate:
    """The :class:`LungGate` of ``volume`` (its lung field is built on first use)."""
    return LungGate(volume)


def within_margin(field_mask: Callable[[_Box], npt.NDArray[np.bool_] | None], box: _Box, margin_mm: float,
                  spacing_mm: tuple[float, float, float],
                  shape: tuple[int, int, int]) -> npt.NDArray[np.bool_] | None:
    """The voxels of ``box`` at most ``margin_mm`` (Euclidean, in mm) from the mask ``field_mask``
    gives; with a zero margin, the mask itself. Lesions at the pleura or the hilum, which a lung
    field of aerated lung leaves out, lie within a few millimetres of it (``lung_margin_mm``)."""
    if margin_mm <= 0.0:
        return field_mask(box)
    ranges = [range(n)[b] for n, b in zip(shape, box, strict=True)]
    pads = [math.ceil(margin_mm / s) for s in spacing_mm]
    grown = tuple(slice(max(0, r.start - p), min(n, r.stop + p))
                  for r, p, n in zip(ranges, pads, shape, strict=True))
    mask = field_mask((grown[0], grown[1], grown[2]))
    if mask is None:
        return None
    inner = tuple(slice(r.start - g.start, r.stop - g.start) for r, g in zip(ranges, grown, strict=True))
    if not mask.any():
        return np.zeros(mask[inner].shape, dtype=bool)
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return np.asarray(distance[inner] <= margin_mm, dtype=np.bool_)
