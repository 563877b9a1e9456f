"""Contracts that keep the stages around the model fast and lean without changing their results.

The volume keeps the stored integers (half the bytes of float32 HU) and converts regions exactly;
resampling, the lung field and postprocessing work from it without a float32 copy of the whole
volume, and the sparse postprocessing gives exactly the dense path's findings; result encoding
uses the headers ``load_volume`` kept instead of reading every file again.
"""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from reader.inference import ModelPackage
from reader.inference.anatomy import LungField, lung_field
from reader.inference.manifest import LabelSpec, load_manifest
from reader.inference.postprocess import extract_findings, findings_from_pieces, select_labels
from reader.inference.preprocess import resample, resample_above, resample_pieces, resample_volume
from reader.results import encode_results
from reader.volume import SourceInstance, Volume, load_volume
from tests.dicom_factory import ct_series, write_datasets
from tests.onnx_fixtures import label_dict, manifest_dict, write_package
from tests.results_helpers import Box, lesion_result

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _chest(slices: int = 12, size: int = 96) -> npt.NDArray[np.int16]:
    """Stored values (HU + 1024) of a small chest: body, two lungs, a nodule in one, noise."""
    z, y, x = np.ogrid[:slices, :size, :size]
    c = size / 2
    hu = np.full((slices, size, size), -1000, dtype=np.int32)
    hu[np.broadcast_to(((y - c) / (0.4 * size)) ** 2 + ((x - c) / (0.46 * size)) ** 2 <= 1, hu.shape)] = 40
    for side in (-1, 1):
        lung = ((y - c) / (0.3 * size)) ** 2 + ((x - c - side * 0.2 * size) / (0.13 * size)) ** 2 <= 1
        hu[np.broadcast_to(lung, hu.shape)] = -850
    hu[np.broadcast_to((z - slices // 2) ** 2 + (y - c) ** 2 + (x - 0.3 * size) ** 2 <= 9, hu.shape)] = 300
    noise = np.random.default_rng(3).integers(-20, 21, size=hu.shape)
    return (hu + 1024 + noise).astype(np.int16)


def _volume(stored: npt.NDArray[np.int16], slope: float = 1.0, intercept: float = -1024.0,
            spacing_mm: tuple[float, float, float] = (2.5, 0.8, 0.8)) -> Volume:
    sources = tuple(
        SourceInstance(Path(f"/nonexistent/{k}.dcm"), CT_STORAGE, f"1.2.826.0.1.3680043.8.498.{k + 1}")
        for k in range(stored.shape[0])
    )
    return Volume(
        stored=stored,
        rescale_slope=[slope] * stored.shape[0],
        rescale_intercept=[intercept] * stored.shape[0],
        spacing_mm=spacing_mm,
        origin_mm=(0.0, 0.0, 0.0),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, 1.0, 0.0),
        sources=sources,
        modality="CT",
        study_instance_uid="1.2.826.0.1.3680043.8.498.100",
        series_instance_uid="1.2.826.0.1.3680043.8.498.200",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.300",
    )


def _labels(tmp_path: Path, count: int, lung_fraction: float = 0.0) -> tuple[LabelSpec, ...]:
    data = manifest_dict()
    data["labels"] = [
        {**label_dict(v, f"Class {v}", min_volume_mm3=2.0), "min_lung_fraction": lung_fraction,
         "max_findings": 3}
        for v in range(1, count + 1)
    ]
    return load_manifest(write_package(tmp_path / f"labels-{count}-{lung_fraction}", data)).labels


def test_ct_volume_keeps_stored_int16_and_converts_regions_exactly(tmp_path: Path) -> None:
    """A CT series is kept as int16 with its rescale; hu() of any (strided) region equals voxels there."""
    volume = load_volume(write_datasets(ct_series(6, rows=20, columns=18), tmp_path))
    assert volume.stored.dtype == np.int16
    assert volume.rescale_slope == (1.0,) * 6 and volume.rescale_intercept == (-1024.0,) * 6
    assert volume.shape == (6, 20, 18)
    expected = volume.stored.astype(np.float32) - np.float32(1024.0)
    assert np.array_equal(volume.voxels, expected) and volume.voxels.dtype == np.float32
    region = (slice(1, 5), slice(None, None, 3), slice(2, None, 2))
    assert np.array_equal(volume.hu(region), volume.voxels[region])


def test_per_slice_rescale_is_applied_slice_by_slice(tmp_path: Path) -> None:
    """Slices with their own Rescale Slope/Intercept keep them; hu() and resampling apply each one."""
    datasets = ct_series(5, rows=16, columns=12)
    datasets[2].RescaleSlope, datasets[2].RescaleIntercept = 2, -2048
    volume = load_volume(write_datasets(datasets, tmp_path))
    assert volume.uniform_rescale is None and volume.stored.dtype == np.int16
    for k in range(5):
        slope, intercept = (2.0, -2048.0) if k == 2 else (1.0, -1024.0)
        expected = volume.stored[k].astype(np.float32) * np.float32(slope) + np.float32(intercept)
        assert np.array_equal(volume.voxels[k], expected)
    shape = (3, 8, 6)
    assert np.array_equal(resample_volume(volume, shape), resample(volume.voxels, shape))


def test_a_slice_of_another_pixel_type_turns_the_volume_into_float_hu(tmp_path: Path) -> None:
    """An unsigned slice that int16 cannot hold switches the whole volume to float32 HU, values intact."""
    datasets = ct_series(4, rows=16, columns=12)
    datasets[1].set_pixel_data(np.full((16, 12), 40000, dtype=np.uint16), "MONOCHROME2", 16)
    volume = load_volume(write_datasets(datasets, tmp_path))
    assert volume.stored.dtype == np.float32 and volume.is_hu
    assert np.all(volume.voxels[1] == 40000 - 1024)
    other = load_volume(write_datasets(ct_series(4, rows=16, columns=12), tmp_path / "plain"))
    for k in (0, 2, 3):
        assert np.array_equal(volume.voxels[k], other.voxels[k])


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (0.5, -20.0)])
def test_resampling_stored_values_matches_resampling_hu(slope: float, intercept: float) -> None:
    """Interpolating stored integers and rescaling on the model grid gives the HU volume's resampling."""
    stored = np.random.default_rng(5).integers(-2000, 3000, size=(9, 31, 27)).astype(np.int16)
    volume = _volume(stored, slope, intercept)
    shape = (4, 13, 11)
    expected = resample(volume.voxels, shape)
    np.testing.assert_allclose(resample_volume(volume, shape), expected, rtol=0, atol=1e-3)
    assert "voxels" in vars(volume)  # only because this test asked for it


def test_lung_field_of_a_box_matches_the_whole_field() -> None:
    """LungField.mask(box) equals the whole-volume lung field cut to the box, from HU or stored values."""
    volume = _volume(_chest())
    whole = lung_field(volume.voxels, volume.spacing_mm)
    assert whole is not None and whole.any()
    field = LungField.of_volume(volume)
    assert field is not None
    rng = np.random.default_rng(11)
    for _ in range(15):
        box = tuple(
            slice(int(start), int(start) + int(rng.integers(1, 40)))
            for start in (rng.integers(0, 11), rng.integers(0, 90), rng.integers(0, 90))
        )
        assert np.array_equal(field.mask((box[0], box[1], box[2])), whole[box])
    assert np.array_equal(field.mask(), whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_postprocessing_matches_the_dense_path(tmp_path: Path, seed: int) -> None:
    """Findings and label map from pieces and clusters equal select_labels + extract_findings."""
    rng = np.random.default_rng(seed)
    volume = _volume(_chest(14, 80), spacing_mm=(2.0, 1.0, 1.0))
    count = 1 if seed == 1 else 2  # one label takes a shortcut of its own
    labels = _labels(tmp_path, count, lung_fraction=0.3 if seed == 2 else 0.0)
    coarse = ndimage.gaussian_filter(rng.random((count, 6, 20, 20)).astype(np.float32), (0, 0.8, 1.2, 1.2))
    coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min())
    native = volume.shape
    lung = lung_field(volume.voxels, volume.spacing_mm)
    dense = select_labels(
        ((label, resample_above(coarse[i], native, label.threshold)) for i, label in enumerate(labels)),
        native,
    )
    expected = extract_findings(dense, labels, volume, in_plane_only=False, lung=lung)
    channels = [
        (label, list(resample_pieces(coarse[i], native, label.threshold))) for i, label in enumerate(labels)
    ]
    assert lung is not None

    field = lung

    class Gate:
        """The dense path's lung mask as a LungGate that tells no side (the dense path does not)."""

        def __call__(self, box: tuple[slice, ...], margin_mm: float, /) -> npt.NDArray[np.bool_] | None:
            assert margin_mm == 0.0  # the labels here set no lung_margin_mm
            return field[box]

        def site(self, point_mm: tuple[float, float, float], /) -> None:
            return None

    found = findings_from_pieces(channels, volume, in_plane_only=False, lung=Gate())
    assert expected[0], "the random probabilities should give findings"
    assert found[0] == expected[0]
    assert np.array_equal(found[1], expected[1])


def test_model_run_never_builds_the_float_volume(tmp_path: Path) -> None:
    """ModelPackage.run on an int16 volume allocates less than a float32 HU copy and leaves voxels unbuilt."""
    data = manifest_dict()
    data["preprocessing"]["target_spacing_mm"] = [5.0, 2.0, 2.0]
    data["preprocessing"]["window"] = [0.0, 400.0]  # only the 300 HU nodule passes the sigmoid's 0.5
    data["labels"] = [{**label_dict(1, "Lung lesion"), "min_lung_fraction": 0.5}]
    package = ModelPackage.load(write_package(tmp_path / "pkg", data), providers=("CPUExecutionProvider",))
    volume = _volume(_chest(24, 256), spacing_mm=(2.5, 0.8, 0.8))
    package.run(volume)  # warm-up: first-call allocations of onnxruntime and scipy
    tracemalloc.start()
    try:
        result = package.run(volume)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.findings, "the nodule should be found"
    assert "voxels" not in vars(volume)
    # a float32 HU copy alone would be 2x stored; what remains is the label map (1 byte a voxel, the
    # only full-size output) and the lung field's strided grid
    assert peak < 2 * volume.stored.nbytes


def test_encoding_reads_no_source_file_again(tmp_path: Path) -> None:
    """SEG and SR are encoded from the headers load_volume kept: the source files may be gone."""
    folder = tmp_path / "series"
    datasets = ct_series(6, rows=32, columns=32)
    for ds in datasets:
        ds.AccessionNumber = "ACC1"  # Type 2 in the General Study module; the factory leaves it out
    volume = load_volume(write_datasets(datasets, folder))
    assert all(source.header is not None and "PixelData" not in source.header for source in volume.sources)
    result = lesion_result(volume, Box(slices=(1, 3), rows=(4, 9), columns=(5, 12)))
    reference = encode_results(volume, result)
    shutil.move(folder, tmp_path / "moved")
    objects = encode_results(volume, result)
    assert objects.seg is not None and reference.seg is not None
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in objects.seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {source.sop_instance_uid for source in volume.sources}
    assert objects.sr.PatientID == reference.sr.PatientID
    assert np.array_equal(objects.seg.pixel_array, reference.seg.pixel_array)
