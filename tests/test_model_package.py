"""The shipped reference model package loads and runs through the node's runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reader.config import bundled_models_dir
from reader.findings import InferenceResult
from reader.inference import ModelPackage
from tests.onnx_fixtures import make_volume

PACKAGE = bundled_models_dir() / "lung-lesion-unet"


def _label_map(result: InferenceResult) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The result's label map, which a segmentation model always has."""
    assert result.label_map is not None
    return result.label_map


def test_reference_package_runs_on_cpu() -> None:
    """models/lung-lesion-unet loads and runs on the CPU provider (asked for alone, so on a GPU
    machine too), names itself in the algorithm identity, and maps its output back onto the input grid."""
    package = ModelPackage.load(PACKAGE, providers=("CPUExecutionProvider",))
    assert package.provider == "CPUExecutionProvider"
    assert package.manifest.algorithm.name == "lung-lesion-unet"
    voxels = np.full((12, 96, 96), -850.0, dtype=np.float32)  # lung-like background
    voxels[4:8, 40:56, 40:56] = 20.0  # a solid 2 cm block
    result = package.run(make_volume(voxels, spacing_mm=(5.0, 0.8, 0.8)))
    assert _label_map(result).shape == voxels.shape
    assert all(0.5 <= f.score <= 1.0 for f in result.findings)


def test_models_folder_stays_small() -> None:
    """Everything under models/ stays within the 50 MB budget of the repository."""
    total = sum(p.stat().st_size for p in Path(PACKAGE).parent.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts)
    assert total < 50 * 1024 * 1024
