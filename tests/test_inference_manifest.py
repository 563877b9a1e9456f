"""The model manifest (``model.toml``, ``models/MANIFEST.md``): valid ones load typed, bad keys are named."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reader.errors import ManifestError, ModelError
from reader.findings import AlgorithmIdentity, Code, FindingClass
from reader.inference import ModelManifest, load_manifest
from tests.onnx_fixtures import (
    ABSENT_SHA256,
    label_dict,
    manifest_dict,
    sha256_of,
    sigmoid_model,
    to_toml,
    write_package,
)

REPO = Path(__file__).resolve().parents[1]

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting the dotted ``path`` (list indices as numbers) to ``value``."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return apply


def _drop(path: str) -> Mutation:
    """A mutation deleting the dotted ``path``."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return apply


def _zscore_without_std(data: dict[str, Any]) -> None:
    data["preprocessing"].update(normalize="zscore", mean=0.0)


def _zscore_zero_std(data: dict[str, Any]) -> None:
    data["preprocessing"].update(normalize="zscore", mean=0.0, std=0.0)


def _drop_fp16_keep_digest(data: dict[str, Any]) -> None:
    del data["model"]["onnx_fp16"]
    data["model"]["onnx_fp16_sha256"] = "0" * 64


def _two_labels(data: dict[str, Any]) -> None:
    data["labels"] = [label_dict(1, "a"), label_dict(1, "b")]


def test_valid_manifest_loads_typed(tmp_path: Path) -> None:
    """A valid manifest loads into frozen typed objects: tuples, Codes, absolute paths, TID 4019 identity."""
    folder = write_package(tmp_path / "pkg")
    manifest = load_manifest(folder)
    assert isinstance(manifest, ModelManifest)
    assert manifest.schema == 1
    assert manifest.model.onnx == (folder / "model.onnx").resolve()
    assert manifest.model.onnx_fp16 == (folder / "model.fp16.onnx").resolve()  # recorded, need not exist
    assert manifest.input.modalities == ("CT",)
    assert manifest.input.dimensions == 3
    pre = manifest.preprocessing
    assert pre.patch_size == (8, 16, 16)
    assert pre.window == (-1000.0, 400.0)
    assert pre.target_spacing_mm is None
    assert (pre.normalize, pre.blend, pre.overlap) == ("window", "gaussian", 0.25)
    assert pre.test_time_flips == ()
    assert pre.edge_mirror_voxels == ()
    assert manifest.algorithm == AlgorithmIdentity(
        name="test-blobs",
        version="0.0.1",
        family=Code("123110", "DCM", "Artificial Intelligence"),
        source="reader tests",
        weights_sha256=sha256_of(folder / "model.onnx"),
    )
    assert manifest.model.onnx_fp16_sha256 == ABSENT_SHA256
    (label,) = manifest.labels
    assert label.property_type == Code("27925004", "SCT", "Nodule")
    assert label.site == Code("39607008", "SCT", "Lung")
    assert manifest.finding_classes == (
        FindingClass(1, "Lung lesion", label.category, label.property_type, label.site),
    )
    with pytest.raises(AttributeError):
        manifest.schema = 2  # type: ignore[misc]


def test_spec_example_loads(tmp_path: Path) -> None:
    """The example in models/MANIFEST.md is itself a valid manifest."""
    spec = (REPO / "models" / "MANIFEST.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", spec, re.DOTALL)
    assert example is not None, "models/MANIFEST.md has no ```toml example"
    (tmp_path / "model.onnx").write_bytes(sigmoid_model().SerializeToString())
    # The example's digest is the reference model's; the stand-in graph here has its own.
    text, count = re.subn(
        r'onnx_sha256 = "[0-9a-f]{64}"', f'onnx_sha256 = "{sha256_of(tmp_path / "model.onnx")}"',
        example.group(1),
    )
    assert count == 1, "the example records onnx_sha256 once"
    (tmp_path / "model.toml").write_text(text, encoding="utf-8")
    manifest = load_manifest(tmp_path)
    assert manifest.model.name == "lung-lesion-unet"
    assert manifest.preprocessing.target_spacing_mm == (2.5, 1.5, 1.5)
    assert manifest.labels[0].min_volume_mm3 == 30.0


def test_zscore_and_2d_options_load(tmp_path: Path) -> None:
    """zscore normalization reads mean/std; a 2-D model takes a (row, column) spacing, in-plane
    test-time flips, in-plane edge mirroring and no site."""
    data = manifest_dict(dimensions=2)
    data["preprocessing"].update(
        normalize="zscore",
        mean=-500.0,
        std=500,
        target_spacing_mm=[0.5, 0.5],
        test_time_flips=["column"],
        edge_mirror_voxels=[0, 3],
    )
    del data["labels"][0]["site"]
    del data["model"]["onnx_fp16"]
    manifest = load_manifest(write_package(tmp_path, data))
    pre = manifest.preprocessing
    assert (pre.mean, pre.std) == (-500.0, 500.0)
    assert pre.target_spacing_mm == (None, 0.5, 0.5)
    assert pre.test_time_flips == ("column",)
    assert pre.edge_mirror_voxels == (0, 3)
    assert manifest.labels[0].site is None
    assert manifest.model.onnx_fp16 is None


def test_2d_model_cannot_mirror_slices(tmp_path: Path) -> None:
    """A 2-D model runs slice by slice, so mirroring the slice axis is refused as a manifest error."""
    data = manifest_dict(dimensions=2)
    data["preprocessing"]["test_time_flips"] = ["slice"]
    with pytest.raises(ManifestError) as err:
        load_manifest(write_package(tmp_path, data))
    assert err.value.key == "preprocessing.test_time_flips"


INVALID: list[tuple[str, Mutation]] = [
    ("schema", _set("schema", 2)),
    ("schema", _drop("schema")),
    ("extra", _set("extra", 1)),
    ("model.name", _drop("model.name")),
    ("model.version", _set("model.version", 1)),
    ("model.family.meaning", _drop("model.family.meaning")),
    ("model.family.value", _set("model.family.value", "")),
    ("model.onnx", _set("model.onnx", "missing.onnx")),
    ("model.onnx", _set("model.onnx", "../model.onnx")),
    ("model.onnx_fp16", _set("model.onnx_fp16", "/abs/model.onnx")),
    ("model.colour", _set("model.colour", "red")),
    ("model.onnx_sha256", _set("model.onnx_sha256", "a" * 64)),
    ("model.onnx_sha256", _set("model.onnx_sha256", "not-a-digest")),
    ("model.onnx_sha256", _set("model.onnx_sha256", 12)),
    ("model.onnx_fp16_sha256", _set("model.onnx_fp16_sha256", "0" * 63)),
    ("model.onnx_fp16_sha256", _drop_fp16_keep_digest),
    ("input", _drop("input")),
    ("input.dimensions", _set("input.dimensions", 4)),
    ("input.dimensions", _set("input.dimensions", True)),
    ("input.modalities", _set("input.modalities", [])),
    ("input.modalities[0]", _set("input.modalities", [1])),
    ("preprocessing.target_spacing_mm", _set("preprocessing.target_spacing_mm", [1.0, 0.0, 1.0])),
    ("preprocessing.target_spacing_mm", _set("preprocessing.target_spacing_mm", [1.0, 1.0])),
    ("preprocessing.target_spacing_mm[1]", _set("preprocessing.target_spacing_mm", [1.0, "x", 1.0])),
    ("preprocessing.window", _set("preprocessing.window", [400.0, -1000.0])),
    ("preprocessing.window", _drop("preprocessing.window")),
    ("preprocessing.normalize", _set("preprocessing.normalize", "minmax")),
    ("preprocessing.mean", _set("preprocessing.mean", 0.0)),
    ("preprocessing.mean", _set("preprocessing.normalize", "zscore")),
    ("preprocessing.std", _zscore_without_std),
    ("preprocessing.std", _zscore_zero_std),
    ("preprocessing.patch_size", _set("preprocessing.patch_size", [16, 16])),
    ("preprocessing.patch_size[1]", _set("preprocessing.patch_size", [8, 0, 16])),
    ("preprocessing.patch_size[0]", _set("preprocessing.patch_size", [8.5, 16, 16])),
    ("preprocessing.overlap", _set("preprocessing.overlap", 1.0)),
    ("preprocessing.blend", _set("preprocessing.blend", "max")),
    ("preprocessing.test_time_flips", _set("preprocessing.test_time_flips", ["diagonal"])),
    ("preprocessing.test_time_flips", _set("preprocessing.test_time_flips", ["row", "row"])),
    ("preprocessing.test_time_flips[0]", _set("preprocessing.test_time_flips", [1])),
    ("preprocessing.edge_mirror_voxels", _set("preprocessing.edge_mirror_voxels", [4, 0])),
    ("preprocessing.edge_mirror_voxels[0]", _set("preprocessing.edge_mirror_voxels", [-1, 0, 0])),
    ("preprocessing.edge_mirror_voxels[2]", _set("preprocessing.edge_mirror_voxels", [4, 0, 0.5])),
    ("output.tensor", _drop("output.tensor")),
    ("output.kind", _set("output.kind", "heatmap")),
    ("labels", _set("labels", [])),
    ("labels", _drop("labels")),
    ("labels[0].threshold", _set("labels.0.threshold", 1.5)),
    ("labels[0].threshold", _set("labels.0.threshold", "0.5")),
    ("labels[0].threshold", _set("labels.0.threshold", float("nan"))),
    ("labels[0].min_score", _set("labels.0.min_score", -0.1)),
    ("labels[0].value", _set("labels.0.value", 0)),
    ("labels[0].value", _set("labels.0.value", 256)),
    ("labels[1].value", _two_labels),
    ("labels[0].type", _drop("labels.0.type")),
    ("labels[0].category.scheme", _set("labels.0.category", {"scheme": "", "value": "1", "meaning": "m"})),
    ("labels[0].site.code", _set("labels.0.site", {"scheme": "S", "value": "1", "meaning": "m", "code": 1})),
    ("labels[0].max_findings", _set("labels.0.max_findings", 0)),
    ("labels[0].min_volume_mm3", _set("labels.0.min_volume_mm3", -1.0)),
    ("labels[0].colour", _set("labels.0.colour", "red")),
]


@pytest.mark.parametrize(("key", "mutate"), INVALID, ids=[f"{k}-{i}" for i, (k, _) in enumerate(INVALID)])
def test_invalid_key_is_named(tmp_path: Path, key: str, mutate: Mutation) -> None:
    """Each kind of invalid manifest entry raises ManifestError whose key names exactly that entry."""
    data = manifest_dict()
    mutate(data)
    folder = write_package(tmp_path, data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(folder)
    assert caught.value.key == key, caught.value
    assert caught.value.problem
    assert isinstance(caught.value, ModelError)


def test_missing_or_broken_file_names_model_toml(tmp_path: Path) -> None:
    """A folder without model.toml, or with invalid TOML, raises ManifestError keyed "model.toml"."""
    with pytest.raises(ManifestError) as missing:
        load_manifest(tmp_path)
    assert missing.value.key == "model.toml"
    (tmp_path / "model.toml").write_text(to_toml(manifest_dict()) + "\n[model\n", encoding="utf-8")
    with pytest.raises(ManifestError) as broken:
        load_manifest(tmp_path)
    assert broken.value.key == "model.toml"
    assert "TOML" in broken.value.problem


def test_missing_digest_is_named(tmp_path: Path) -> None:
    """A manifest without onnx_sha256, or naming onnx_fp16 without its digest, is refused naming the key."""
    with pytest.raises(ManifestError) as fp32:
        load_manifest(write_package(tmp_path / "a", manifest_dict(), digests=False))
    assert fp32.value.key == "model.onnx_sha256"
    data = manifest_dict()
    data["model"]["onnx_sha256"] = sha256_of(write_package(tmp_path / "b") / "model.onnx")
    with pytest.raises(ManifestError) as fp16:
        load_manifest(write_package(tmp_path / "b", data, digests=False))
    assert fp16.value.key == "model.onnx_fp16_sha256"


def test_weights_that_differ_from_the_digest_are_refused(tmp_path: Path) -> None:
    """A graph file replaced after the manifest was written is refused, naming the key and both digests;
    an fp16 graph present on disk is checked the same way."""
    folder = write_package(tmp_path, fp16_model=sigmoid_model(float16=True))
    recorded = load_manifest(folder).model.onnx_sha256
    (folder / "model.onnx").write_bytes(sigmoid_model(offset=0.6).SerializeToString())
    with pytest.raises(ManifestError) as caught:
        load_manifest(folder)
    assert caught.value.key == "model.onnx_sha256"
    assert recorded in caught.value.problem
    assert sha256_of(folder / "model.onnx") in caught.value.problem
    data = manifest_dict()
    data["model"]["onnx_fp16_sha256"] = "b" * 64
    fp16 = write_package(tmp_path / "fp16", data, fp16_model=sigmoid_model(float16=True))
    with pytest.raises(ManifestError, match="b" * 64) as wrong16:
        load_manifest(fp16)
    assert wrong16.value.key == "model.onnx_fp16_sha256"


def test_uppercase_digest_is_read_as_lowercase(tmp_path: Path) -> None:
    """A digest written in uppercase hex matches its file and is kept in lowercase."""
    probe = write_package(tmp_path / "probe")
    data = manifest_dict()
    data["model"]["onnx_sha256"] = sha256_of(probe / "model.onnx").upper()
    manifest = load_manifest(write_package(tmp_path / "pkg", data))
    assert manifest.model.onnx_sha256 == sha256_of(probe / "model.onnx")
