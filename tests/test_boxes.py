"""Detection models (``output.kind = "boxes"``): manifest, output contract, NMS, findings, calibration."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from reader.errors import InferenceError, ManifestError
from reader.findings import Code, Finding, FindingClass, InferenceResult, Outline
from reader.inference import Calibration, ModelPackage, calibrate, load_manifest
from reader.inference.boxes import read_boxes
from reader.volume import Volume, load_volume
from tests.onnx_fixtures import (
    box_label_dict,
    boxes_manifest_dict,
    boxes_model,
    make_volume,
    manifest_dict,
    sha256_of,
    write_package,
)
from tests.results_helpers import require_ct, tumour_box

AIR = -1000.0
CALIBRATION = {"scores": [0.5, 0.9], "probabilities": [0.2, 0.8]}

Mutation = Callable[[dict[str, Any]], None]


def _package(
    folder: Path,
    boxes: Sequence[Sequence[float]],
    *,
    data: dict[str, Any] | None = None,
    dimensions: int = 3,
    **model: Any,
) -> ModelPackage:
    """A boxes package whose graph outputs the constant ``boxes``."""
    manifest = data if data is not None else boxes_manifest_dict(dimensions=dimensions)
    graph = boxes_model(boxes, dimensions=manifest["input"]["dimensions"], **model)
    return ModelPackage.load(write_package(folder, manifest, graph), providers=("CPUExecutionProvider",))


def _air(shape: tuple[int, int, int] = (8, 32, 32), **geometry: Any) -> Volume:
    return make_volume(np.full(shape, AIR, dtype=np.float32), **geometry)


def _two_labels(**first: Any) -> dict[str, Any]:
    data = boxes_manifest_dict()
    data["labels"] = [box_label_dict(1, "Nodule", **first), box_label_dict(2, "Mass")]
    return data


def _native_edge(u: float, model_size: int, native_size: int) -> float:
    """A model-grid edge coordinate on the native grid: centre i <-> i * (native - 1) / (model - 1)."""
    scale = (native_size - 1) / (model_size - 1)
    return (u - 0.5) * scale + 0.5


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> tuple[tuple[float, float], ...]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))


def _assert_outline(outline: Outline, expected: tuple[tuple[float, float], ...], abs_: float) -> None:
    assert len(outline.points) == 5
    for got, want in zip(outline.points, expected, strict=True):
        assert got == pytest.approx(want, abs=abs_)


# --- the manifest ---------------------------------------------------------------------------------


def test_boxes_manifest_loads(tmp_path: Path) -> None:
    """A boxes manifest loads without sliding-window or segmentation keys, with IoU 0.5 unless set."""
    data = boxes_manifest_dict()
    manifest = load_manifest(write_package(tmp_path / "a", data, boxes_model([])))
    assert (manifest.output.kind, manifest.output.nms_iou) == ("boxes", 0.5)
    assert (manifest.preprocessing.overlap, manifest.preprocessing.blend) == (0.0, "constant")
    (label,) = manifest.labels
    assert (label.min_score, label.threshold, label.min_volume_mm3) == (0.5, 0.5, 0.0)
    assert label.calibration is None
    data["output"]["nms_iou"] = 0.3
    data["labels"][0]["calibration"] = CALIBRATION
    manifest = load_manifest(write_package(tmp_path / "b", data, boxes_model([])))
    assert manifest.output.nms_iou == 0.3
    assert manifest.labels[0].calibration == Calibration(scores=(0.5, 0.9), probabilities=(0.2, 0.8))


def test_spec_boxes_example_loads(tmp_path: Path) -> None:
    """The detector example in models/MANIFEST.md is a valid manifest, and its 2-D graph contract loads."""
    spec = (Path(__file__).resolve().parents[1] / "models" / "MANIFEST.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", spec, re.DOTALL)
    example = next(b for b in blocks if 'kind = "boxes"' in b)
    graph = boxes_model([], dimensions=2)
    (tmp_path / "model.onnx").write_bytes(graph.SerializeToString())
    text, count = re.subn(
        r'onnx_sha256 = "[0-9a-f]{64}"', f'onnx_sha256 = "{sha256_of(tmp_path / "model.onnx")}"', example
    )
    assert count == 1
    (tmp_path / "model.toml").write_text(text, encoding="utf-8")
    package = ModelPackage.load(tmp_path, providers=("CPUExecutionProvider",))
    assert (package.manifest.output.kind, package.manifest.input.modalities) == ("boxes", ("CR", "DX"))
    assert package.manifest.labels[0].max_findings == 5


def _set_label(key: str, value: Any) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        data["labels"][0][key] = value

    return apply


def _set_section(section: str, key: str, value: Any) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        data[section][key] = value

    return apply


def _calibration(**changes: Any) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        data["labels"][0]["calibration"] = {**CALIBRATION, **changes}

    return apply


def _nms_on_probabilities(data: dict[str, Any]) -> None:
    data.clear()
    data.update(manifest_dict())
    data["output"]["nms_iou"] = 0.5


INVALID: list[tuple[str, Mutation]] = [
    ("labels[0].threshold", _set_label("threshold", 0.5)),
    ("labels[0].min_volume_mm3", _set_label("min_volume_mm3", 10.0)),
    ("labels[0].min_lung_fraction", _set_label("min_lung_fraction", 0.5)),
    ("preprocessing.overlap", _set_section("preprocessing", "overlap", 0.25)),
    ("preprocessing.blend", _set_section("preprocessing", "blend", "gaussian")),
    ("preprocessing.test_time_flips", _set_section("preprocessing", "test_time_flips", ["row"])),
    ("preprocessing.edge_mirror_voxels", _set_section("preprocessing", "edge_mirror_voxels", [1, 0, 0])),
    ("output.nms_iou", _set_section("output", "nms_iou", 1.5)),
    ("output.nms_iou", _nms_on_probabilities),
    ("labels[0].calibration.scores[1]", _calibration(scores=[0.5, 0.5])),
    ("labels[0].calibration.probabilities[1]", _calibration(probabilities=[0.8, 0.2])),
    ("labels[0].calibration.scores[0]", _calibration(scores=[-0.1, 0.9])),
    ("labels[0].calibration.probabilities[1]", _calibration(probabilities=[0.2, 1.2])),
    ("labels[0].calibration.probabilities", _calibration(probabilities=[0.2, 0.5, 0.8])),
    ("labels[0].calibration.scores", _calibration(scores=[0.5], probabilities=[0.5])),
    ("labels[0].calibration.knots", _calibration(knots=[1])),
    ("labels[0].calibration", _set_label("calibration", [0.5, 0.9])),
]


@pytest.mark.parametrize(("key", "mutate"), INVALID, ids=[f"{k}-{i}" for i, (k, _) in enumerate(INVALID)])
def test_invalid_boxes_or_calibration_key_is_named(tmp_path: Path, key: str, mutate: Mutation) -> None:
    """Each key a boxes model does not use, and each malformed calibration, raises ManifestError naming it."""
    data = boxes_manifest_dict()
    mutate(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_package(tmp_path, data, boxes_model([])))
    assert caught.value.key == key, caught.value


def test_graph_box_width_is_checked_at_load(tmp_path: Path) -> None:
    """A graph whose fixed output gives the wrong number of values per box is refused at load."""
    with pytest.raises(ManifestError, match="7 values per box") as caught:
        _package(tmp_path / "seven", [], width=7)
    assert caught.value.key == "output.tensor"
    with pytest.raises(ManifestError, match="2-D boxes model gives 6"):
        _package(tmp_path / "flat", [], data=boxes_manifest_dict(dimensions=2), width=8)


# --- calibration ------------------------------------------------------------------------------------


def test_calibration_is_piecewise_linear_and_flat_outside() -> None:
    """A calibration interpolates linearly between its points and holds its end values beyond them."""
    curve = Calibration(scores=(0.5, 0.7, 0.9), probabilities=(0.2, 0.2, 0.8))
    assert [curve(s) for s in (0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)] == pytest.approx(
        [0.2, 0.2, 0.2, 0.2, 0.5, 0.8, 0.8]
    )


def test_calibrate_fills_segmentation_findings(tmp_path: Path) -> None:
    """calibrate() sets calibrated_score on findings of a calibrated label and leaves the others None."""
    data = manifest_dict()
    data["labels"][0]["calibration"] = CALIBRATION
    data["labels"].append({**data["labels"][0], "value": 2, "name": "other"})
    del data["labels"][1]["calibration"]
    labels = load_manifest(write_package(tmp_path, data)).labels
    code = Code("27925004", "SCT", "Nodule")

    def finding(label: int, score: float) -> Finding:
        return Finding(
            number=label,
            finding_class=FindingClass(label, f"l{label}", code, code, None),
            score=score,
            voxel_count=10,
            volume_mm3=12.5,
            longest_diameter_mm=4.0,
            centroid_mm=(0.0, 0.0, 0.0),
            slice_indices=(0,),
            outline=Outline(0, _rectangle(0.0, 0.0, 2.0, 2.0)),
        )

    calibrated, plain = calibrate((finding(1, 0.7), finding(2, 0.7)), labels)
    assert calibrated.calibrated_score == pytest.approx(0.5)
    assert calibrated.volume_mm3 == 12.5
    assert plain.calibrated_score is None


# --- mapping back to the native grid --------------------------------------------------------------


def test_3d_box_maps_back_to_the_radiologists_box_on_real_ct(tmp_path: Path) -> None:
    """On the real 64-slice CT, a box a 3-D detector draws on its 1.5 mm grid around the radiologist's
    tumour box comes back as that box on the native slices: slices spanned, centre key slice,
    rectangle, sides in mm and centre in patient coordinates."""
    volume = load_volume(sorted(require_ct().glob("*.dcm")))
    truth = tumour_box(volume)
    data = boxes_manifest_dict()
    data["preprocessing"]["target_spacing_mm"] = [5.0, 1.5, 1.5]
    native = volume.shape
    # The model grid of target_spacing_mm (corner-aligned, as reader.inference.preprocess builds it).
    target = (5.0, 1.5, 1.5)
    grid = tuple(
        max(1, round((n - 1) * s / t) + 1) for n, s, t in zip(native, volume.spacing_mm, target, strict=True)
    )
    assert grid[0] == native[0] and grid[1] < native[1]
    lo = (truth.slices[0], truth.rows[0], truth.columns[0])
    hi = (truth.slices[1] + 1, truth.rows[1] + 1, truth.columns[1] + 1)

    def to_model(u: float, axis: int) -> float:
        scale = (native[axis] - 1) / (grid[axis] - 1)
        return (u - 0.5) / scale + 0.5

    z0, y0, x0 = (to_model(v, a) for a, v in enumerate(lo))
    z1, y1, x1 = (to_model(v, a) for a, v in enumerate(hi))
    result = _package(tmp_path, [[x0, y0, z0, x1, y1, z1, 0.9, 1]], data=data).run(volume)
    assert result.label_map is None
    (finding,) = result.findings
    assert finding.slice_indices == tuple(range(truth.slices[0], truth.slices[1] + 1))
    assert finding.outline.slice_index == (lo[0] + hi[0]) // 2
    _assert_outline(finding.outline, _rectangle(lo[2], lo[1], hi[2], hi[1]), abs_=1e-3)
    sides = sorted(((hi[2] - lo[2]) * volume.spacing_mm[2], (hi[1] - lo[1]) * volume.spacing_mm[1]))
    assert (finding.short_axis_mm, finding.longest_diameter_mm) == pytest.approx(sides, abs=1e-3)
    assert finding.volume_mm3 is None
    centre = ((lo[0] + hi[0]) / 2.0 - 0.5, (lo[1] + hi[1]) / 2.0 - 0.5, (lo[2] + hi[2]) / 2.0 - 0.5)
    assert finding.centroid_mm == pytest.approx(volume.voxel_to_patient(centre), abs=1e-2)
    assert finding.voxel_count == math.prod(b - a for a, b in zip(lo, hi, strict=True))


def test_2d_box_maps_back_on_the_cr_radiograph(tmp_path: Path) -> None:
    """On the real CR chest radiograph RG1_UNCR.dcm, a 2-D detector's box on its 1 mm grid comes back
    on the native pixels of slice 0, with its sides in mm of the radiograph's pixel spacing."""
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data is needed (pip install pydicom-data)"
    volume = load_volume([Path(path)])
    assert volume.modality == "CR" and volume.shape[0] == 1
    data = boxes_manifest_dict(dimensions=2, modalities=("CR", "DX"))
    data["preprocessing"]["target_spacing_mm"] = [1.0, 1.0]
    package = _package(tmp_path, [[40.0, 60.0, 100.0, 140.0, 0.8, 1]], data=data)
    result = package.run(volume)
    (finding,) = result.findings
    _, rows, columns = volume.shape
    grid_rows = round((rows - 1) * volume.spacing_mm[1] / 1.0) + 1
    grid_columns = round((columns - 1) * volume.spacing_mm[2] / 1.0) + 1
    x0, x1 = (_native_edge(u, grid_columns, columns) for u in (40.0, 100.0))
    y0, y1 = (_native_edge(u, grid_rows, rows) for u in (60.0, 140.0))
    assert finding.outline.slice_index == 0 and finding.slice_indices == (0,)
    _assert_outline(finding.outline, _rectangle(x0, y0, x1, y1), abs_=1e-3)
    assert finding.longest_diameter_mm == pytest.approx((y1 - y0) * volume.spacing_mm[1], rel=1e-6)
    assert finding.short_axis_mm == pytest.approx((x1 - x0) * volume.spacing_mm[2], rel=1e-6)
    assert finding.longest_diameter_mm == pytest.approx(80.0, rel=0.02)  # 80 pixels of 1 mm
    assert result.label_map is None


# --- selection: min_score, NMS, max_findings ---------------------------------------------------------

A: list[float] = [2, 2, 1, 12, 12, 5, 0.9, 1]
B: list[float] = [3, 3, 1, 13, 13, 5, 0.8, 1]  # IoU with A: 324 / 476 = 0.68
C: list[float] = [3, 3, 1, 13, 13, 5, 0.7, 2]  # as B, another label
D: list[float] = [20, 20, 1, 30, 30, 5, 0.6, 1]  # apart


def test_nms_suppresses_overlaps_within_a_label(tmp_path: Path) -> None:
    """A box overlapping a better one of its label beyond nms_iou is dropped, one of another label is
    kept, and findings are numbered 1..N by descending score across labels."""
    result = _package(tmp_path / "a", [D, C, B, A], data=_two_labels()).run(_air())
    assert [(f.number, round(f.score, 4), f.finding_class.label) for f in result.findings] == [
        (1, 0.9, 1),
        (2, 0.7, 2),
        (3, 0.6, 1),
    ]
    loose = _two_labels()
    loose["output"]["nms_iou"] = 0.7
    result = _package(tmp_path / "b", [D, C, B, A], data=loose).run(_air())
    assert [f.score for f in result.findings] == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_min_score_and_max_findings_select_boxes(tmp_path: Path) -> None:
    """Boxes under their label's min_score are dropped, at most max_findings per label are kept, best
    first, and all-zero padding rows are ignored."""
    rows: list[list[float]] = [
        [1, 1, 0, 5, 5, 2, 0.55, 1],
        [10, 10, 0, 15, 15, 2, 0.95, 1],
        [20, 20, 0, 25, 25, 2, 0.45, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]

    def scores(name: str, **label: Any) -> list[float]:
        data = boxes_manifest_dict()
        data["labels"] = [box_label_dict(1, "Lung lesion", **label)]
        return [round(f.score, 4) for f in _package(tmp_path / name, rows, data=data).run(_air()).findings]

    assert scores("all") == [0.95, 0.55]
    assert scores("min_score", min_score=0.6) == [0.95]
    assert scores("max_findings", max_findings=1) == [0.95]


# --- the findings ----------------------------------------------------------------------------------


def test_box_finding_fields(tmp_path: Path) -> None:
    """A box becomes a finding with its rectangle on its centre slice, longer and shorter side in mm,
    no volume, the covered voxels, its centre in patient coordinates and the calibrated score; the
    result has no label map and names the weights, from a (1, N, 8) output as from (N, 8)."""
    spacing = (2.0, 0.8, 0.7)
    volume = _air(spacing_mm=spacing, origin_mm=(-100.0, 50.0, 20.0),
                  column_cosines=(0.0, math.cos(0.5), math.sin(0.5)))
    data = boxes_manifest_dict()
    data["labels"][0]["calibration"] = CALIBRATION
    package = _package(tmp_path, [[2.5, 4.0, 1.0, 10.5, 8.0, 4.0, 0.7, 1]], data=data, batch_axis=True)
    result = package.run(volume)
    assert isinstance(result, InferenceResult)
    assert result.label_map is None
    assert result.algorithm.weights_sha256 == sha256_of(tmp_path / "model.onnx")
    assert result.precision == "fp32"
    (finding,) = result.findings
    assert finding.number == 1
    assert finding.score == pytest.approx(0.7)
    assert finding.calibrated_score == pytest.approx(0.5)
    assert finding.slice_indices == (1, 2, 3)
    assert finding.outline.slice_index == 2
    _assert_outline(finding.outline, _rectangle(2.5, 4.0, 10.5, 8.0), abs_=1e-6)
    assert finding.longest_diameter_mm == pytest.approx(8.0 * 0.7)
    assert finding.short_axis_mm == pytest.approx(4.0 * 0.8)
    assert finding.volume_mm3 is None
    assert finding.voxel_count == 3 * 4 * 9  # slices 1-3, rows 4-7, columns 2-10
    assert finding.centroid_mm == pytest.approx(volume.voxel_to_patient((2.0, 5.5, 6.0)))
    assert finding.site is None


def test_2d_detector_runs_on_each_ct_slice(tmp_path: Path) -> None:
    """A 2-D detector runs on every slice: the same box on three slices is three one-slice findings,
    none suppressed by another slice's."""
    result = _package(tmp_path, [[4, 4, 12, 10, 0.8, 1]], dimensions=2).run(_air((3, 20, 24)))
    assert [(f.number, f.slice_indices, f.outline.slice_index) for f in result.findings] == [
        (1, (0,), 0),
        (2, (1,), 1),
        (3, (2,), 2),
    ]


def test_box_past_the_edge_is_clipped_and_one_in_the_padding_dropped(tmp_path: Path) -> None:
    """A box reaching past the image is clipped to it; one that lies only in the padding up to
    patch_size is dropped without error."""
    rows = [[-5, -3, -1, 10, 10, 1, 0.9, 1], [2, 2, 2.5, 6, 6, 3.5, 0.8, 1]]  # 2 slices, padded to 4
    result = _package(tmp_path, rows).run(_air((2, 32, 32)))
    (finding,) = result.findings
    _assert_outline(finding.outline, _rectangle(0.0, 0.0, 10.0, 10.0), abs_=1e-6)
    assert finding.slice_indices == (0,)


BAD_OUTPUTS: list[tuple[str, list[list[float]], dict[str, Any]]] = [
    ("NaN or infinite", [[1, 1, 1, math.nan, 5, 2, 0.9, 1]], {}),
    ("scores outside", [[1, 1, 1, 5, 5, 2, 1.5, 1]], {}),
    ("label 3", [[1, 1, 1, 5, 5, 2, 0.9, 3]], {}),
    ("label 1.5", [[1, 1, 1, 5, 5, 2, 0.9, 1.5]], {}),
    ("not in order", [[5, 1, 1, 1, 5, 2, 0.9, 1]], {}),
    ("outside the model input", [[100, 1, 1, 120, 5, 2, 0.9, 1]], {}),
]


def test_output_of_the_wrong_shape_is_an_inference_error(tmp_path: Path) -> None:
    """An output that is not (N, 8) or (1, N, 8) for a 3-D model, or holds no numbers, is refused."""
    labels = load_manifest(write_package(tmp_path, boxes_manifest_dict(), boxes_model([]))).labels
    for raw in (np.zeros((2, 7)), np.zeros(8), np.zeros((2, 2, 8)), np.array([["a"] * 8])):
        with pytest.raises(InferenceError, match=r"expected \(N, 8\)|expected numbers"):
            read_boxes(raw, labels, image_shape=(4, 16, 16), input_shape=(4, 16, 16), name="boxes")


@pytest.mark.parametrize(("message", "rows", "graph"), BAD_OUTPUTS, ids=[m for m, _, _ in BAD_OUTPUTS])
def test_bad_box_output_is_an_inference_error(
    tmp_path: Path, message: str, rows: list[list[float]], graph: dict[str, Any]
) -> None:
    """An output that breaks the boxes contract is refused with an InferenceError saying how."""
    package = _package(tmp_path, rows, **graph)
    with pytest.raises(InferenceError, match=message):
        package.run(_air())
