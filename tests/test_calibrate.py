"""Score calibration (models/training/calibrate.py): a monotone fit, reduced to a manifest table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "training"))

import itertools

import calibrate


def test_isotonic_pools_violators_into_their_mean() -> None:
    """Pool-adjacent-violators gives the closest non-decreasing sequence: [1, 0] pools to [0.5, 0.5]."""
    assert calibrate.isotonic(np.array([0.0, 1.0, 0.0, 1.0, 1.0])).tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert calibrate.isotonic(np.array([1.0, 0.0, 0.0])).tolist() == [1 / 3, 1 / 3, 1 / 3]


def test_fit_is_a_valid_manifest_table_that_follows_the_data() -> None:
    """Knots start at the operating point, end at 1.0 and strictly increase; probabilities never
    decrease, lie in [0, 1], and are low where findings were false and high where they were true."""
    rng = np.random.default_rng(7)
    scores = 1.0 - 10.0 ** -rng.uniform(1.5, 6.0, 400)  # crowded below 1.0, like a network's maxima
    truth = (rng.uniform(size=400) < (scores > 0.9999)).astype(np.float64) * 0.9 + 0.05
    truth = (rng.uniform(size=400) < truth).astype(np.float64)
    knots, probabilities = calibrate.fit(scores, truth, points=8, floor=0.95)
    assert knots[0] == 0.95 and knots[-1] == 1.0
    assert all(b > a for a, b in itertools.pairwise(knots))
    assert all(b >= a for a, b in itertools.pairwise(probabilities))
    assert 0.0 <= probabilities[0] <= probabilities[-1] <= 1.0
    assert calibrate.apply(knots, probabilities, 0.97) < 0.3 < calibrate.apply(knots, probabilities, 0.999999)
