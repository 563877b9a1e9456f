"""A finding's key image as PNG: the stored source instance, windowed, with the outline drawn.

The outline is the SR's SCOORD POLYLINE (``reader.web.queries.Finding.outline``: image
coordinates, (0, 0) the top-left corner of the top-left pixel). Rendered with numpy and Pillow
(HPND licence) from the instance the node stored, never fetched elsewhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw

__all__ = ["render_key_image"]

_CT_WINDOW = (-600.0, 1500.0)  # lung window (centre, width) for CT without a stored window
_OUTLINE_RGB = (255, 64, 64)
_MAX_SIDE = 1024  # larger images are drawn at this size
_MIN_SIDE = 512  # smaller ones are enlarged (nearest neighbour) to it, so the outline stays legible


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0]) if len(value) else None
    return float(str(value))


def _window(ds: pydicom.Dataset, pixels: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if centre is None or width is None or width <= 1:
        if ds.get("Modality") == "CT":
            centre, width = _CT_WINDOW
        else:
            low, high = float(np.percentile(pixels, 1)), float(np.percentile(pixels, 99))
            centre, width = (low + high) / 2, max(high - low, 1.0)
    low = centre - width / 2
    scaled = np.clip((pixels - low) / width, 0.0, 1.0) * 255.0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.astype(np.uint8)


def render_key_image(instance: Path, outline: Sequence[tuple[float, float]]) -> bytes:
    """The PNG of ``instance`` (its first frame) with ``outline`` drawn on it."""
    ds = pydicom.dcmread(instance)
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise ValueError("only single-sample images are drawn")
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    image = Image.fromarray(_window(ds, pixels), mode="L").convert("RGB")
    side = max(image.size)
    scale = _MAX_SIDE / side if side > _MAX_SIDE else _MIN_SIDE / side if side < _MIN_SIDE else 1.0
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    if len(outline) >= 2:
        points = [(x * scale, y * scale) for x, y in outline]
        ImageDraw.Draw(image).line(points, fill=_OUTLINE_RGB, width=max(1, round(image.width / 256)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
