"""ModelPackage: real onnxruntime sessions on tiny real ONNX graphs, volume in, findings out."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from scipy.spatial.distance import pdist
from structlog.testing import capture_logs

from reader.config import Device, ModelRef, NodeConfig, Route
from reader.errors import InferenceError, ManifestError, ModelError
from reader.findings import InferenceResult
from reader.inference import DEFAULT_PROVIDERS, ModelPackage, load_manifest
from reader.inference.postprocess import longest_diameter_mm
from reader.inference.preprocess import patch_starts, resample, resample_above, sliding_window
from reader.node import load_models
from reader.volume import Volume
from tests.onnx_fixtures import (
    first_working_provider,
    label_dict,
    label_map_model,
    make_volume,
    manifest_dict,
    reshape_model,
    sha256_of,
    shifted_sigmoid_model,
    sigmoid_model,
    two_class_model,
    write_package,
)

AIR = -1000.0
BRIGHT = 100.0  # normalized 0.786: probability ~0.99999
DIM = -200.0  # normalized 0.571: probability ~0.946

SPACING = (2.0, 0.8, 0.7)
# Blob A: 4 x 6 x 5 voxels of BRIGHT; blob B: 3 x 8 x 10 voxels of DIM. Both cross patch borders.
BLOB_A = (slice(3, 7), slice(5, 11), slice(10, 15))
BLOB_B = (slice(12, 15), slice(25, 33), slice(20, 30))


def _blobs(shape: tuple[int, int, int] = (20, 40, 40)) -> np.ndarray[Any, np.dtype[np.float32]]:
    voxels = np.full(shape, AIR, dtype=np.float32)
    voxels[BLOB_A] = BRIGHT
    voxels[BLOB_B] = DIM
    return voxels


def _label_map(result: InferenceResult) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The result's label map, which a segmentation model always has."""
    assert result.label_map is not None
    return result.label_map


def _cuboid_diameter(box: tuple[slice, ...], spacing: tuple[float, ...]) -> float:
    return math.sqrt(sum(((s.stop - s.start - 1) * mm) ** 2 for s, mm in zip(box, spacing, strict=True)))


def _centre(box: tuple[slice, ...]) -> tuple[float, float, float]:
    c = [(s.start + s.stop - 1) / 2.0 for s in box]
    return (c[0], c[1], c[2])


def _package(folder: Path, **changes: Any) -> ModelPackage:
    data = manifest_dict()
    for section, values in changes.items():
        if section == "labels":
            data["labels"] = values
        else:
            data[section].update(values)
    return ModelPackage.load(write_package(folder, data), providers=("CPUExecutionProvider",))


def _oblique_volume(voxels: np.ndarray[Any, np.dtype[np.float32]]) -> Volume:
    """A volume tilted 30 degrees about the x axis, so the centroid exercises the full geometry."""
    angle = math.radians(30.0)
    return make_volume(
        voxels,
        spacing_mm=SPACING,
        origin_mm=(-100.0, 50.0, 20.0),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, math.cos(angle), math.sin(angle)),
    )


def test_provider_fallback_ends_on_the_first_provider_that_runs(tmp_path: Path) -> None:
    """With TensorRT, CUDA and CPU requested, loading skips those that cannot run on this machine
    and logs the one that runs: CPU without a usable GPU, CUDA (or TensorRT) where one works."""
    expected = first_working_provider(DEFAULT_PROVIDERS)
    folder = write_package(tmp_path)
    with capture_logs() as logs:
        package = ModelPackage.load(folder)
    assert package.provider == expected
    (loaded,) = [e for e in logs if e["event"] == "model.loaded"]
    assert loaded["provider"] == expected
    assert loaded["requested_providers"] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert (loaded["name"], loaded["version"]) == ("test-blobs", "0.0.1")


def test_no_available_provider_is_a_model_error(tmp_path: Path) -> None:
    """Asking only for providers onnxruntime does not have raises ModelError, not a crash later."""
    with pytest.raises(ModelError, match="NoSuchExecutionProvider"):
        ModelPackage.load(write_package(tmp_path), providers=("NoSuchExecutionProvider",))


def _device_config(folder: Path) -> NodeConfig:
    return NodeConfig(models=(ModelRef("fixture", folder),), routes=(Route(name="all", model="fixture"),))


def test_device_cpu_runs_on_the_cpu_provider_only(tmp_path: Path) -> None:
    """``--device cpu`` asks onnxruntime for the CPU provider alone, whatever ``[inference]``
    providers lists, and the package runs there (on a GPU machine too)."""
    with capture_logs() as logs:
        models = load_models(_device_config(write_package(tmp_path)), Device.parse("cpu"))
    assert models["fixture"].provider == "CPUExecutionProvider"
    (loaded,) = [e for e in logs if e["event"] == "model.loaded"]
    assert loaded["requested_providers"] == ["CPUExecutionProvider"]
    assert loaded["provider_options"] == {}


def test_device_cuda_n_asks_for_that_gpu_then_falls_back_to_cpu(tmp_path: Path) -> None:
    """``--device cuda:1`` asks for CUDA on GPU 1 (provider option ``device_id``) then the CPU;
    where CUDA cannot run (a machine without a GPU) the model loads on the CPU provider exactly as
    the runtime's fallback does for the default provider list, instead of failing. Where CUDA runs,
    the model loads (rather than failing) on one of the two providers asked for; which one is not
    checked, as it depends on whether the machine has a GPU 1."""
    with capture_logs() as logs:
        models = load_models(_device_config(write_package(tmp_path)), Device.parse("cuda:1"))
    (loaded,) = [e for e in logs if e["event"] == "model.loaded"]
    assert loaded["requested_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert loaded["provider_options"] == {"CUDAExecutionProvider": {"device_id": "1"}}
    if first_working_provider(("CUDAExecutionProvider", "CPUExecutionProvider")) == "CPUExecutionProvider":
        assert models["fixture"].provider == "CPUExecutionProvider"
    else:  # a GPU machine: CUDA where GPU 1 exists, else the CPU fallback; only loading is checked
        assert models["fixture"].provider in {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_fp16_is_not_used_on_cpu(tmp_path: Path) -> None:
    """fp16 with an onnx_fp16 file present still runs the fp32 graph on the CPU provider (asked for
    alone, so on a GPU machine too)."""
    folder = write_package(tmp_path, fp16_model=sigmoid_model(float16=True))
    with capture_logs() as logs:
        package = ModelPackage.load(folder, providers=("CPUExecutionProvider",), fp16=True)
    assert package.provider == "CPUExecutionProvider"
    assert [e["reason"] for e in logs if e["event"] == "model.fp16_skipped"] == ["not on GPU"]
    assert [e["graph"] for e in logs if e["event"] == "model.loaded"] == ["model.onnx"]


def test_result_names_the_weights_that_ran(tmp_path: Path) -> None:
    """A result carries the SHA-256 of the fp32 graph that ran and says it ran in fp32."""
    package = _package(tmp_path)
    result = package.run(make_volume(np.full((6, 20, 24), AIR, dtype=np.float32), spacing_mm=SPACING))
    digest = sha256_of(tmp_path / "model.onnx")
    assert result.algorithm.weights_sha256 == digest == package.algorithm.weights_sha256
    assert (result.precision, package.precision) == ("fp32", "fp32")


def test_fp16_session_reports_the_fp16_digest(tmp_path: Path) -> None:
    """A package whose fp16 graph runs names that graph's digest and precision "fp16" in its results."""
    folder = write_package(tmp_path, fp16_model=sigmoid_model(float16=True))
    manifest = load_manifest(folder)
    session = ort.InferenceSession(str(folder / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    package = ModelPackage(manifest, session, "CPUExecutionProvider", "fp16")
    assert package.algorithm.weights_sha256 == sha256_of(folder / "model.fp16.onnx")
    assert package.algorithm.weights_sha256 != manifest.algorithm.weights_sha256
    assert package.precision == "fp16"


def test_two_blobs_give_two_measured_findings(tmp_path: Path) -> None:
    """Two cuboid blobs become two findings with exact volume, diameter, centroid and slices."""
    package = _package(tmp_path)
    volume = _oblique_volume(_blobs())
    before = volume.voxels.copy()
    with capture_logs() as logs:
        result = package.run(volume)
    assert isinstance(result, InferenceResult)
    assert np.array_equal(volume.voxels, before), "run must not modify the caller's volume"
    assert result.provider == "CPUExecutionProvider"
    assert result.algorithm == package.manifest.algorithm
    assert [f.number for f in result.findings] == [1, 2]
    first, second = result.findings
    assert first.score > second.score > 0.9  # BRIGHT blob first
    voxel_mm3 = math.prod(SPACING)
    for finding, box in ((first, BLOB_A), (second, BLOB_B)):
        count = math.prod(s.stop - s.start for s in box)
        assert finding.voxel_count == count
        assert finding.volume_mm3 == pytest.approx(count * voxel_mm3)
        assert finding.longest_diameter_mm == pytest.approx(_cuboid_diameter(box, SPACING))
        assert finding.centroid_mm == pytest.approx(volume.voxel_to_patient(_centre(box)))
        assert finding.slice_indices == tuple(range(box[0].start, box[0].stop))
        assert finding.finding_class.label == 1
    assert _label_map(result).dtype == np.uint8
    assert _label_map(result).shape == volume.voxels.shape
    expected = np.zeros(volume.voxels.shape, dtype=np.uint8)
    expected[BLOB_A] = 1  # each finding is its own label-map value: its number
    expected[BLOB_B] = 2
    assert np.array_equal(_label_map(result), expected)
    for finding, box in ((first, BLOB_A), (second, BLOB_B)):
        assert box[0].start <= finding.outline.slice_index < box[0].stop
        xs = [x for x, _ in finding.outline.points]
        ys = [y for _, y in finding.outline.points]
        assert (min(ys), max(ys), min(xs), max(xs)) == (box[1].start, box[1].stop, box[2].start, box[2].stop)
    (done,) = [e for e in logs if e["event"] == "inference.done"]
    assert done["findings"] == 2
    assert done["series_uid"] == volume.series_instance_uid
    assert {"preprocess_s", "model_s", "postprocess_s", "provider"} <= done.keys()


def test_thresholds_and_filters_drop_components(tmp_path: Path) -> None:
    """threshold, min_score, min_volume_mm3 and max_findings drop components and clear them from the map."""
    voxels = _blobs()
    voxels[17:19, 2:4, 2:4] = BRIGHT  # 8 voxels = 8.96 mm3: a speck
    volume = make_volume(voxels, spacing_mm=SPACING)

    def kept(name: str, **label: Any) -> set[int]:
        entry = label_dict(1, "Lung lesion") | label
        result = _package(tmp_path / name, labels=[entry]).run(volume)
        counts = {f.voxel_count for f in result.findings}
        assert int(np.count_nonzero(_label_map(result))) == sum(counts)
        return counts

    assert kept("all") == {120, 240, 8}
    assert kept("min_volume", min_volume_mm3=30.0) == {120, 240}
    assert kept("min_score", min_score=0.97) == {120, 8}
    assert kept("threshold", threshold=0.99) == {120, 8}
    assert kept("max_findings", max_findings=1) == {120}


def test_sliding_window_matches_one_big_patch(tmp_path: Path) -> None:
    """Overlapping patches across blob borders give the same findings as one patch over the volume."""
    volume = make_volume(_blobs(), spacing_mm=SPACING)
    small = _package(tmp_path / "small", preprocessing={"patch_size": [8, 16, 16], "overlap": 0.5})
    big = _package(tmp_path / "big", preprocessing={"patch_size": [20, 40, 40], "blend": "constant"})
    a, b = small.run(volume), big.run(volume)
    assert np.array_equal(_label_map(a), _label_map(b))
    assert len(a.findings) == len(b.findings) == 2
    for fa, fb in zip(a.findings, b.findings, strict=True):
        assert fa.score == pytest.approx(fb.score, abs=1e-5)
        assert (fa.voxel_count, fa.slice_indices) == (fb.voxel_count, fb.slice_indices)


def test_sliding_window_mirrors_edges_and_crops_back() -> None:
    """With ``mirror`` the network sees the image extended by its own mirror image beyond each edge
    (a nodule on the first slice arrives with the slices below it mirrored above it, not beside
    padding) and the blended output is cropped back onto the image's own voxels."""
    image = np.random.default_rng(0).random((6, 8, 8), dtype=np.float32)
    seen: list[np.ndarray[Any, np.dtype[np.float32]]] = []

    def predict(patch: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.float32]]:
        seen.append(patch.copy())
        return patch[np.newaxis]

    def run(mirror: tuple[int, ...]) -> np.ndarray[Any, np.dtype[np.float32]]:
        return sliding_window(
            image,
            patch=(8, 8, 8),
            overlap=0.5,
            blend="gaussian",
            channels=1,
            predict=predict,
            fill=0.0,
            mirror=mirror,
        )

    out = run((2, 0, 0))
    assert np.allclose(out[0], image, atol=1e-6)
    assert [p.shape for p in seen] == [(8, 8, 8), (8, 8, 8)]  # 6 + 2 + 2 slices: two patches, no fill
    assert np.array_equal(seen[0][:3], image[[2, 1, 0]])
    assert np.array_equal(seen[-1][-3:], image[[5, 4, 3]])
    with pytest.raises(ValueError, match="mirror"):
        run((2, 0))


def test_edge_mirror_keeps_findings_in_place(tmp_path: Path) -> None:
    """A package with ``edge_mirror_voxels`` finds the same blobs, voxel for voxel, as one without:
    the mirrored margins are cropped off before the findings are read."""
    volume = make_volume(_blobs(), spacing_mm=SPACING)
    plain = _package(tmp_path / "plain").run(volume)
    mirrored = _package(tmp_path / "mirrored", preprocessing={"edge_mirror_voxels": [3, 2, 5]}).run(volume)
    assert np.array_equal(_label_map(plain), _label_map(mirrored))
    assert [f.voxel_count for f in plain.findings] == [f.voxel_count for f in mirrored.findings]
    assert len(plain.findings) == 2


@pytest.mark.parametrize(
    ("flips", "columns"),
    [
        ([], (2, 6)),  # the model's own output: the blob (columns 3-7) one column to the left
        (["row"], (2, 6)),  # mirroring rows does not move columns: both passes agree
        (["column"], (4, 6)),  # the mirrored pass puts it at 4-8: only the shared columns stay
        (["slice", "column"], (4, 6)),  # columns 2-3 are in two passes of three: 2/3 < 0.75
    ],
)
def test_test_time_flips_average_mirrored_passes(
    tmp_path: Path, flips: list[str], columns: tuple[int, int]
) -> None:
    """With ``test_time_flips`` the model also runs on the image mirrored along each named axis, each
    output is mirrored back and the passes are averaged. A model that reads one column to the right
    outputs a blob at columns 3-7 as 2-6, and on the column-mirrored image as 4-8 once mirrored
    back, so at threshold 0.75 the average keeps only 4-6; mirroring rows or slices moves no column."""
    voxels = np.full((6, 10, 12), AIR, dtype=np.float32)
    voxels[2:4, 3:6, 3:8] = BRIGHT
    data = manifest_dict()
    data["preprocessing"].update({"patch_size": [8, 16, 16], "test_time_flips": flips})
    data["labels"] = [{**label_dict(1, "Lung lesion"), "threshold": 0.75}]
    package = ModelPackage.load(
        write_package(tmp_path, data, shifted_sigmoid_model()), providers=("CPUExecutionProvider",)
    )
    result = package.run(make_volume(voxels))
    (finding,) = result.findings
    found = np.flatnonzero(_label_map(result).any(axis=(0, 1)))
    assert (int(found[0]), int(found[-1])) == columns
    assert finding.slice_indices == (2, 3)
    assert finding.score == pytest.approx(1.0, abs=1e-3)


def test_volume_smaller_than_patch_is_padded(tmp_path: Path) -> None:
    """A volume smaller than one patch is padded for the model and the result cropped back."""
    voxels = np.full((5, 10, 12), AIR, dtype=np.float32)
    voxels[1:3, 2:5, 3:9] = BRIGHT
    result = _package(tmp_path).run(make_volume(voxels))
    assert _label_map(result).shape == (5, 10, 12)
    (finding,) = result.findings
    assert finding.voxel_count == 36
    assert finding.slice_indices == (1, 2)


def test_resampling_returns_to_native_grid(tmp_path: Path) -> None:
    """With a coarser target spacing the label map keeps the native shape and the blob's measures."""
    voxels = np.full((24, 64, 64), AIR, dtype=np.float32)
    box = (slice(6, 16), slice(20, 40), slice(24, 46))
    voxels[box] = BRIGHT
    spacing = (1.25, 0.7, 0.7)
    volume = make_volume(voxels, spacing_mm=spacing)
    package = _package(tmp_path, preprocessing={"target_spacing_mm": [2.5, 1.5, 1.5]})
    result = package.run(volume)
    assert _label_map(result).shape == voxels.shape
    (finding,) = result.findings
    true_mm3 = 10 * 20 * 22 * math.prod(spacing)
    assert finding.volume_mm3 == pytest.approx(true_mm3, rel=0.15)
    assert finding.centroid_mm == pytest.approx(volume.voxel_to_patient(_centre(box)), abs=1.0)
    assert finding.longest_diameter_mm == pytest.approx(_cuboid_diameter(box, spacing), rel=0.1)
    overlap = np.logical_and(_label_map(result) == 1, voxels == BRIGHT).sum()
    assert overlap / finding.voxel_count > 0.85


def test_two_d_model_on_one_slice_radiograph(tmp_path: Path) -> None:
    """A 2-D model runs on a one-slice volume (a radiograph) and finds its blob on slice 0."""
    pixels = np.full((1, 50, 70), AIR, dtype=np.float32)
    pixels[0, 10:20, 30:42] = BRIGHT
    data = manifest_dict(dimensions=2)
    data["input"]["modalities"] = ["DX"]
    data["preprocessing"]["target_spacing_mm"] = [0.2, 0.2]
    package = ModelPackage.load(write_package(tmp_path, data), providers=("CPUExecutionProvider",))
    volume = make_volume(pixels, spacing_mm=(1.0, 0.2, 0.2), modality="DX")
    result = package.run(volume)
    assert _label_map(result).shape == (1, 50, 70)
    (finding,) = result.findings
    assert finding.voxel_count == 120
    assert finding.slice_indices == (0,)
    assert finding.longest_diameter_mm == pytest.approx(math.hypot(9 * 0.2, 11 * 0.2))


def test_two_d_model_connects_within_slices_only(tmp_path: Path) -> None:
    """A 2-D model on a multi-slice volume uses 8-connectivity per slice: one finding per slice."""
    voxels = np.full((3, 32, 32), AIR, dtype=np.float32)
    voxels[:, 10:14, 10:14] = BRIGHT
    voxels[1, 20, 20] = BRIGHT
    voxels[1, 21, 21] = BRIGHT  # diagonal neighbour: 8-connected in plane
    data = manifest_dict(dimensions=2)
    package = ModelPackage.load(write_package(tmp_path, data), providers=("CPUExecutionProvider",))
    result = package.run(make_volume(voxels))
    assert sorted((f.slice_indices, f.voxel_count) for f in result.findings) == [
        ((0,), 16),
        ((1,), 2),
        ((1,), 16),
        ((2,), 16),
    ]


def test_label_map_output_kind(tmp_path: Path) -> None:
    """A model that outputs integer label values gives the same components as the probability model."""
    data = manifest_dict()
    data["output"] = {"tensor": "labels", "kind": "label_map"}
    package = ModelPackage.load(
        write_package(tmp_path, data, label_map_model()), providers=("CPUExecutionProvider",)
    )
    result = package.run(make_volume(_blobs(), spacing_mm=SPACING))
    assert sorted(f.voxel_count for f in result.findings) == [120, 240]
    assert all(f.score == pytest.approx(1.0) for f in result.findings)


def test_two_labels_most_probable_wins(tmp_path: Path) -> None:
    """With two output channels each blob goes to its more probable label and numbering spans labels."""
    voxels = _blobs()
    voxels[BLOB_A] = 400.0  # "bright" channel
    voxels[BLOB_B] = 0.0  # "mid" channel
    data = manifest_dict()
    data["labels"] = [label_dict(1, "mid"), label_dict(2, "bright")]
    package = ModelPackage.load(
        write_package(tmp_path, data, two_class_model()), providers=("CPUExecutionProvider",)
    )
    result = package.run(make_volume(voxels, spacing_mm=SPACING))
    assert [c.label for c in result.finding_classes] == [1, 2]
    by_label = {f.finding_class.name: f for f in result.findings}
    assert by_label["bright"].voxel_count == 120
    assert by_label["mid"].voxel_count == 240
    assert sorted(f.number for f in result.findings) == [1, 2]
    assert set(np.unique(_label_map(result))) == {0, 1, 2}
    assert np.all(_label_map(result)[BLOB_A] == 2)


def test_graph_not_matching_manifest_is_rejected_at_load(tmp_path: Path) -> None:
    """A graph whose tensor names, fixed patch or channels differ from the manifest fails at load."""
    cases: list[tuple[str, Any, dict[str, Any]]] = [
        ("input.tensor", sigmoid_model(input_name="x"), {}),
        ("output.tensor", sigmoid_model(output_name="y"), {}),
        ("preprocessing.patch_size[1]", sigmoid_model(fixed_shape=(8, 32, 16)), {}),
        ("input.dimensions", sigmoid_model(dimensions=2), {}),
        ("labels", two_class_model(), {}),
    ]
    for index, (key, model, _) in enumerate(cases):
        folder = write_package(tmp_path / str(index), manifest_dict(), model)
        with pytest.raises(ManifestError) as caught:
            ModelPackage.load(folder, providers=("CPUExecutionProvider",))
        assert caught.value.key == key


def test_onnxruntime_failure_is_an_inference_error(tmp_path: Path) -> None:
    """An onnxruntime failure while running becomes InferenceError, not a raw onnxruntime exception."""
    folder = write_package(tmp_path, manifest_dict(), reshape_model([1, 1, 4, 4, 4]))
    package = ModelPackage.load(folder, providers=("CPUExecutionProvider",))
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        package.run(make_volume(_blobs()))


def test_longest_diameter_matches_all_pairs() -> None:
    """The hull-based diameter equals the brute-force maximum over all voxel pairs, sphere and oddities."""
    grid = np.indices((17, 17, 17)) - 8
    sphere = (grid**2).sum(axis=0) <= 64
    assert longest_diameter_mm(sphere, (1.0, 1.0, 1.0)) == pytest.approx(16.0)
    rng = np.random.default_rng(7)
    shapes = [
        sphere,
        rng.random((6, 9, 7)) > 0.6,
        np.eye(12, dtype=bool)[None],  # an oblique line in one slice
        np.ones((1, 1, 1), dtype=bool),
    ]
    spacing = (2.5, 0.7, 0.9)
    for mask in shapes:
        points = np.argwhere(mask) * np.array(spacing)
        brute = float(pdist(points).max()) if len(points) > 1 else 0.0
        assert longest_diameter_mm(mask, spacing) == pytest.approx(brute)


def test_patch_starts_cover_the_axis() -> None:
    """Patch starts begin at 0, end flush with the axis and never leave a gap wider than the patch."""
    for size, patch, overlap in [(40, 16, 0.25), (16, 16, 0.5), (5, 16, 0.0), (100, 32, 0.0), (33, 32, 0.9)]:
        starts = patch_starts(size, patch, overlap)
        assert starts[0] == 0
        assert starts[-1] == max(0, size - patch)
        assert all(b - a <= patch for a, b in itertools.pairwise(starts))


def test_resample_above_is_exact_where_it_matters() -> None:
    """The thresholded upsampling equals full linear resampling wherever the result reaches the threshold."""
    rng = np.random.default_rng(1)
    coarse = (rng.random((6, 9, 7)) ** 4).astype(np.float32)
    full = resample(coarse, (11, 20, 15))
    partial = resample_above(coarse, (11, 20, 15), 0.6)
    above = full >= 0.6
    assert above.any()
    assert np.allclose(partial[above], full[above], atol=1e-6)
    assert np.all(partial[~above] < 0.6)
    assert not resample_above(coarse, (11, 20, 15), 1.5).any()


def test_negative_volume_has_no_findings(tmp_path: Path) -> None:
    """A volume of air yields no findings and an all-zero label map of the native shape."""
    volume = make_volume(np.full((6, 20, 24), AIR, dtype=np.float32), spacing_mm=SPACING)
    result = _package(tmp_path, preprocessing={"target_spacing_mm": [3.0, 1.5, 1.5]}).run(volume)
    assert result.findings == ()
    assert not result.positive
    assert _label_map(result).shape == (6, 20, 24)
    assert not _label_map(result).any()
