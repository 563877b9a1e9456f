"""Training patches can be cut on the grid the node runs the network on (models/training/synth.py --grid).

Since lung-lesion-unet 1.3.0 the node resamples CT to 4 x 1.5 x 1.5 mm, not the 4 x 2 x 2 mm grid
the network was trained on; a fine-tune on that grid needs patches that match the node's
resampling exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "training"))

import synth

from reader.inference import preprocess

GRID = (4.0, 1.5, 1.5)


def test_target_shape_matches_the_node_on_any_grid() -> None:
    """``synth.target_shape`` gives the node's model-grid shape for the default grid and for another."""
    for shape, spacing in (((64, 512, 512), (5.0, 0.84, 0.84)), ((37, 233, 241), (2.5, 1.3, 1.3))):
        for grid in (synth.TARGET_SPACING_MM, GRID):
            assert synth.target_shape(shape, spacing, grid) == preprocess.target_shape(shape, spacing, grid)


def test_patch_on_another_grid_is_the_nodes_resampling() -> None:
    """A patch cut with ``grid`` holds the values of the node's linear, corner-aligned resampling of
    the whole volume to that grid, at the patch's corner; so does one cut on the default grid."""
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1000, 400, size=(12, 90, 90)).astype(np.float32)
    label = np.zeros(hu.shape, dtype=np.uint8)
    spacing = (5.0, 0.9, 0.9)
    corner = (1, 3, 2)
    for image, grid in (
        (synth.sample_patch(hu, label, spacing, corner, GRID)[0], GRID),
        (synth.sample_patch(hu, label, spacing, corner)[0], synth.TARGET_SPACING_MM),
    ):
        whole = preprocess.resample(hu, preprocess.target_shape(hu.shape, spacing, grid))
        expected = whole[tuple(slice(c, c + p) for c, p in zip(corner, synth.CACHE_PATCH, strict=True))]
        d, h, w = expected.shape
        assert np.abs(image[:d, :h, :w].astype(np.float32) - np.round(expected)).max() <= 1.0
