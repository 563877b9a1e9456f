"""The lung-field gate: findings outside the lungs are dropped when a package asks for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from reader.inference import ModelPackage
from reader.inference.anatomy import lung_field
from tests.onnx_fixtures import label_dict, make_volume, manifest_dict, write_package


def _phantom() -> npt.NDArray[np.float32]:
    """Air around a soft-tissue body with two lungs; a 300 HU nodule in the left lung and a
    300 HU blob in the mediastinum."""
    z, y, x = np.ogrid[:16, :128, :128]
    v = np.full((16, 128, 128), -1000.0, dtype=np.float32)
    v[np.broadcast_to(((y - 64) / 50.0) ** 2 + ((x - 64) / 60.0) ** 2 <= 1, v.shape)] = 0.0
    for cx in (30, 98):  # a 36 mm mediastinum between them
        v[np.broadcast_to(((y - 64) / 35.0) ** 2 + ((x - cx) / 16.0) ** 2 <= 1, v.shape)] = -850.0
    v[np.broadcast_to((z - 8) ** 2 + (y - 64) ** 2 + (x - 30) ** 2 <= 16, v.shape)] = 300.0
    v[np.broadcast_to((z - 8) ** 2 + (y - 64) ** 2 + (x - 64) ** 2 <= 16, v.shape)] = 300.0
    return v


def test_lung_field_holds_the_lungs_and_their_nodules_only() -> None:
    """The field covers both lungs including a nodule inside one, and neither the mediastinum nor
    the air outside the body."""
    lung = lung_field(_phantom(), (5.0, 1.0, 1.0))
    assert lung is not None
    assert lung[8, 64, 30] and lung[8, 64, 98]  # the nodule and the right lung
    assert not lung[8, 64, 64]  # the mediastinal blob
    assert not lung[8, 2, 2]  # outside air


def test_no_lungs_means_no_gate() -> None:
    """A volume without lungs (solid tissue) has no lung field, so nothing is filtered by it."""
    assert lung_field(np.zeros((4, 32, 32), dtype=np.float32), (1.0, 1.0, 1.0)) is None


def test_package_with_min_lung_fraction_drops_findings_outside_the_lungs(tmp_path: Path) -> None:
    """With min_lung_fraction set, the mediastinal blob is dropped and the lung nodule kept;
    without it, both are reported."""
    volume = make_volume(_phantom(), spacing_mm=(5.0, 1.0, 1.0))
    counts = {}
    for fraction in (0.0, 0.6):
        m = manifest_dict()
        m["preprocessing"]["window"] = [0.0, 400.0]  # only the 300 HU blobs pass the sigmoid's 0.5
        m["labels"] = [{**label_dict(1, "Lung lesion"), "min_lung_fraction": fraction}]
        package = ModelPackage.load(write_package(tmp_path / f"pkg-{fraction}", m))
        counts[fraction] = [f.centroid_mm[0] for f in package.run(volume).findings]
    assert len(counts[0.0]) == 2
    assert len(counts[0.6]) == 1 and abs(counts[0.6][0] - 30.0) < 2.0
