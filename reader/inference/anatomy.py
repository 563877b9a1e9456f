"""Anatomical gates for findings: the lung field of a chest CT.

A lung-lesion model's false positives sit mostly outside the lungs (heart border, hila, diaphragm,
upper abdomen, neck). :func:`lung_field` finds the lungs by Hounsfield units alone, so a model
package can require a finding to lie mostly inside them (``min_lung_fraction`` in its manifest,
``models/MANIFEST.md``).

Method, on a grid of about 2 mm in plane (voxels taken with a stride, not interpolated): voxels
below -400 HU, minus the air outside the body (components touching the in-plane border); the two
largest remaining components are the lungs (the second only if at least a tenth of the first);
then a 10 mm in-plane closing and per-slice hole filling take in vessels, nodules and lesions at
the pleura or the mediastinum. The mask is repeated back onto the native grid.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import structlog
from scipy import ndimage

__all__ = ["lung_field"]

log = structlog.get_logger(__name__)

_AIR_HU = -400.0
_GRID_MM = 2.0
_CLOSING_MM = 10.0


def _disk(radius: int) -> npt.NDArray[np.bool_]:
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    structure = np.zeros((1, 2 * radius + 1, 2 * radius + 1), dtype=bool)
    structure[0] = xx * xx + yy * yy <= radius * radius
    return structure


def lung_field(voxels: npt.NDArray[np.float32],
               spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.bool_] | None:
    """Boolean mask of the lungs on the native grid of ``voxels`` (HU), or None when no lungs are
    found (not a chest CT, or the body touches the field of view all round)."""
    stride = max(1, round(_GRID_MM / min(spacing_mm[1], spacing_mm[2])))
    small = voxels[:, ::stride, ::stride] < _AIR_HU
    components, count = ndimage.label(small)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    outside = np.unique(np.concatenate([components[:, 0, :].ravel(), components[:, -1, :].ravel(),
                                        components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
    sizes[outside] = 0
    sizes[0] = 0
    largest = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0]
    if not largest:
        log.info("anatomy.lung_field_missing")
        return None
    keep = [i for i in largest if sizes[i] >= 0.1 * sizes[largest[0]]]
    lungs = np.isin(components, keep)
    del components
    radius = max(1, round(_CLOSING_MM / (stride * spacing_mm[1])))
    lungs = ndimage.binary_closing(lungs, structure=_disk(radius))
    for k in range(lungs.shape[0]):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    full = np.repeat(np.repeat(lungs, stride, axis=1), stride, axis=2)
    return np.ascontiguousarray(full[:, : voxels.shape[1], : voxels.shape[2]])
