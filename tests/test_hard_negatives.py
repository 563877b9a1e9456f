"""Hard-negative patches are cut around the false positive they are for (hard_negatives.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "training"))

import hard_negatives
import synth


def test_every_jittered_patch_holds_the_false_positive_and_stays_on_the_grid() -> None:
    """Each corner drawn around a native voxel gives a patch on the model grid that contains that
    voxel's corner-aligned position and lies inside the grid, at the scan's edges as well as in
    its middle."""
    rng = np.random.default_rng(0)
    shape, spacing, grid = (40, 300, 300), (5.0, 0.8, 0.8), (4.0, 1.5, 1.5)
    tshape = synth.target_shape(shape, spacing, grid)
    for centre in ([0, 0, 0], [39, 299, 299], [20, 150, 10], [3, 280, 150]):
        corners = hard_negatives.corners_around(
            np.array(centre, dtype=float), shape, spacing, grid, copies=25, rng=rng
        )
        assert len(corners) == 25
        for corner in corners:
            for c, x, n, p, t in zip(corner, centre, shape, synth.CACHE_PATCH, tshape, strict=True):
                assert 0 <= c <= t - p
                assert c <= x * (t - 1) / (n - 1) <= c + p - 1


def test_training_label_keeps_lesions_and_the_ignored_region() -> None:
    """Lesion instances 1..n become label 1, the ignored region keeps its value, the rest is 0."""
    truth = np.array([0, 1, 2, 7, synth.IGNORE, 0], dtype=np.uint8)
    assert hard_negatives.training_label(truth).tolist() == [0, 1, 1, 1, synth.IGNORE, 0]
