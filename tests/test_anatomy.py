"""The lung-field gate: findings outside the lungs are dropped when a package asks for it, and a
finding's side is told where the lung field allows.

Data (last test): patient Lung_Dx-A0001 of the TCIA collection Lung-PET-CT-Dx (CC BY 4.0): Li, P.,
Wang, S., Li, T., Lu, J., HuangFu, Y., & Wang, D. (2020). A Large-Scale CT and PET/CT Dataset for
Lung Cancer Diagnosis [Data set]. The Cancer Imaging Archive. https://doi.org/10.7937/TCIA.2020.NNC20461
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from reader.errors import ManifestError
from reader.inference import ModelPackage
from reader.inference.anatomy import LEFT_LUNG, RIGHT_LUNG, lung_field, lung_gate, within_margin
from reader.volume import load_volume
from tests.onnx_fixtures import label_dict, make_volume, manifest_dict, write_package
from tests.peers import require_data
from tests.results_helpers import tumour_box


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


def test_within_margin_grows_the_field_by_millimetres_not_voxels() -> None:
    """within_margin keeps exactly the voxels at most the margin (in mm, with anisotropic spacing)
    from the field, and a zero margin gives the field itself."""
    field = np.zeros((5, 40, 40), dtype=bool)
    field[:, :, :10] = True  # columns 0-9
    spacing = (5.0, 2.0, 1.0)
    box = (slice(1, 4), slice(10, 30), slice(0, 40))
    grown = within_margin(lambda b: field[b], box, 6.0, spacing, (5, 40, 40))
    assert grown is not None
    assert grown[:, :, :16].all() and not grown[:, :, 16:].any()  # 6 columns of 1 mm beyond column 9
    same = within_margin(lambda b: field[b], box, 0.0, spacing, (5, 40, 40))
    assert same is not None and np.array_equal(same, field[box])


def test_lung_margin_keeps_a_juxtapleural_lesion_but_not_the_mediastinum(tmp_path: Path) -> None:
    """A lesion in the chest wall touching the lung is outside the lung field: min_lung_fraction
    alone drops it, lung_margin_mm = 10 keeps it, and the mediastinal blob (over 10 mm from both
    lungs) is dropped either way."""
    v = _phantom()
    z, y, x = np.ogrid[:16, :128, :128]
    v[np.broadcast_to((z - 8) ** 2 + (y - 64) ** 2 + (x - 10) ** 2 <= 16, v.shape)] = 300.0
    volume = make_volume(v, spacing_mm=(5.0, 1.0, 1.0))
    columns = {}
    for margin in (0.0, 10.0):
        m = manifest_dict()
        m["preprocessing"]["window"] = [0.0, 400.0]
        label = {**label_dict(1, "Lung lesion"), "min_lung_fraction": 0.6}
        if margin:
            label["lung_margin_mm"] = margin
        m["labels"] = [label]
        package = ModelPackage.load(write_package(tmp_path / f"pkg-{margin}", m))
        columns[margin] = sorted(round(f.centroid_mm[0]) for f in package.run(volume).findings)
    assert columns[0.0] == [30]
    assert columns[10.0] == [10, 30]


def test_lung_margin_needs_the_lung_fraction_gate(tmp_path: Path) -> None:
    """lung_margin_mm without min_lung_fraction, or beyond 30 mm, is a manifest error naming the key."""
    for extra in ({"lung_margin_mm": 5.0}, {"min_lung_fraction": 0.5, "lung_margin_mm": 45.0}):
        m = manifest_dict()
        m["labels"] = [{**label_dict(1, "Lung lesion"), **extra}]
        with pytest.raises(ManifestError, match="lung_margin_mm"):
            ModelPackage.load(write_package(tmp_path / f"pkg-{len(extra)}", m))


def test_side_is_told_from_the_midline_of_the_lung_field() -> None:
    """A point in the lung at low x is in the right lung, at high x in the left (PS3.3 LPS axes);
    one near the midline gets no side."""
    gate = lung_gate(make_volume(_phantom(), spacing_mm=(5.0, 1.0, 1.0)))
    assert gate.site((30.0, 64.0, 40.0)) == RIGHT_LUNG
    assert gate.site((98.0, 64.0, 40.0)) == LEFT_LUNG
    assert gate.site((66.0, 64.0, 40.0)) is None


def test_no_side_with_one_lung_or_columns_not_along_x() -> None:
    """With one lung (the other airless) or image columns not along the patient's x axis, no
    finding gets a side: never a guessed one."""
    one_lung = _phantom()
    one_lung[one_lung == -850.0] = np.where(np.arange(128) < 64, -850.0, 0.0)[
        np.nonzero(one_lung == -850.0)[2]]
    gate = lung_gate(make_volume(one_lung, spacing_mm=(5.0, 1.0, 1.0)))
    assert gate.site((30.0, 64.0, 40.0)) is None
    sagittal = make_volume(_phantom(), spacing_mm=(5.0, 1.0, 1.0), row_cosines=(0.0, 1.0, 0.0),
                           column_cosines=(0.0, 0.0, -1.0))
    assert lung_gate(sagittal).site((0.0, 30.0, 0.0)) is None


def test_the_shared_tumour_lies_in_the_left_lung() -> None:
    """On the shared CT, the radiologist-boxed adenocarcinoma (left upper lobe) is placed in the
    left lung, and a point in the right lung in the right lung."""
    volume = load_volume(sorted(require_data("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel").glob("*.dcm")))
    gate = lung_gate(volume)
    box = tumour_box(volume)
    centre = volume.voxel_to_patient(((box.slices[0] + box.slices[1]) / 2, (box.rows[0] + box.rows[1]) / 2,
                                      (box.columns[0] + box.columns[1]) / 2))
    assert gate.site(centre) == LEFT_LUNG
    mirrored = volume.voxel_to_patient(((box.slices[0] + box.slices[1]) / 2, (box.rows[0] + box.rows[1]) / 2,
                                        volume.shape[2] - (box.columns[0] + box.columns[1]) / 2))
    assert gate.site(mirrored) == RIGHT_LUNG
