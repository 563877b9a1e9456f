"""Volume -> model input: resampling, intensity window and normalization, sliding-window inference.

Grids are corner-aligned: the first and last voxel centres of the native and the resampled grid
coincide along every axis, so resampling there and back (``scipy.ndimage.zoom``, linear) maps the
model's output onto the native voxels the SEG (PS3.3 C.8.20) refers to.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from reader.inference.manifest import Preprocessing
from reader.volume import Volume

__all__ = [
    "Predictor",
    "gaussian_weights",
    "normalize_inplace",
    "pad_value",
    "patch_starts",
    "resample",
    "resample_above",
    "resample_pieces",
    "resample_volume",
    "sliding_window",
    "target_shape",
]

Array = npt.NDArray[np.float32]
# One patch (spatial shape == patch size) -> (channels, *patch size) float32 probabilities.
Predictor = Callable[[Array], Array]

_MIN_WEIGHT = 1e-6  # floor of the gaussian weights, so every voxel of a patch counts a little


def target_shape(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    target_mm: tuple[float | None, float, float] | None,
) -> tuple[int, int, int]:
    """Shape of the volume resampled to ``target_mm``; ``None`` entries (and size-1 axes) stay native."""
    if target_mm is None:
        return shape
    out: list[int] = []
    for size, native, target in zip(shape, spacing_mm, target_mm, strict=True):
        if target is None or size == 1 or native <= 0.0:
            out.append(size)
        else:
            out.append(max(1, round((size - 1) * native / target) + 1))
    return (out[0], out[1], out[2])


def resample(array: Array, shape: tuple[int, ...], order: int = 1) -> Array:
    """``array`` resampled to ``shape`` (corner-aligned, linear by default), as a new float32 array."""
    if array.shape == shape:
        return array.astype(np.float32, copy=True)
    factors = [out / size for out, size in zip(shape, array.shape, strict=True)]
    result = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=False, prefilter=False)
    if result.shape != shape:  # zoom rounds in*factor; guard against a float rounding surprise
        raise ValueError(f"resampling gave {result.shape}, expected {shape}")
    return np.asarray(result, dtype=np.float32)


def resample_volume(volume: Volume, shape: tuple[int, int, int]) -> Array:
    """``resample(volume.voxels, shape)`` without a float32 HU copy of the whole volume.

    When every slice shares one Rescale Slope and Intercept (PS3.3 C.11.1.1.2), the stored
    integers are interpolated (in float64, as ``ndimage.zoom`` does internally) and the rescale is
    applied on the small model grid; it is linear, so this is the same interpolation of the same
    HU values. Otherwise the HU volume is computed as a temporary.
    """
    if volume.is_hu:
        return resample(volume.stored, shape)
    rescale = volume.uniform_rescale
    if volume.shape == shape or rescale is None or volume.stored.dtype.kind not in "iu":
        hu = volume.hu()
        return hu if hu.shape == shape else resample(hu, shape)
    factors = [out / size for out, size in zip(shape, volume.shape, strict=True)]
    result = np.asarray(
        ndimage.zoom(volume.stored, factors, order=1, mode="nearest", grid_mode=False,
                     prefilter=False, output=np.float64),
        dtype=np.float64,
    )
    if result.shape != shape:
        raise ValueError(f"resampling gave {result.shape}, expected {shape}")
    slope, intercept = rescale
    if slope != 1.0:
        result *= slope
    if intercept != 0.0:
        result += intercept
    return result.astype(np.float32)


def resample_pieces(
    array: Array, shape: tuple[int, ...], threshold: float
) -> Iterator[tuple[tuple[slice, ...], Array]]:
    """The parts of ``resample(array, shape)`` (linear) that can reach ``threshold``, one box at a time.

    A linearly interpolated voxel is a convex combination of its neighbours on the coarse grid, so
    it can reach ``threshold`` only next to a coarse voxel that does. Around each connected group of
    such voxels the native voxels are computed exactly and yielded as ``(native box, values)``;
    boxes may overlap (their common voxels have the same values). Nothing is yielded where no
    voxel can reach ``threshold``.
    """
    candidates = array >= np.float32(threshold)
    if not candidates.any():
        return
    grown = _grow_by_one(candidates)
    regions, _ = ndimage.label(grown)
    del candidates, grown
    scale = [
        (size - 1) / (out_size - 1) if out_size > 1 else 0.0
        for size, out_size in zip(array.shape, shape, strict=True)
    ]
    for box in ndimage.find_objects(regions):
        if box is None:
            continue
        if array.shape == shape:  # nothing to resample
            yield box, array[box]
            continue
        native = _native_span(box, scale, shape)
        if native is None:
            continue
        offset = [n.start * s - b.start for n, b, s in zip(native, box, scale, strict=True)]
        values = ndimage.affine_transform(
            array[box],
            np.asarray(scale),
            offset=offset,
            output_shape=tuple(n.stop - n.start for n in native),
            order=1,
            mode="nearest",
            prefilter=False,
        )
        yield native, np.asarray(values, dtype=np.float32)


def _grow_by_one(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``ndimage.binary_dilation`` by the full 3x3(x3) cube, as one shifted OR per axis and side.

    The cube is the sum of one 3-voxel line per axis, so dilating by each line in turn gives the
    same mask, at a fraction of the cost of testing 27 neighbours per voxel.
    """
    grown = mask.copy()
    for axis in range(mask.ndim):
        if mask.shape[axis] < 2:
            continue
        step = grown.copy()
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        step[tuple(upper)] |= grown[tuple(lower)]
        step[tuple(lower)] |= grown[tuple(upper)]
        grown = step
    return grown


def resample_above(array: Array, shape: tuple[int, ...], threshold: float) -> Array:
    """Like :func:`resample` (linear), but computed only where the result can reach ``threshold``.

    The pieces of :func:`resample_pieces` on a zero array of ``shape``: everywhere else the result
    is 0. The zeros are never written, so a negative series costs neither the full upsampling nor
    its memory.
    """
    if array.shape == shape:
        return array
    out = np.zeros(shape, dtype=np.float32)
    for native, values in resample_pieces(array, shape, threshold):
        out[native] = values
    return out


def _native_span(
    box: tuple[slice, ...], scale: list[float], shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Native indices whose coarse-grid coordinate (index * scale) lies inside ``box``."""
    span: list[slice] = []
    for b, s, size in zip(box, scale, shape, strict=True):
        if s == 0.0:
            span.append(slice(0, size))
            continue
        low = max(0, math.ceil(b.start / s - 1e-9))
        high = min(size - 1, math.floor((b.stop - 1) / s + 1e-9))
        if high < low:
            return None
        span.append(slice(low, high + 1))
    return tuple(span)


def normalize_inplace(image: Array, pre: Preprocessing) -> None:
    """Clip to the window, then scale to [0, 1] (``window``) or standardize (``zscore``), in place."""
    if pre.window is not None:
        low, high = pre.window
        np.clip(image, low, high, out=image)
    if pre.normalize == "window":
        assert pre.window is not None  # the manifest guarantees a window for this mode
        low, high = pre.window
        image -= np.float32(low)
        image *= np.float32(1.0 / (high - low))
    else:
        assert pre.mean is not None and pre.std is not None  # the manifest guarantees both
        image -= np.float32(pre.mean)
        image *= np.float32(1.0 / pre.std)


def pad_value(pre: Preprocessing) -> float | None:
    """The normalized value of "nothing" (window low); ``None``: pad with the image minimum."""
    if pre.window is None:
        return None
    low = pre.window[0]
    if pre.normalize == "window":
        return 0.0
    assert pre.mean is not None and pre.std is not None
    return (low - pre.mean) / pre.std


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of patches covering ``size`` voxels, evenly spread, first 0, last size - patch."""
    if size <= patch:
        return [0]
    step = max(1.0, patch * (1.0 - overlap))
    count = math.ceil((size - patch) / step) + 1
    return sorted({round(i * (size - patch) / (count - 1)) for i in range(count)})


def gaussian_weights(patch: tuple[int, ...]) -> Array:
    """Blending weights peaking at the patch centre (sigma = patch / 8), floored above zero."""
    weights = np.ones((), dtype=np.float64)
    for size in patch:
        axis = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        sigma = max(size / 8.0, 1e-3)
        weights = np.multiply.outer(weights, np.exp(-0.5 * (axis / sigma) ** 2))
    weights /= weights.max()
    return np.maximum(weights, _MIN_WEIGHT).astype(np.float32)


def sliding_window(
    image: Array,
    *,
    patch: tuple[int, ...],
    overlap: float,
    blend: str,
    channels: int,
    predict: Predictor,
    fill: float | None,
    mirror: tuple[int, ...] = (),
) -> Array:
    """Blend ``predict`` over overlapping patches of ``image``; returns ``(channels, *image.shape)``.

    ``mirror`` (voxels per axis; empty: none) first extends the image beyond each edge by its own
    mirror image (``numpy.pad`` mode "reflect"), so that a structure cut by the edge of the scan, such as a
    nodule on the first or last slices, reaches the network with context on both sides instead of
    at the edge of its input. An image still smaller than a patch along an axis is then padded
    (centred, with ``fill``, or its minimum when ``fill`` is None). The result is cropped back to
    ``image.shape``. Memory: the output and one weight map (and the mirrored copy, if any).
    """
    if image.ndim != len(patch):
        raise ValueError(f"image has {image.ndim} axes, patch {len(patch)}")
    if mirror and (len(mirror) != image.ndim or min(mirror) < 0):
        raise ValueError(f"mirror needs {image.ndim} non-negative widths, got {mirror}")
    shape = image.shape
    margins = mirror or (0,) * image.ndim
    if any(margins):
        image = np.pad(image, [(m, m) for m in margins], mode="reflect")
    fills = [
        (max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2)
        for s, p in zip(image.shape, patch, strict=True)
    ]
    if any(before or after for before, after in fills):
        value = float(image.min()) if fill is None else fill
        image = np.pad(image, fills, mode="constant", constant_values=value)
    pads = [(m + before, m + after) for m, (before, after) in zip(margins, fills, strict=True)]
    padded = any(before or after for before, after in pads)
    weights = gaussian_weights(patch) if blend == "gaussian" else np.ones(patch, dtype=np.float32)
    total = np.zeros((channels, *image.shape), dtype=np.float32)
    weight_sum = np.zeros(image.shape, dtype=np.float32)
    starts = [patch_starts(s, p, overlap) for s, p in zip(image.shape, patch, strict=True)]
    for corner in itertools.product(*starts):
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        out = predict(np.ascontiguousarray(image[region]))
        total[(slice(None), *region)] += out * weights
        weight_sum[region] += weights
    total /= weight_sum
    del weight_sum
    if padded:
        crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, shape, strict=True))
        total = np.ascontiguousarray(total[(slice(None), *crop)])
    return total
