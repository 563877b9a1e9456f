"""The model package manifest (``model.toml``, schema 1) as typed, validated, frozen objects.

The format is specified in ``models/MANIFEST.md``. A manifest is valid the moment
:func:`load_manifest` returns, or it raises :class:`reader.errors.ManifestError` naming the key
(``"labels[0].threshold"``) and the problem. Unknown keys are errors too, so that a typo cannot
silently fall back to a default. The coded concepts are DICOM codes: algorithm family (CID 7162),
segmented property category and type (CID 7150, CID 7151) and finding site; the model's name,
version and source become Algorithm Identification (TID 4019).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from reader.errors import ManifestError
from reader.findings import AlgorithmIdentity, Code, FindingClass

__all__ = [
    "DEFAULT_NMS_IOU",
    "MANIFEST_FILE",
    "Calibration",
    "FlipAxis",
    "InputSpec",
    "LabelSpec",
    "ModelInfo",
    "ModelManifest",
    "OutputSpec",
    "Preprocessing",
    "file_sha256",
    "load_manifest",
]

MANIFEST_FILE = "model.toml"
SCHEMA_VERSION = 1
_MAX_LUNG_MARGIN_MM = 30.0  # lung_margin_mm: beyond this the gate stops meaning 'in the chest'

Normalize = Literal["window", "zscore"]
Blend = Literal["gaussian", "constant"]
FlipAxis = Literal["slice", "row", "column"]
OutputKind = Literal["probabilities", "label_map", "boxes"]
DEFAULT_NMS_IOU = 0.5  # output.nms_iou of a boxes model when the manifest does not set it
# Keys a boxes model does not use, refused so that none is read as doing something.
_SEGMENTATION_LABEL_KEYS = ("threshold", "min_volume_mm3", "min_lung_fraction", "lung_margin_mm")
_SLIDING_WINDOW_KEYS = ("overlap", "blend", "test_time_flips", "edge_mirror_voxels")


@dataclass(frozen=True)
class ModelInfo:
    """``[model]``: identity of the algorithm (TID 4019) and the ONNX files, as absolute paths."""

    name: str
    version: str
    source: str
    description: str
    family: Code  # CID 7162 Artificial Intelligence, ...
    onnx: Path  # fp32 graph
    onnx_fp16: Path | None  # optional fp16 graph for CUDA/TensorRT; may be absent on disk
    # SHA-256 (lowercase hex) of each graph, as the manifest records them and as checked at load
    # against the files (the fp16 one only where its file exists): what identifies the weights.
    onnx_sha256: str = ""
    onnx_fp16_sha256: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """``[input]``: the ONNX input tensor and what it is fed."""

    tensor: str
    dimensions: Literal[2, 3]  # 3: (1, 1, D, H, W) over the volume; 2: (1, 1, H, W) slice by slice
    modalities: tuple[str, ...]  # Modality (0008,0060) values the model accepts


@dataclass(frozen=True)
class Preprocessing:
    """``[preprocessing]``: resampling, intensity window/normalization and the sliding window."""

    # (slice, row, column) spacing in mm the volume is resampled to; None = native grid.
    # For 2-D models the slice entry is None: slices are never resampled across.
    target_spacing_mm: tuple[float | None, float, float] | None
    window: tuple[float, float] | None  # (low, high) clip; required for normalize = "window"
    normalize: Normalize
    mean: float | None  # only for "zscore"
    std: float | None  # only for "zscore", > 0
    # (D, H, W) for 3-D models, (H, W) for 2-D; a boxes model: the least input size (the image is
    # padded at the far end of each axis up to it), run once over the whole image.
    patch_size: tuple[int, ...]
    overlap: float  # fraction of a patch shared with its neighbour, in [0, 1); 0 for boxes models
    blend: Blend  # "constant" for boxes models (no sliding window)
    # Test-time augmentation: the model also runs on the image mirrored along each of these axes
    # and the probabilities are averaged (one pass more per axis). Empty: one plain pass.
    test_time_flips: tuple[FlipAxis, ...] = ()
    # Voxels of the model grid (one per patch axis) by which the image is extended beyond each edge
    # with its own mirror image before the sliding window, and cropped after: a lesion cut by the
    # first or last slice is then seen whole, not at the edge of the network's input. Empty: none.
    edge_mirror_voxels: tuple[int, ...] = ()


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: the ONNX output tensor and how to read it."""

    tensor: str
    kind: OutputKind
    # Boxes models: a box is suppressed when its intersection over union with a better-scoring box of
    # the same label exceeds this (greedy non-maximum suppression).
    nms_iou: float = DEFAULT_NMS_IOU


@dataclass(frozen=True)
class Calibration:
    """``calibration``: a label's raw score -> probability that the finding is a true lesion.

    Piecewise linear through the points (``scores[i]``, ``probabilities[i]``), measured on a
    validation set; constant beyond the first and last point. ``scores`` strictly increase and
    ``probabilities`` never decrease, all in [0, 1] (checked by the manifest loader).
    """

    scores: tuple[float, ...]
    probabilities: tuple[float, ...]

    def __call__(self, score: float) -> float:
        """The calibrated probability of a finding with raw ``score``."""
        xs, ys = self.scores, self.probabilities
        if score <= xs[0]:
            return ys[0]
        if score >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, score)  # xs[i - 1] <= score < xs[i]
        t = (score - xs[i - 1]) / (xs[i] - xs[i - 1])
        return min(1.0, max(0.0, ys[i - 1] + t * (ys[i] - ys[i - 1])))


@dataclass(frozen=True)
class LabelSpec:
    """One ``[[labels]]`` entry: a SEG segment (PS3.3 C.8.20.2) and its operating point."""

    value: int  # label-map value and SEG Segment Number, 1..255
    name: str  # Segment Label
    category: Code  # Segmented Property Category, CID 7150
    property_type: Code  # Segmented Property Type, CID 7151 (``type`` in the TOML)
    site: Code | None  # Finding Site / Anatomic Region
    threshold: float  # voxel probability that counts as this label (boxes models: = min_score)
    min_score: float  # a component (or box) is reported only if its max probability reaches this
    min_volume_mm3: float  # ... and its volume reaches this (boxes models: 0, unused)
    max_findings: int  # at most this many findings of this label per series
    min_lung_fraction: float = 0.0  # ... and at least this fraction of it lies in the lung field
    lung_margin_mm: float = 0.0  # ... grown by this margin (lesions at the pleura or hilum)
    calibration: Calibration | None = None  # raw score -> calibrated probability; None: none shipped

    @property
    def finding_class(self) -> FindingClass:
        """The :class:`FindingClass` this label produces."""
        return FindingClass(
            label=self.value,
            name=self.name,
            category=self.category,
            property_type=self.property_type,
            site=self.site,
        )


@dataclass(frozen=True)
class ModelManifest:
    """A validated ``model.toml``; ``folder`` is the package folder it was read from."""

    folder: Path
    schema: int
    model: ModelInfo
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    labels: tuple[LabelSpec, ...]

    @property
    def algorithm(self) -> AlgorithmIdentity:
        """Algorithm Identification (TID 4019) for the SR and SEG, with the fp32 graph's digest.

        A package running its fp16 graph reports that graph's digest instead
        (:attr:`reader.inference.ModelPackage.algorithm`)."""
        return AlgorithmIdentity(
            name=self.model.name,
            version=self.model.version,
            family=self.model.family,
            source=self.model.source,
            weights_sha256=self.model.onnx_sha256,
        )

    @property
    def finding_classes(self) -> tuple[FindingClass, ...]:
        """One :class:`FindingClass` per label, in manifest order."""
        return tuple(label.finding_class for label in self.labels)


def load_manifest(folder: Path) -> ModelManifest:
    """Read and validate ``folder/model.toml``; raise :class:`ManifestError` naming the bad key."""
    folder = Path(folder).resolve()
    path = folder / MANIFEST_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ManifestError(MANIFEST_FILE, f"not found in {folder}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(MANIFEST_FILE, f"cannot be read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(MANIFEST_FILE, f"invalid TOML: {err}") from err
    return _parse(raw, folder)


# --- parsing -------------------------------------------------------------------------------------


def _parse(raw: Mapping[str, object], folder: Path) -> ModelManifest:
    _only_keys(raw, "", {"schema", "model", "input", "preprocessing", "output", "labels"})
    schema = _int(raw, "schema", "")
    if schema != SCHEMA_VERSION:
        raise ManifestError("schema", f"unsupported schema {schema}, this node reads {SCHEMA_VERSION}")
    model = _model(_table(raw, "model", ""), folder)
    inp = _input(_table(raw, "input", ""))
    out = _output(_table(raw, "output", ""))
    boxes = out.kind == "boxes"
    pre = _preprocessing(_table(raw, "preprocessing", ""), inp.dimensions, boxes=boxes)
    labels = _labels(raw, boxes=boxes)
    return ModelManifest(
        folder=folder, schema=schema, model=model, input=inp, preprocessing=pre, output=out, labels=labels
    )


def _model(t: Mapping[str, object], folder: Path) -> ModelInfo:
    p = "model."
    graphs = {"onnx", "onnx_fp16", "onnx_sha256", "onnx_fp16_sha256"}
    _only_keys(t, p, {"name", "version", "source", "description", "family"} | graphs)
    onnx = _relative_file(t, "onnx", p, folder)
    if not onnx.is_file():
        raise ManifestError(p + "onnx", f"file not found: {onnx}")
    onnx_sha256 = _checked_digest(t, "onnx_sha256", onnx)
    fp16 = _relative_file(t, "onnx_fp16", p, folder) if "onnx_fp16" in t else None
    fp16_sha256 = None
    if fp16 is not None:
        fp16_sha256 = _checked_digest(t, "onnx_fp16_sha256", fp16)
    elif "onnx_fp16_sha256" in t:
        raise ManifestError(p + "onnx_fp16_sha256", "only allowed with onnx_fp16")
    return ModelInfo(
        name=_str(t, "name", p),
        version=_str(t, "version", p),
        source=_str(t, "source", p),
        description=_str(t, "description", p) if "description" in t else "",
        family=_code(t, "family", p),
        onnx=onnx,
        onnx_fp16=fp16,
        onnx_sha256=onnx_sha256,
        onnx_fp16_sha256=fp16_sha256,
    )


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked_digest(t: Mapping[str, object], key: str, path: Path) -> str:
    """``model.<key>``: the SHA-256 of the graph at ``path``, which must match where the file exists.

    The file is read once here, at load: a package whose weights are not the ones its manifest
    names is refused, so the digest in every result identifies what ran.
    """
    p = "model."
    digest = _str(t, key, p).lower()
    if not _SHA256.fullmatch(digest):
        raise ManifestError(p + key, f"must be 64 hexadecimal digits (SHA-256), got {digest!r}")
    if not path.is_file():
        return digest  # an absent onnx_fp16 is allowed; it is checked when it is deployed
    actual = file_sha256(path)
    if actual != digest:
        raise ManifestError(p + key, f"{path.name} has SHA-256 {actual}, the manifest says {digest}")
    return digest


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, lowercase hex, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _input(t: Mapping[str, object]) -> InputSpec:
    p = "input."
    _only_keys(t, p, {"tensor", "dimensions", "modalities"})
    dims = _int(t, "dimensions", p)
    if dims not in (2, 3):
        raise ManifestError(p + "dimensions", f"must be 2 or 3, got {dims}")
    modalities = _list(t, "modalities", p)
    if not modalities:
        raise ManifestError(p + "modalities", "must name at least one modality")
    mods = tuple(_str_value(v, f"{p}modalities[{i}]") for i, v in enumerate(modalities))
    return InputSpec(tensor=_str(t, "tensor", p), dimensions=cast(Literal[2, 3], dims), modalities=mods)


def _preprocessing(t: Mapping[str, object], dims: int, *, boxes: bool = False) -> Preprocessing:
    p = "preprocessing."
    if boxes:
        for key in _SLIDING_WINDOW_KEYS:
            if key in t:
                raise ManifestError(p + key, 'not used by an output.kind = "boxes" model (no sliding window)')
    allowed = {
        "target_spacing_mm",
        "window",
        "normalize",
        "mean",
        "std",
        "patch_size",
        "overlap",
        "blend",
        "test_time_flips",
        "edge_mirror_voxels",
    }
    _only_keys(t, p, allowed)
    normalize = _choice(t, "normalize", p, ("window", "zscore"))
    window, mean, std = _intensity(t, normalize)
    patch_size = _axis_ints(t, "patch_size", dims, minimum=1)
    mirror = _axis_ints(t, "edge_mirror_voxels", dims, minimum=0) if "edge_mirror_voxels" in t else ()
    overlap = 0.0 if boxes else _float(t, "overlap", p)
    if not 0.0 <= overlap < 1.0:
        raise ManifestError(p + "overlap", f"must be in [0, 1), got {overlap}")
    blend = "constant" if boxes else _choice(t, "blend", p, ("gaussian", "constant"))
    return Preprocessing(
        target_spacing_mm=_target_spacing(t, dims) if "target_spacing_mm" in t else None,
        window=window,
        normalize=cast(Normalize, normalize),
        mean=mean,
        std=std,
        patch_size=patch_size,
        overlap=overlap,
        blend=cast(Blend, blend),
        test_time_flips=_test_time_flips(t, dims),
        edge_mirror_voxels=mirror,
    )


def _axis_ints(t: Mapping[str, object], key: str, dims: int, *, minimum: int) -> tuple[int, ...]:
    """``preprocessing.<key>``: one integer of at least ``minimum`` per patch axis."""
    p = "preprocessing."
    values = _list(t, key, p)
    if len(values) != dims:
        raise ManifestError(p + key, f"needs {dims} values for a {dims}-D model, got {len(values)}")
    ints = tuple(_int_value(v, f"{p}{key}[{i}]") for i, v in enumerate(values))
    for i, value in enumerate(ints):
        if value < minimum:
            raise ManifestError(f"{p}{key}[{i}]", f"must be >= {minimum}, got {value}")
    return ints


def _test_time_flips(t: Mapping[str, object], dims: int) -> tuple[FlipAxis, ...]:
    """``test_time_flips``: distinct axes among slice/row/column ("slice" only for 3-D models)."""
    key = "preprocessing.test_time_flips"
    if "test_time_flips" not in t:
        return ()
    values = _list(t, "test_time_flips", "preprocessing.")
    names = [_str_value(v, f"{key}[{i}]") for i, v in enumerate(values)]
    allowed: tuple[FlipAxis, ...] = ("slice", "row", "column") if dims == 3 else ("row", "column")
    for name in names:
        if name not in allowed:
            raise ManifestError(key, f"axes must be among {list(allowed)}, got {name!r}")
    if len(set(names)) != len(names):
        raise ManifestError(key, f"names an axis twice: {names}")
    return tuple(cast(FlipAxis, name) for name in names)


def _target_spacing(t: Mapping[str, object], dims: int) -> tuple[float | None, float, float]:
    p = "preprocessing."
    key = p + "target_spacing_mm"
    values = _floats(t, "target_spacing_mm", p)
    if len(values) == 2 and dims == 2:
        values = (1.0, *values)
    if len(values) != 3:
        want = "3 values (slice, row, column)" + (" or 2 (row, column)" if dims == 2 else "")
        raise ManifestError(key, f"needs {want}, got {len(values)}")
    if any(v <= 0.0 for v in values):
        raise ManifestError(key, f"spacings must be > 0, got {list(values)}")
    # A 2-D model never resamples across slices: the slice entry is dropped.
    return (values[0] if dims == 3 else None, values[1], values[2])


def _intensity(
    t: Mapping[str, object], normalize: str
) -> tuple[tuple[float, float] | None, float | None, float | None]:
    p = "preprocessing."
    window: tuple[float, float] | None = None
    if "window" in t:
        w = _floats(t, "window", p)
        if len(w) != 2 or not w[0] < w[1]:
            raise ManifestError(p + "window", f"needs [low, high] with low < high, got {list(w)}")
        window = (w[0], w[1])
    elif normalize == "window":
        raise ManifestError(p + "window", 'missing (required when normalize = "window")')
    if normalize != "zscore":
        for extra in ("mean", "std"):
            if extra in t:
                raise ManifestError(p + extra, 'only allowed with normalize = "zscore"')
        return window, None, None
    mean = _float(t, "mean", p)
    std = _float(t, "std", p)
    if std <= 0.0:
        raise ManifestError(p + "std", f"must be > 0, got {std}")
    return window, mean, std


def _output(t: Mapping[str, object]) -> OutputSpec:
    p = "output."
    _only_keys(t, p, {"tensor", "kind", "nms_iou"})
    kind = _choice(t, "kind", p, ("probabilities", "label_map", "boxes"))
    nms_iou = DEFAULT_NMS_IOU
    if "nms_iou" in t:
        if kind != "boxes":
            raise ManifestError(p + "nms_iou", 'only allowed with kind = "boxes"')
        nms_iou = _unit(t, "nms_iou", p)
    return OutputSpec(tensor=_str(t, "tensor", p), kind=cast(OutputKind, kind), nms_iou=nms_iou)


def _calibration(t: Mapping[str, object], prefix: str) -> Calibration:
    """``<label>.calibration``: ``{ scores = [...], probabilities = [...] }``, a monotone curve in [0, 1]."""
    table = _table(t, "calibration", prefix)
    p = prefix + "calibration."
    _only_keys(table, p, {"scores", "probabilities"})
    scores = _floats(table, "scores", p)
    probabilities = _floats(table, "probabilities", p)
    if len(scores) < 2:
        raise ManifestError(p + "scores", f"needs at least 2 points, got {len(scores)}")
    if len(probabilities) != len(scores):
        raise ManifestError(
            p + "probabilities", f"needs one value per score ({len(scores)}), got {len(probabilities)}"
        )
    for key, values in (("scores", scores), ("probabilities", probabilities)):
        for i, value in enumerate(values):
            if not 0.0 <= value <= 1.0:
                raise ManifestError(f"{p}{key}[{i}]", f"must be in [0, 1], got {value}")
    for i in range(1, len(scores)):
        if not scores[i] > scores[i - 1]:
            raise ManifestError(f"{p}scores[{i}]", f"scores must increase strictly, got {list(scores)}")
        if probabilities[i] < probabilities[i - 1]:
            raise ManifestError(
                f"{p}probabilities[{i}]", f"probabilities must not decrease, got {list(probabilities)}"
            )
    return Calibration(scores=scores, probabilities=probabilities)


def _labels(raw: Mapping[str, object], *, boxes: bool = False) -> tuple[LabelSpec, ...]:
    entries = _list(raw, "labels", "")
    if not entries:
        raise ManifestError("labels", "at least one [[labels]] entry is required")
    labels: list[LabelSpec] = []
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        p = f"labels[{i}]."
        if not isinstance(entry, dict):
            raise ManifestError(f"labels[{i}]", "must be a table ([[labels]])")
        t = cast(Mapping[str, object], entry)
        allowed = {"value", "name", "category", "type", "site", "threshold", "min_score", "calibration"}
        _only_keys(t, p, allowed | {"min_volume_mm3", "max_findings", "min_lung_fraction", "lung_margin_mm"})
        if boxes:
            for key in _SEGMENTATION_LABEL_KEYS:
                if key in t:
                    raise ManifestError(p + key, 'not used by an output.kind = "boxes" model')
        value = _int(t, "value", p)
        if not 1 <= value <= 255:
            raise ManifestError(p + "value", f"must be in 1..255, got {value}")
        if value in seen:
            raise ManifestError(p + "value", f"duplicate label value {value}")
        seen.add(value)
        max_findings = _int(t, "max_findings", p)
        if max_findings < 1:
            raise ManifestError(p + "max_findings", f"must be >= 1, got {max_findings}")
        min_score = _unit(t, "min_score", p)
        min_volume = 0.0 if boxes else _float(t, "min_volume_mm3", p)
        if min_volume < 0.0:
            raise ManifestError(p + "min_volume_mm3", f"must be >= 0, got {min_volume}")
        margin = _float(t, "lung_margin_mm", p) if "lung_margin_mm" in t else 0.0
        if not 0.0 <= margin <= _MAX_LUNG_MARGIN_MM:
            limit = f"[0, {_MAX_LUNG_MARGIN_MM:g}]"
            raise ManifestError(p + "lung_margin_mm", f"must be in {limit}, got {margin}")
        if margin > 0.0 and "min_lung_fraction" not in t:
            raise ManifestError(p + "lung_margin_mm", "needs min_lung_fraction (it widens that gate)")
        labels.append(
            LabelSpec(
                value=value,
                name=_str(t, "name", p),
                category=_code(t, "category", p),
                property_type=_code(t, "type", p),
                site=_code(t, "site", p) if "site" in t else None,
                threshold=min_score if boxes else _unit(t, "threshold", p),
                min_score=min_score,
                min_volume_mm3=min_volume,
                max_findings=max_findings,
                min_lung_fraction=_unit(t, "min_lung_fraction", p) if "min_lung_fraction" in t else 0.0,
                lung_margin_mm=margin,
                calibration=_calibration(t, p) if "calibration" in t else None,
            )
        )
    return tuple(labels)


# --- typed accessors: each names the full key on failure -----------------------------------------


def _get(t: Mapping[str, object], key: str, prefix: str) -> object:
    if key not in t:
        raise ManifestError(prefix + key, "missing")
    return t[key]


def _only_keys(t: Mapping[str, object], prefix: str, allowed: set[str]) -> None:
    for key in t:
        if key not in allowed:
            raise ManifestError(prefix + key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(t: Mapping[str, object], key: str, prefix: str) -> Mapping[str, object]:
    value = _get(t, key, prefix)
    if not isinstance(value, dict):
        raise ManifestError(prefix + key, f"must be a table, got {type(value).__name__}")
    return cast(Mapping[str, object], value)


def _list(t: Mapping[str, object], key: str, prefix: str) -> list[object]:
    value = _get(t, key, prefix)
    if not isinstance(value, list):
        raise ManifestError(prefix + key, f"must be an array, got {type(value).__name__}")
    return cast(list[object], value)


def _str_value(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(key, f"must be a non-empty string, got {value!r}")
    return value


def _str(t: Mapping[str, object], key: str, prefix: str) -> str:
    return _str_value(_get(t, key, prefix), prefix + key)


def _int_value(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(key, f"must be an integer, got {value!r}")
    return value


def _int(t: Mapping[str, object], key: str, prefix: str) -> int:
    return _int_value(_get(t, key, prefix), prefix + key)


def _float_value(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ManifestError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ManifestError(key, f"must be finite, got {value!r}")
    return float(value)


def _float(t: Mapping[str, object], key: str, prefix: str) -> float:
    return _float_value(_get(t, key, prefix), prefix + key)


def _floats(t: Mapping[str, object], key: str, prefix: str) -> tuple[float, ...]:
    return tuple(_float_value(v, f"{prefix}{key}[{i}]") for i, v in enumerate(_list(t, key, prefix)))


def _unit(t: Mapping[str, object], key: str, prefix: str) -> float:
    value = _float(t, key, prefix)
    if not 0.0 <= value <= 1.0:
        raise ManifestError(prefix + key, f"must be in [0, 1], got {value}")
    return value


def _choice(t: Mapping[str, object], key: str, prefix: str, choices: tuple[str, ...]) -> str:
    value = _str(t, key, prefix)
    if value not in choices:
        raise ManifestError(prefix + key, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _code(t: Mapping[str, object], key: str, prefix: str) -> Code:
    table = _table(t, key, prefix)
    p = f"{prefix}{key}."
    _only_keys(table, p, {"scheme", "value", "meaning"})
    return Code(
        value=_str(table, "value", p), scheme=_str(table, "scheme", p), meaning=_str(table, "meaning", p)
    )


def _relative_file(t: Mapping[str, object], key: str, prefix: str, folder: Path) -> Path:
    name = _str(t, key, prefix)
    relative = Path(name)
    if relative.is_absolute():
        raise ManifestError(prefix + key, f"must be relative to the package folder, got {name}")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise ManifestError(prefix + key, f"must stay inside the package folder, got {name}")
    return path
