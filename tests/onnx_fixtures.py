"""Tiny real ONNX graphs (built with ``onnx.helper``, no torch) and model packages for the tests.

The models are pointwise, so their output at a voxel does not depend on the patch around it:
``sigmoid_model`` computes ``Sigmoid((x - 0.5) * 40)``, which after the window [-1000, 400]
normalization turns voxels brighter than about -300 HU into lesion probability ~1 and air into ~0.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from reader.inference.runtime import GPU_PROVIDERS, ORT_ERRORS
from reader.volume import SourceInstance, Volume

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the project supports

# The window of the default manifest and the normalized cut of the sigmoid model, in HU.
WINDOW_HU = (-1000.0, 400.0)


def _dims(dimensions: int, fixed: Sequence[int] | None) -> list[int | str]:
    if fixed is not None:
        return [1, 1, *fixed]
    return [1, 1, *("dhw"[3 - dimensions :])]


def _model(
    nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], initializers: list[Any]
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fixture", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _scalar(name: str, value: float, dtype: int = TensorProto.FLOAT) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, [], [value])


def sigmoid_model(
    *,
    dimensions: int = 3,
    offset: float = 0.5,
    scale: float = 40.0,
    input_name: str = "image",
    output_name: str = "probabilities",
    fixed_shape: Sequence[int] | None = None,
    float16: bool = False,
) -> onnx.ModelProto:
    """One channel: ``Sigmoid((x - offset) * scale)`` over a (1, 1, *spatial) input."""
    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    shape = _dims(dimensions, fixed_shape)
    nodes = [
        helper.make_node("Sub", [input_name, "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [output_name]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info(input_name, elem, shape)],
        [helper.make_tensor_value_info(output_name, elem, shape)],
        [_scalar("offset", offset, elem), _scalar("scale", scale, elem)],
    )


def two_class_model() -> onnx.ModelProto:
    """Two channels: "mid" for normalized x in (0.5, 0.9) (about -300..260 HU), "bright" above 0.9."""
    shape = _dims(3, None)
    nodes = [
        helper.make_node("Sub", ["image", "low"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["la"]),
        helper.make_node("Sigmoid", ["la"], ["above_low"]),
        helper.make_node("Sub", ["image", "high"], ["b"]),
        helper.make_node("Mul", ["b", "scale"], ["lb"]),
        helper.make_node("Sigmoid", ["lb"], ["bright"]),
        helper.make_node("Sub", ["above_low", "bright"], ["mid"]),
        helper.make_node("Concat", ["mid", "bright"], ["probabilities"], axis=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2, "d", "h", "w"])],
        [_scalar("low", 0.5), _scalar("high", 0.9), _scalar("scale", 40.0)],
    )


def label_map_model(*, cut: float = 0.5) -> onnx.ModelProto:
    """A label map: ``int64(x > cut)``, i.e. label value 1 where the normalized voxel is bright."""
    shape = _dims(3, None)
    nodes = [
        helper.make_node("Greater", ["image", "cut"], ["mask"]),
        helper.make_node("Cast", ["mask"], ["labels"], to=TensorProto.INT64),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("labels", TensorProto.INT64, shape)],
        [_scalar("cut", cut)],
    )


def shifted_sigmoid_model(*, offset: float = 0.5, scale: float = 40.0) -> onnx.ModelProto:
    """Not mirror-symmetric: ``Sigmoid((x[..., j + 1] - offset) * scale)``, the sigmoid model read one
    column to the right (a 1 x 1 x 2 convolution with weights [0, 1], zero past the last column), so
    a bright blob comes out one column left of where it is."""
    shape = _dims(3, None)
    nodes = [
        helper.make_node("Conv", ["image", "kernel"], ["shifted"], pads=[0, 0, 0, 0, 0, 1]),
        helper.make_node("Sub", ["shifted", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    kernel = helper.make_tensor("kernel", TensorProto.FLOAT, [1, 1, 1, 1, 2], [0.0, 1.0])
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, shape)],
        [kernel, _scalar("offset", offset), _scalar("scale", scale)],
    )


def reshape_model(target: Sequence[int]) -> onnx.ModelProto:
    """Reshapes its input to a fixed ``target`` shape: onnxruntime fails on any other patch size."""
    shape = _dims(3, None)
    nodes = [helper.make_node("Reshape", ["image", "target"], ["probabilities"])]
    target_tensor = helper.make_tensor("target", TensorProto.INT64, [len(target)], list(target))
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, list(target))],
        [target_tensor],
    )


def boxes_model(
    boxes: Sequence[Sequence[float]],
    *,
    dimensions: int = 3,
    output_name: str = "boxes",
    batch_axis: bool = False,
    width: int | None = None,
) -> onnx.ModelProto:
    """A detector that outputs the constant ``boxes`` (rows of ``[x0, y0, (z0,) x1, y1, (z1,) score,
    label]``) whatever its input, which is still wired in (its maximum times zero is added), so that
    onnxruntime runs it as a real graph. ``batch_axis`` gives (1, N, K); ``width`` overrides K."""
    k = width if width is not None else 2 * dimensions + 2
    rows = [list(map(float, row)) for row in boxes]
    shape = [1, len(rows), k] if batch_axis else [len(rows), k]
    flat = [v for row in rows for v in row]
    nodes = [
        helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
        helper.make_node("Add", ["constant_boxes", "nothing"], [output_name]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, _dims(dimensions, None))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor("constant_boxes", TensorProto.FLOAT, shape, flat), _scalar("zero", 0.0)],
    )


# --- manifests -----------------------------------------------------------------------------------


def boxes_manifest_dict(*, dimensions: int = 3, modalities: Sequence[str] = ("CT",)) -> dict[str, Any]:
    """A valid manifest of a detector (``output.kind = "boxes"``): no sliding-window or segmentation keys."""
    data = manifest_dict(dimensions=dimensions)
    del data["model"]["onnx_fp16"]
    data["input"]["modalities"] = list(modalities)
    for key in ("overlap", "blend"):
        del data["preprocessing"][key]
    data["preprocessing"]["patch_size"] = [4, 16, 16] if dimensions == 3 else [16, 16]
    data["output"] = {"tensor": "boxes", "kind": "boxes"}
    data["labels"] = [box_label_dict(1, "Lung lesion")]
    return data


def box_label_dict(
    value: int, name: str, *, min_score: float = 0.5, max_findings: int = 10
) -> dict[str, Any]:
    """One ``[[labels]]`` entry of a boxes model."""
    entry = label_dict(value, name)
    for key in ("threshold", "min_volume_mm3"):
        del entry[key]
    entry.update(min_score=min_score, max_findings=max_findings)
    return entry


def manifest_dict(*, dimensions: int = 3) -> dict[str, Any]:
    """A valid schema-1 manifest as nested dicts, matching ``models/MANIFEST.md``; mutate freely."""
    return {
        "schema": 1,
        "model": {
            "name": "test-blobs",
            "version": "0.0.1",
            "source": "reader tests",
            "description": "Bright blobs are lesions.",
            "family": {"scheme": "DCM", "value": "123110", "meaning": "Artificial Intelligence"},
            "onnx": "model.onnx",
            "onnx_fp16": "model.fp16.onnx",
        },
        "input": {"tensor": "image", "dimensions": dimensions, "modalities": ["CT"]},
        "preprocessing": {
            "window": list(WINDOW_HU),
            "normalize": "window",
            "patch_size": [8, 16, 16] if dimensions == 3 else [16, 16],
            "overlap": 0.25,
            "blend": "gaussian",
        },
        "output": {"tensor": "probabilities", "kind": "probabilities"},
        "labels": [label_dict(1, "Lung lesion")],
    }


def label_dict(value: int, name: str, *, min_volume_mm3: float = 0.0) -> dict[str, Any]:
    """One ``[[labels]]`` entry with permissive filters (threshold and min_score 0.5)."""
    return {
        "value": value,
        "name": name,
        "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Abnormal Structure"},
        "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
        "site": {"scheme": "SCT", "value": "39607008", "meaning": "Lung"},
        "threshold": 0.5,
        "min_score": 0.5,
        "min_volume_mm3": min_volume_mm3,
        "max_findings": 10,
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for manifests: scalars, [tables] of scalars/inline tables, [[labels]]."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    for key, entries in arrays:
        for entry in entries:
            lines += ["", f"[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in entry.items())]
    return "\n".join(lines) + "\n"


def write_package(
    folder: Path,
    manifest: Mapping[str, Any] | None = None,
    model: onnx.ModelProto | None = None,
    *,
    fp16_model: onnx.ModelProto | None = None,
    digests: bool = True,
) -> Path:
    """Write ``model.toml`` and ``model.onnx`` (default: the sigmoid model) into ``folder``.

    With ``digests`` the manifest's ``[model]`` gets ``onnx_sha256`` (and ``onnx_fp16_sha256`` when it
    names ``onnx_fp16``) of the files written, unless it sets them itself; an fp16 graph named but
    not written gets :data:`ABSENT_SHA256`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(dict(manifest if manifest is not None else manifest_dict()))
    dims = int(data.get("input", {}).get("dimensions", 3)) if isinstance(data.get("input"), dict) else 3
    onnx.save(
        model if model is not None else sigmoid_model(dimensions=dims if dims in (2, 3) else 3),
        str(folder / "model.onnx"),
    )
    if fp16_model is not None:
        onnx.save(fp16_model, str(folder / "model.fp16.onnx"))
    info = data.get("model")
    if digests and isinstance(info, dict):
        info.setdefault("onnx_sha256", sha256_of(folder / "model.onnx"))
        if "onnx_fp16" in info:
            fp16 = folder / "model.fp16.onnx"
            info.setdefault("onnx_fp16_sha256", sha256_of(fp16) if fp16.is_file() else ABSENT_SHA256)
    (folder / "model.toml").write_text(to_toml(data), encoding="utf-8")
    return folder


# The digest written for an fp16 graph that a manifest names but the package does not hold.
ABSENT_SHA256 = "0" * 64


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, lowercase hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- volumes -------------------------------------------------------------------------------------


def make_volume(
    voxels: np.ndarray[Any, np.dtype[np.float32]],
    *,
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    row_cosines: tuple[float, float, float] = (1.0, 0.0, 0.0),
    column_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0),
    modality: str = "CT",
) -> Volume:
    """A :class:`Volume` around ``voxels`` with made-up UIDs and one source per slice."""
    sources = tuple(
        SourceInstance(
            path=Path(f"/nonexistent/{i}.dcm"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}",
        )
        for i in range(voxels.shape[0])
    )
    return Volume(
        voxels=voxels.astype(np.float32, copy=False),
        spacing_mm=spacing_mm,
        origin_mm=origin_mm,
        row_cosines=row_cosines,
        column_cosines=column_cosines,
        sources=sources,
        modality=modality,
        study_instance_uid="1.2.826.0.1.3680043.8.498.100",
        series_instance_uid="1.2.826.0.1.3680043.8.498.200",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.300",
    )


def blob_package(folder: Path) -> Path:
    """A package of :func:`sigmoid_model` marking dense (bright) structures, resampled coarsely
    (5 x 4 x 4 mm) so that a node test processes a CT series in about a second; at most 2 findings
    of 5 mL or more."""
    m = manifest_dict()
    m["preprocessing"]["patch_size"] = [16, 128, 128]
    m["preprocessing"]["target_spacing_mm"] = [5.0, 4.0, 4.0]
    m["labels"][0]["min_volume_mm3"] = 5000.0
    m["labels"][0]["max_findings"] = 2
    return write_package(folder, m)


def first_working_provider(requested: Sequence[str]) -> str:
    """The first of ``requested`` that really runs a session on this machine, probed one at a time.

    onnxruntime-gpu lists CUDA and TensorRT wherever it is installed, GPU or not; a session asked
    for one of them alone starts on CPU instead (or fails) where the device or the provider's
    libraries are missing, so ``session.get_providers()[0]`` tells whether it runs. The CPU wheel
    lists neither. A GPU provider is believed only where an NVIDIA device node exists.
    """
    available = set(ort.get_available_providers())
    model = sigmoid_model().SerializeToString()
    for provider in requested:
        if provider not in available:
            continue
        ort.set_default_logger_severity(4)  # a GPU provider that cannot load says so loudly
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                session = ort.InferenceSession(model, providers=[provider])
        except ORT_ERRORS:
            continue
        finally:
            ort.set_default_logger_severity(2)
        if session.get_providers()[0] == provider:
            has_gpu = any(Path("/dev").glob("nvidia[0-9]*"))
            assert provider not in GPU_PROVIDERS or has_gpu, f"{provider} runs without an NVIDIA device node"
            return provider
    raise AssertionError(f"none of {list(requested)} runs here (available: {sorted(available)})")
