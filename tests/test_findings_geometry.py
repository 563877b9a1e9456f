"""Where a finding is drawn: its key slice, its outline there, and its own label-map value.

The outline is what a viewer draws (SR SCOORD POLYLINE, PS3.3 C.18.6): image coordinates (column,
row) with (0, 0) the top-left corner of the top-left pixel.
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from reader.findings import Code, Outline
from reader.inference.manifest import LabelSpec
from reader.inference.postprocess import extract_findings, outline_of, select_labels
from tests.onnx_fixtures import make_volume

LABEL = LabelSpec(
    value=1, name="Lung lesion", category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
    property_type=Code("27925004", "SCT", "Nodule"), site=Code("39607008", "SCT", "Lung"),
    threshold=0.5, min_score=0.5, min_volume_mm3=0.0, max_findings=10,
)


def _inside_convex(points: tuple[tuple[float, float], ...], x: float, y: float) -> bool:
    """True when (x, y) lies inside or on a closed convex polygon (either winding)."""
    signs = set()
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        if abs(cross) > 1e-9:
            signs.add(cross > 0)
    return len(signs) <= 1


def test_outline_is_closed_and_holds_every_pixel_corner() -> None:
    """The outline of an L-shaped region is a closed polygon holding every corner of its pixels,
    offset by the region's place in the image and in (column, row) order."""
    mask = np.zeros((5, 4), dtype=bool)
    mask[0:5, 0] = True
    mask[4, 0:4] = True
    points = outline_of(mask, (10, 20))
    assert points[0] == points[-1] and len(points) >= 4
    Outline(slice_index=0, points=points)  # a valid Outline
    for r, c in np.argwhere(mask):
        for dr in (0, 1):
            for dc in (0, 1):
                assert _inside_convex(points, 20 + c + dc, 10 + r + dr)
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    assert (min(xs), max(xs), min(ys), max(ys)) == (20.0, 24.0, 10.0, 15.0)


def test_one_pixel_outline_is_its_square() -> None:
    """A single pixel (r, c) gives the square from (c, r) to (c + 1, r + 1), closed."""
    points = outline_of(np.ones((1, 1), dtype=bool), (7, 3))
    assert sorted(set(points)) == [(3.0, 7.0), (3.0, 8.0), (4.0, 7.0), (4.0, 8.0)]
    assert points[0] == points[-1]


def test_empty_outline_is_refused() -> None:
    """A mask without a pixel has no outline."""
    with pytest.raises(ValueError, match="at least one pixel"):
        outline_of(np.zeros((2, 2), dtype=bool), (0, 0))


def _probabilities(shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    p = np.zeros(shape, dtype=np.float32)
    p[2:6, 10:20, 10:14] = 0.9  # finding A: 4 slices, widest on slice 4 (below)
    p[4, 8:22, 8:16] = 0.9
    p[8:9, 30:33, 30:33] = 0.99  # finding B: one slice, higher score
    return p


def test_findings_have_their_own_label_value_key_slice_and_outline() -> None:
    """Each finding is its own label-map value (its number, by descending score), its key slice is
    where its area is largest, and its outline there bounds its pixels on that slice."""
    shape = (12, 40, 40)
    volume = make_volume(np.zeros(shape, dtype=np.float32))
    selection = select_labels([(LABEL, _probabilities(shape))], shape)
    findings, label_map = extract_findings(selection, [LABEL], volume, in_plane_only=False)
    assert [f.number for f in findings] == [1, 2]
    small, large = findings
    assert small.slice_indices == (8,) and small.outline.slice_index == 8
    assert large.slice_indices == (2, 3, 4, 5) and large.outline.slice_index == 4
    assert set(np.unique(label_map)) == {0, 1, 2}
    assert int((label_map == 1).sum()) == small.voxel_count
    assert int((label_map == 2).sum()) == large.voxel_count
    xs = [x for x, _ in large.outline.points]
    ys = [y for _, y in large.outline.points]
    assert (min(xs), max(xs), min(ys), max(ys)) == (8.0, 16.0, 8.0, 22.0)
    assert small.site is None  # no anatomy was asked for
