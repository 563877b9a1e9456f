"""Tests for ``reader.volume.load_volume``: real CT and CR, synthetic series for every rejection."""

from __future__ import annotations

import copy
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from structlog.testing import capture_logs

from reader.errors import ConfigError, InputRejected, VolumeError
from reader.results.seg import SEVERAL_MULTIFRAME, check_segmentable
from reader.volume import GeometryTolerances, Volume, load_volume
from tests.dicom_factory import (
    SeriesIds,
    compressed,
    cr_image,
    ct_series,
    enhanced_series,
    slice_pixels,
    write_datasets,
)
from tests.peers import missing

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LUNG_CT = DATA / "lung-pet-ct-dx" / "ct-A0001-5mm-lung-kernel"
INTERCEPT = -1024.0



def _lung_ct_files() -> list[Path]:
    files = sorted(LUNG_CT.glob("*.dcm"))
    if len(files) != 64:
        missing(f"missing: 64 CT slices (*.dcm) in {LUNG_CT}")
    return files


def _testdata_file(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        missing(f"missing: pydicom-data test file {name} (pip install pydicom-data)")
    return Path(str(found))


def _reject(paths: list[Path]) -> VolumeError:
    with pytest.raises(VolumeError) as caught:
        load_volume(paths)
    return caught.value


def _expected_slice(k: int, rows: int = 16, columns: int = 12) -> np.ndarray:
    return slice_pixels(k, rows, columns).astype(np.float32) + np.float32(INTERCEPT)


def _assert_slice_order(volume: Volume, n: int) -> None:
    for k in range(n):
        np.testing.assert_array_equal(volume.voxels[k], _expected_slice(k, *volume.voxels.shape[1:]))


# --- real data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lung_ct() -> Volume:
    """The 64-slice lung-kernel CT of Lung-PET-CT-Dx A0001, loaded once for the module."""
    return load_volume(_lung_ct_files())


def test_real_ct_loads_sorted_along_normal(lung_ct: Volume) -> None:
    """The real 64-slice CT loads as 64x512x512 float32, ascending along the normal, 5 mm apart."""
    assert lung_ct.voxels.shape == (64, 512, 512)
    assert lung_ct.voxels.dtype == np.float32
    assert lung_ct.spacing_mm == pytest.approx((5.0, 0.8418, 0.8418), abs=1e-4)
    assert lung_ct.slice_normal == pytest.approx((0.0, 0.0, 1.0))
    z = [lung_ct.voxel_to_patient((k, 0, 0))[2] for k in range(64)]
    assert z == sorted(z)
    assert lung_ct.modality == "CT"
    assert len({s.sop_instance_uid for s in lung_ct.sources}) == 64
    assert all(s.frame_number is None for s in lung_ct.sources)


def test_real_ct_air_in_corner_is_about_minus_1000_hu(lung_ct: Volume) -> None:
    """Rescale to HU is applied: the corner (air outside the body) reads about -1000 HU."""
    corner = lung_ct.voxels[:, :32, :32]
    assert -1100.0 < float(corner.mean()) < -900.0


def test_real_ct_voxel_to_patient_matches_each_file(lung_ct: Volume) -> None:
    """voxel_to_patient of slice k equals the Image Position (Patient) of the file placed at k."""
    for k, source in enumerate(lung_ct.sources):
        header = pydicom.dcmread(source.path, stop_before_pixels=True)
        expected = [float(v) for v in header.ImagePositionPatient]
        assert lung_ct.voxel_to_patient((k, 0, 0)) == pytest.approx(expected, abs=1e-3)
        assert lung_ct.series_instance_uid == header.SeriesInstanceUID
        assert lung_ct.frame_of_reference_uid == header.FrameOfReferenceUID


def test_real_ct_shuffled_paths_give_the_same_volume(lung_ct: Volume) -> None:
    """The order of the paths given does not change the voxels or the slice order."""
    files = _lung_ct_files()
    random.Random(2024).shuffle(files)
    shuffled = load_volume(files)
    np.testing.assert_array_equal(shuffled.voxels, lung_ct.voxels)
    assert shuffled.sources == lung_ct.sources
    assert shuffled.origin_mm == lung_ct.origin_mm


def test_real_radiograph_loads_as_one_slice() -> None:
    """RG1_UNCR (CR, MONOCHROME1, zero PixelSpacing) is one slice, 1 mm assumed, values not inverted."""
    path = _testdata_file("RG1_UNCR.dcm")
    with capture_logs() as logs:
        volume = load_volume([path])
    stored = pydicom.dcmread(path).pixel_array
    assert volume.voxels.shape == (1, *stored.shape)
    np.testing.assert_array_equal(volume.voxels[0], stored.astype(np.float32))
    assert volume.spacing_mm == (1.0, 1.0, 1.0)
    assert volume.origin_mm == (0.0, 0.0, 0.0)
    assert (volume.row_cosines, volume.column_cosines) == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    assert volume.modality == "CR"
    events = {entry["event"] for entry in logs}
    assert {"volume.spacing_assumed", "volume.monochrome1_kept", "volume.loaded"} <= events


# --- synthetic: accepted ---------------------------------------------------------------------


def test_sorted_along_normal_not_by_instance_number(tmp_path: Path) -> None:
    """Slices come out in geometric order although Instance Numbers run backwards and files are shuffled."""
    datasets = ct_series(8)
    paths = write_datasets(datasets, tmp_path)
    random.Random(3).shuffle(paths)
    volume = load_volume(paths)
    _assert_slice_order(volume, 8)
    assert [s.sop_instance_uid for s in volume.sources] == [ds.SOPInstanceUID for ds in datasets]
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.6))
    assert volume.origin_mm == pytest.approx((-50.0, -40.0, 100.0))


def test_oblique_series_geometry(tmp_path: Path) -> None:
    """An oblique stack sorts along its own normal and maps every slice onto its stored position."""
    row = (float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6)), 0.0)
    datasets = ct_series(6, row_cosines=row, column_cosines=(0.0, 0.0, -1.0), slice_spacing_mm=3.0)
    paths = write_datasets(datasets, tmp_path)
    random.Random(5).shuffle(paths)
    volume = load_volume(paths)
    _assert_slice_order(volume, 6)
    assert volume.spacing_mm[0] == pytest.approx(3.0)
    for k, ds in enumerate(datasets):
        assert volume.voxel_to_patient((k, 0, 0)) == pytest.approx(list(ds.ImagePositionPatient), abs=1e-5)


def test_resent_identical_instance_is_kept_once(tmp_path: Path) -> None:
    """The same SOP instance stored twice (a re-send) yields one slice and a log event."""
    datasets = ct_series(5)
    paths = write_datasets([*datasets, datasets[2]], tmp_path)
    with capture_logs() as logs:
        volume = load_volume(paths)
    assert volume.voxels.shape[0] == 5
    _assert_slice_order(volume, 5)
    assert any(entry["event"] == "volume.duplicate_dropped" for entry in logs)


def test_small_jitter_in_positions_is_accepted(tmp_path: Path) -> None:
    """Steps that vary by a few percent load, with the mean step as the slice spacing."""
    datasets = ct_series(6, slice_spacing_mm=2.0)
    datasets[3].ImagePositionPatient = [-50.0, -40.0, 100.0 + 3 * 2.0 + 0.06]
    volume = load_volume(write_datasets(datasets, tmp_path))
    assert volume.spacing_mm[0] == pytest.approx(2.0)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    """Voxels are stored value x RescaleSlope + RescaleIntercept, in float32."""
    volume = load_volume(write_datasets(ct_series(3, rescale=(2.0, -1000.0)), tmp_path))
    for k in range(3):
        expected = slice_pixels(k, 16, 12).astype(np.float32) * 2.0 - 1000.0
        np.testing.assert_array_equal(volume.voxels[k], expected)


def test_mr_without_rescale_keeps_stored_values(tmp_path: Path) -> None:
    """An MR series without Rescale attributes is loaded with the identity transform."""
    volume = load_volume(write_datasets(ct_series(3, modality="MR", rescale=None), tmp_path))
    assert volume.modality == "MR"
    np.testing.assert_array_equal(volume.voxels[2], slice_pixels(2, 16, 12).astype(np.float32))


def test_enhanced_ct_multiframe(tmp_path: Path) -> None:
    """An Enhanced CT instance loads frame by frame, sorted by per-frame Plane Position, rescaled."""
    dataset = enhanced_series(6, rows=64, columns=64)  # large enough for the pixel data to be deferred
    volume = load_volume(write_datasets([dataset], tmp_path))
    _assert_slice_order(volume, 6)
    assert [s.frame_number for s in volume.sources] == [6, 5, 4, 3, 2, 1]
    assert {s.sop_instance_uid for s in volume.sources} == {dataset.SOPInstanceUID}
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.6))
    assert volume.origin_mm == pytest.approx((-50.0, -40.0, 100.0))


def test_two_enhanced_ct_instances_stack_into_one_volume(tmp_path: Path) -> None:
    """Frames of two multi-frame instances of one series interleave into one sorted stack."""
    ids = SeriesIds()
    lower = enhanced_series(3, ids=ids, slice_spacing_mm=5.0)
    upper = enhanced_series(3, ids=ids, slice_spacing_mm=5.0, origin_mm=(-50.0, -40.0, 102.5))
    volume = load_volume(write_datasets([upper, lower], tmp_path))
    assert volume.spacing_mm[0] == pytest.approx(2.5)
    owners = [s.sop_instance_uid for s in volume.sources]
    assert owners == [lower.SOPInstanceUID, upper.SOPInstanceUID] * 3
    assert [s.frame_number for s in volume.sources] == [3, 3, 2, 2, 1, 1]


def test_two_multiframe_instances_are_skipped_before_inference(tmp_path: Path) -> None:
    """A series of two multi-frame instances loads, but is rejected as several_multiframe_instances
    before the model runs (no SEG could reference it); one multi-frame instance passes."""
    ids = SeriesIds()
    lower = enhanced_series(3, ids=ids, slice_spacing_mm=5.0)
    upper = enhanced_series(3, ids=ids, slice_spacing_mm=5.0, origin_mm=(-50.0, -40.0, 102.5))
    with pytest.raises(InputRejected) as raised:
        check_segmentable(load_volume(write_datasets([upper, lower], tmp_path / "two")))
    assert raised.value.reason == SEVERAL_MULTIFRAME
    check_segmentable(load_volume(write_datasets([enhanced_series(3)], tmp_path / "one")))


def test_enhanced_mr_rle_multiframe(tmp_path: Path) -> None:
    """An RLE-compressed Enhanced MR instance decodes to the same volume as its native form."""
    dataset = enhanced_series(5, modality="MR", frame_order=[2, 0, 4, 1, 3])
    native = load_volume(write_datasets([dataset], tmp_path / "native"))
    rle = load_volume(write_datasets([compressed(dataset, RLELossless)], tmp_path / "rle"))
    _assert_slice_order(native, 5)
    np.testing.assert_array_equal(rle.voxels, native.voxels)
    assert [s.frame_number for s in rle.sources] == [2, 4, 1, 5, 3]


@pytest.mark.parametrize(
    ("spacing", "imager", "expected", "assumed"),
    [
        ((0.2, 0.3), (0.5, 0.5), (0.2, 0.3), False),
        (None, (0.15, 0.25), (0.15, 0.25), True),
        (None, None, (1.0, 1.0), True),
    ],
)
def test_one_slice_cr(
    tmp_path: Path,
    spacing: tuple[float, float] | None,
    imager: tuple[float, float] | None,
    expected: tuple[float, float],
    assumed: bool,
) -> None:
    """A CR is one slice at the origin; spacing is Pixel, else Imager Pixel Spacing, else 1 mm (logged)."""
    dataset = cr_image(pixel_spacing_mm=spacing, imager_pixel_spacing_mm=imager)
    with capture_logs() as logs:
        volume = load_volume(write_datasets([dataset], tmp_path))
    assert volume.voxels.shape == (1, 20, 14)
    np.testing.assert_array_equal(volume.voxels[0], dataset.pixel_array.astype(np.float32))
    assert volume.spacing_mm[1:] == pytest.approx(expected)
    assert volume.origin_mm == (0.0, 0.0, 0.0)
    assert volume.frame_of_reference_uid is None
    assert any(entry["event"] == "volume.spacing_assumed" for entry in logs) is assumed


@pytest.mark.parametrize(
    ("transfer_syntax", "size"),
    [
        (RLELossless, 16),
        (JPEGLSLossless, 16),
        (JPEG2000Lossless, 32),  # OpenJPEG needs >= 32 px for its default resolution levels
    ],
)
def test_compressed_series_decodes_like_uncompressed(tmp_path: Path, transfer_syntax: UID, size: int) -> None:
    """A lossless-compressed series decodes to exactly the voxels of the uncompressed one."""
    if not get_encoder(transfer_syntax).is_available:
        missing(f"missing: a pydicom encoder plugin for {transfer_syntax.name}")
    datasets = ct_series(4, rows=size, columns=size)
    native = load_volume(write_datasets(datasets, tmp_path / "native"))
    packed = [compressed(ds, transfer_syntax) for ds in datasets]
    assert all(ds.file_meta.TransferSyntaxUID == transfer_syntax for ds in packed)
    decoded = load_volume(write_datasets(packed, tmp_path / "packed"))
    np.testing.assert_array_equal(decoded.voxels, native.voxels)
    assert decoded.sources[0].sop_instance_uid == native.sources[0].sop_instance_uid


def test_loaded_event_has_fields_and_no_phi(tmp_path: Path) -> None:
    """volume.loaded carries series_uid, slices and seconds; no log line carries patient name or ID."""
    datasets = ct_series(3)
    with capture_logs() as logs:
        load_volume(write_datasets(datasets, tmp_path))
    loaded = [entry for entry in logs if entry["event"] == "volume.loaded"]
    assert len(loaded) == 1
    assert loaded[0]["series_uid"] == datasets[0].SeriesInstanceUID
    assert loaded[0]["slices"] == 3
    assert loaded[0]["seconds"] >= 0
    text = repr(logs)
    assert "Synthetic" not in text
    assert "SYNTH-0001" not in text


def test_memory_stays_near_one_volume(tmp_path: Path) -> None:
    """Peak allocation while loading stays close to the stored (int16) volume: slices are not stacked."""
    paths = write_datasets(ct_series(24, rows=256, columns=256), tmp_path)
    tracemalloc.start()
    try:
        volume = load_volume(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the int16 volume plus the headers kept for encoding (about 70 KiB of parsed header per
    # instance); a float32 volume would be twice the stored one, a stack of slices another one
    assert volume.stored.dtype == np.int16
    assert peak < volume.stored.nbytes + len(paths) * 100 * 1024


def test_tolerances_are_validated() -> None:
    """A non-positive tolerance is refused when the tolerances are built."""
    with pytest.raises(ConfigError):
        GeometryTolerances(slice_spacing_relative=0.0)


# --- synthetic: rejected ---------------------------------------------------------------------


Mutation = Callable[[list[Dataset]], list[Dataset]]


def _set(index: int, keyword: str, value: object) -> Mutation:
    def mutate(datasets: list[Dataset]) -> list[Dataset]:
        setattr(datasets[index], keyword, value)
        return datasets

    return mutate


def _delete(keyword: str, indices: tuple[int, ...] = (0, 1, 2, 3, 4, 5)) -> Mutation:
    def mutate(datasets: list[Dataset]) -> list[Dataset]:
        for i in indices:
            delattr(datasets[i], keyword)
        return datasets

    return mutate


def _move(index: int, dz: float) -> Mutation:
    def mutate(datasets: list[Dataset]) -> list[Dataset]:
        x, y, z = (float(v) for v in datasets[index].ImagePositionPatient)
        datasets[index].ImagePositionPatient = [x, y, z + dz]
        return datasets

    return mutate


def _drop(index: int) -> Mutation:
    def mutate(datasets: list[Dataset]) -> list[Dataset]:
        return datasets[:index] + datasets[index + 1 :]

    return mutate


def _tilt(datasets: list[Dataset]) -> list[Dataset]:
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
    return datasets


def _copy_at_same_position(datasets: list[Dataset]) -> list[Dataset]:
    twin = copy.deepcopy(datasets[2])
    twin.SOPInstanceUID = generate_uid()
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    return [*datasets, twin]


def _same_uid_elsewhere(datasets: list[Dataset]) -> list[Dataset]:
    twin = copy.deepcopy(datasets[2])
    twin.ImagePositionPatient = [-50.0, -40.0, 300.0]
    return [*datasets, twin]


def _other_size(datasets: list[Dataset]) -> list[Dataset]:
    ids = SeriesIds(
        datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, datasets[0].FrameOfReferenceUID
    )
    datasets[3] = ct_series(6, ids=ids, rows=20)[3]
    return datasets


def _with_multiframe(datasets: list[Dataset]) -> list[Dataset]:
    ids = SeriesIds(
        datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, datasets[0].FrameOfReferenceUID
    )
    return [*datasets, enhanced_series(3, ids=ids, origin_mm=(-50.0, -40.0, 200.0))]


def _rotate_one(datasets: list[Dataset]) -> list[Dataset]:
    angle = np.radians(1.0)
    datasets[2].ImageOrientationPatient = [
        np.cos(angle),
        np.sin(angle),
        0.0,
        -np.sin(angle),
        np.cos(angle),
        0.0,
    ]
    return datasets


def _rgb(datasets: list[Dataset]) -> list[Dataset]:
    datasets[0].set_pixel_data(np.zeros((16, 12, 3), dtype=np.uint8), "RGB", 8)
    return datasets


def _as_sr(datasets: list[Dataset]) -> list[Dataset]:
    datasets[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    return datasets


def _huge(datasets: list[Dataset]) -> list[Dataset]:
    datasets[0].Rows = 65535
    datasets[0].Columns = 65535
    return datasets


@pytest.mark.parametrize(
    ("mutation", "reason", "detail"),
    [
        (_set(2, "SeriesInstanceUID", "1.2.3.4"), "mixed_series", ""),
        (_set(4, "Modality", "MR"), "mixed_series", ""),
        (_with_multiframe, "mixed_multiframe", ""),
        (_other_size, "inconsistent_size", ""),
        (_rotate_one, "inconsistent_orientation", ""),
        (_set(1, "PixelSpacing", [0.75, 0.6]), "inconsistent_spacing", ""),
        (_set(5, "FrameOfReferenceUID", "1.2.3.4"), "inconsistent_frame_of_reference", ""),
        (_copy_at_same_position, "duplicate_position", ""),
        (_same_uid_elsewhere, "conflicting_duplicate", ""),
        (_drop(3), "slice_gap", "1 slice(s) missing"),
        (_move(3, 1.0), "nonuniform_spacing", ""),
        (_tilt, "gantry_tilt", "deg"),
        (_set(0, "GantryDetectorTilt", 12.0), "gantry_tilt", "12"),
        (_delete("ImagePositionPatient", (4,)), "missing_attribute", "ImagePositionPatient"),
        (_delete("ImageOrientationPatient"), "missing_attribute", "ImageOrientationPatient"),
        (_delete("PixelSpacing"), "missing_attribute", "PixelSpacing"),
        (_delete("RescaleIntercept", (2,)), "missing_attribute", "RescaleIntercept"),
        (_delete("SeriesInstanceUID", (0,)), "missing_attribute", "SeriesInstanceUID"),
        (_delete("BitsAllocated", (1,)), "missing_attribute", "BitsAllocated"),
        (_set(0, "ImagePositionPatient", [1.0, 2.0]), "invalid_attribute", "ImagePositionPatient"),
        (_set(0, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "invalid_attribute", "ImageOrientation"),
        (_delete("PixelData", (3,)), "not_an_image", "no pixel data"),
        (_as_sr, "not_an_image", "SOP class"),
        (_rgb, "unsupported_pixel_format", "SamplesPerPixel"),
        (_set(0, "Rows", 0), "absurd_dimensions", ""),
        (_huge, "absurd_dimensions", ""),
    ],
)
def test_rejections(tmp_path: Path, mutation: Mutation, reason: str, detail: str) -> None:
    """Each defect in an otherwise valid 6-slice CT series is rejected with its stable reason code."""
    volume_error = _reject(write_datasets(mutation(ct_series(6, slice_spacing_mm=2.0)), tmp_path))
    assert volume_error.reason == reason, volume_error
    assert detail in volume_error.detail


def test_truncated_pixel_data_is_bad_pixel_data(tmp_path: Path) -> None:
    """A file cut short inside its pixel data is rejected as bad_pixel_data."""
    paths = write_datasets(ct_series(4), tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-100])
    assert _reject(paths).reason == "bad_pixel_data"


def test_corrupt_rle_is_bad_pixel_data(tmp_path: Path) -> None:
    """RLE data whose segments are garbage is rejected as bad_pixel_data, not decoded to noise."""
    dataset = compressed(ct_series(1)[0], RLELossless)
    dataset.PixelData = dataset.PixelData[:40] + b"\xff" * 8
    assert _reject(write_datasets([dataset], tmp_path)).reason == "bad_pixel_data"


def test_not_dicom_and_no_paths_are_rejected(tmp_path: Path) -> None:
    """A file that is not DICOM is unreadable_file; an empty list is no_instances."""
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    assert _reject([junk]).reason == "unreadable_file"
    assert _reject([]).reason == "no_instances"


def test_multiframe_without_functional_groups_is_rejected(tmp_path: Path) -> None:
    """A multi-frame object with no per-frame functional groups has no per-frame geometry to trust."""
    dataset = enhanced_series(3)
    del dataset.PerFrameFunctionalGroupsSequence
    volume_error = _reject(write_datasets([dataset], tmp_path))
    assert (volume_error.reason, volume_error.detail) == (
        "missing_attribute",
        "PerFrameFunctionalGroupsSequence",
    )


def test_enhanced_ct_with_missing_frame_position_is_rejected(tmp_path: Path) -> None:
    """A multi-frame instance where one frame lacks Plane Position cannot be stacked."""
    dataset = enhanced_series(4)
    del dataset.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    volume_error = _reject(write_datasets([dataset], tmp_path))
    assert volume_error.reason == "missing_attribute"
    assert volume_error.detail.startswith("ImagePositionPatient")
