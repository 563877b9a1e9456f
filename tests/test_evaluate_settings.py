"""The evaluation script reproduces the model card's compared settings (models/training/evaluate.py).

Each row of the card's comparison is ``evaluate.py`` on a copy of the package with another model
grid, test-time flips or min score; the shipped package itself must stay as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "training"))

import evaluate

from reader.config import bundled_models_dir
from reader.inference.manifest import load_manifest

PACKAGE = bundled_models_dir() / "lung-lesion-unet"


def test_settings_copy_overrides_grid_flips_and_min_score(tmp_path: Path) -> None:
    """``with_settings`` writes a valid manifest with the asked grid, flips and min score into the
    copy, and leaves the shipped package's model.toml untouched."""
    before = (PACKAGE / "model.toml").read_bytes()
    copy = evaluate.with_settings(
        PACKAGE, tmp_path / "package", spacing="4,2,2", flips="row,column", min_score=0.5
    )
    manifest = load_manifest(copy)
    assert manifest.preprocessing.target_spacing_mm == (4.0, 2.0, 2.0)
    assert manifest.preprocessing.test_time_flips == ("row", "column")
    assert [label.min_score for label in manifest.labels] == [0.5]
    assert (PACKAGE / "model.toml").read_bytes() == before


def test_settings_copy_can_remove_flips(tmp_path: Path) -> None:
    """An empty ``--test-time-flips`` runs the network once (1.2.0's setting), whatever the package
    ships; settings not named keep the package's values."""
    shipped = load_manifest(PACKAGE)
    copy = evaluate.with_settings(PACKAGE, tmp_path / "package", spacing=None, flips="", min_score=None)
    manifest = load_manifest(copy)
    assert manifest.preprocessing.test_time_flips == ()
    assert manifest.preprocessing.target_spacing_mm == shipped.preprocessing.target_spacing_mm
    assert [label.min_score for label in manifest.labels] == [label.min_score for label in shipped.labels]


def test_settings_copy_sets_and_removes_edge_mirroring(tmp_path: Path) -> None:
    """``--edge-mirror-voxels`` puts the asked mirroring into the copy, replacing any the package
    ships, and an empty value runs without it (1.3.0's setting)."""
    copy = evaluate.with_settings(
        PACKAGE, tmp_path / "a", spacing=None, flips=None, min_score=None, mirror="8,0,0"
    )
    assert load_manifest(copy).preprocessing.edge_mirror_voxels == (8, 0, 0)
    again = evaluate.with_settings(copy, tmp_path / "b", spacing=None, flips=None, min_score=None, mirror="")
    assert load_manifest(again).preprocessing.edge_mirror_voxels == ()
    assert (
        load_manifest(again).preprocessing.test_time_flips
        == load_manifest(PACKAGE).preprocessing.test_time_flips
    )


def test_operating_points_count_false_positives_and_hits_per_floor() -> None:
    """``operating_points`` gives, for each min score, the FP/scan and the sensitivity of the findings
    that would still be reported."""
    detections = [
        evaluate.Detection("a", 0.999, (1,), False),
        evaluate.Detection("a", 0.97, (), True),
        evaluate.Detection("b", 0.91, (2,), False),
    ]
    points = evaluate.operating_points(detections, [("a", 1), ("b", 2)], scans=2)
    assert points["0.9"] == {"fp_per_scan": 0.5, "sensitivity": 1.0}
    assert points["0.95"] == {"fp_per_scan": 0.5, "sensitivity": 0.5}
    assert points["0.98"] == {"fp_per_scan": 0.0, "sensitivity": 0.5}
