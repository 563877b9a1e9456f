"""A loaded model package: one warm onnxruntime session and the full volume -> findings pipeline.

``ModelPackage.load`` validates the manifest (``models/MANIFEST.md``), opens the session once on the
first execution provider that works, and checks the graph's input and output against the manifest.
``ModelPackage.run`` turns a :class:`reader.volume.Volume` into an
:class:`reader.findings.InferenceResult` on the volume's own grid, ready for SEG (PS3.3 C.8.20) and
TID 1500 SR encoding: a segmentation model (``output.kind`` "probabilities" or "label_map") gives
a label map and its components (:mod:`reader.inference.postprocess`), a detection model ("boxes")
gives box findings and no label map (:mod:`reader.inference.boxes`). Either way each finding's
score is then mapped through its label's calibration, where the package ships one, and the result
names the graph that ran (its SHA-256 and precision). ``run`` is safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from reader.errors import InferenceError, ManifestError, ModelError
from reader.findings import AlgorithmIdentity, Finding, InferenceResult
from reader.inference import anatomy, boxes, postprocess, preprocess
from reader.inference.manifest import Calibration, FlipAxis, LabelSpec, ModelManifest, load_manifest
from reader.volume import Volume

__all__ = ["DEFAULT_PROVIDERS", "GPU_PROVIDERS", "ModelPackage", "calibrate"]

log = structlog.get_logger(__name__)

DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
_IMAGE_AXES: Mapping[FlipAxis, int] = MappingProxyType({"slice": 0, "row": 1, "column": 2})
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
Precision = Literal["fp32", "fp16"]

# What onnxruntime raises: its pybind11 exceptions derive from Exception directly, not RuntimeError.
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.NoSuchFile,
    ort_state.NoModel,
    ort_state.EngineError,
    ort_state.RuntimeException,
    ort_state.InvalidProtobuf,
    ort_state.ModelLoaded,
    ort_state.NotImplemented,
    ort_state.InvalidGraph,
    ort_state.EPFail,
    RuntimeError,
    ValueError,
)

_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ModelPackage:
    """A model package loaded for inference; build it with :meth:`load`."""

    def __init__(
        self,
        manifest: ModelManifest,
        session: ort.InferenceSession,
        provider: str,
        precision: Precision = "fp32",
    ) -> None:
        self._manifest = manifest
        self._session = session
        self._provider = provider
        self._precision: Precision = precision
        digest = manifest.model.onnx_fp16_sha256 if precision == "fp16" else manifest.model.onnx_sha256
        self._algorithm = dataclasses.replace(manifest.algorithm, weights_sha256=digest or "")
        self._input_dtype = _check_io(session, manifest)

    @property
    def manifest(self) -> ModelManifest:
        """The validated manifest of this package."""
        return self._manifest

    @property
    def algorithm(self) -> AlgorithmIdentity:
        """Algorithm Identification (TID 4019) with the SHA-256 of the graph that runs (fp32 or fp16)."""
        return self._algorithm

    @property
    def precision(self) -> Precision:
        """``"fp16"`` when the package's fp16 graph runs, else ``"fp32"``."""
        return self._precision

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph, e.g. ``"CPUExecutionProvider"``."""
        return self._provider

    @classmethod
    def load(
        cls,
        folder: Path,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        fp16: bool = False,
        provider_options: Mapping[str, Mapping[str, str]] | None = None,
    ) -> ModelPackage:
        """Validate ``folder/model.toml`` and open one warm session on the first provider that works.

        Providers not in ``ort.get_available_providers()`` are skipped; if a session fails to start
        on a provider list, the next shorter list is tried. With ``fp16`` the manifest's
        ``onnx_fp16`` graph is used when the running provider is CUDA/TensorRT and the file exists.
        ``provider_options`` gives a provider its onnxruntime options by name, e.g.
        ``{"CUDAExecutionProvider": {"device_id": "1"}}`` for the second GPU (``reader.config.Device``).
        Raises :class:`ManifestError` for an invalid manifest or a graph that does not match it, and
        :class:`ModelError` when no session can be created.
        """
        manifest = load_manifest(folder)
        options = provider_options or {}
        session, provider = _open_session(manifest.model.onnx, providers, options)
        graph = manifest.model.onnx
        precision: Precision = "fp32"
        if fp16:
            fp16_path = manifest.model.onnx_fp16
            if provider in GPU_PROVIDERS and fp16_path is not None and fp16_path.is_file():
                running = [provider, *(p for p in providers if p != provider)]
                session, provider = _open_session(fp16_path, running, options)
                graph = fp16_path
                precision = "fp16"
            else:
                reason = "no onnx_fp16 file" if fp16_path is None or not fp16_path.is_file() else "not on GPU"
                log.info("model.fp16_skipped", name=manifest.model.name, reason=reason, provider=provider)
        package = cls(manifest, session, provider, precision)
        log.info(
            "model.loaded",
            name=manifest.model.name,
            version=manifest.model.version,
            requested_providers=list(providers),
            provider=provider,
            provider_options={name: dict(o) for name, o in options.items()},
            graph=graph.name,
            precision=precision,
            weights_sha256=package.algorithm.weights_sha256,
        )
        return package

    def run(self, volume: Volume) -> InferenceResult:
        """Run the model on ``volume`` and return findings on its native grid.

        Raises :class:`InferenceError` when onnxruntime fails or returns an unexpected shape.
        """
        m = self._manifest
        pre = m.preprocessing
        if len(volume.stored.shape) != 3 or volume.stored.size == 0:
            raise InferenceError(
                f"expected a non-empty (slices, rows, columns) volume, got {volume.stored.shape}"
            )
        native = volume.shape
        started = time.perf_counter()

        grid = preprocess.target_shape(native, volume.spacing_mm, pre.target_spacing_mm)
        # A new float32 array on the model grid: the caller's volume stays intact, and the stored
        # values are rescaled there rather than as a float32 copy of the whole volume.
        image = preprocess.resample_volume(volume, grid)
        preprocess.normalize_inplace(image, pre)
        prepared = time.perf_counter()

        onnx_seconds: list[float] = []  # per patch; a local, so concurrent runs keep their own
        if m.output.kind == "boxes":
            run = functools.partial(self._run_graph, spent=onnx_seconds)
            findings = boxes.detect(image, run=run, manifest=m, volume=volume, fill=preprocess.pad_value(pre))
            del image
            inferred = time.perf_counter()
            return self._result(volume, findings, None, (started, prepared, inferred), onnx_seconds)
        probabilities = self._infer(image, functools.partial(self._predict, spent=onnx_seconds))
        del image
        inferred = time.perf_counter()

        gate = anatomy.lung_gate(volume) if any(lab.min_lung_fraction > 0.0 for lab in m.labels) else None
        in_plane_only = m.input.dimensions == 2
        if all(label.threshold > 0.0 for label in m.labels):
            channels = [
                (label, list(preprocess.resample_pieces(probabilities[index], native, label.threshold)))
                for index, label in enumerate(m.labels)
            ]
            del probabilities
            findings, label_map = postprocess.findings_from_pieces(
                channels, volume, in_plane_only=in_plane_only, lung=gate
            )
        else:  # a zero threshold selects everywhere: the dense path
            selection = postprocess.select_labels(_native_channels(probabilities, m.labels, native), native)
            del probabilities
            lung = None if gate is None else gate((slice(None), slice(None), slice(None)), 0.0)
            findings, label_map = postprocess.extract_findings(
                selection, m.labels, volume, in_plane_only=in_plane_only, lung=lung
            )
        return self._result(volume, findings, label_map, (started, prepared, inferred), onnx_seconds)

    def _result(
        self,
        volume: Volume,
        findings: tuple[Finding, ...],
        label_map: npt.NDArray[np.uint8] | None,
        times: tuple[float, float, float],
        onnx_seconds: Sequence[float],
    ) -> InferenceResult:
        """The result of one run, its findings calibrated; logs ``inference.done`` with the timings."""
        m = self._manifest
        findings = calibrate(findings, m.labels)
        started, prepared, inferred = times
        finished = time.perf_counter()
        log.info(
            "inference.done",
            series_uid=volume.series_instance_uid,
            model=m.model.name,
            provider=self._provider,
            preprocess_s=round(prepared - started, 3),
            model_s=round(inferred - prepared, 3),
            onnx_s=round(sum(onnx_seconds), 3),
            postprocess_s=round(finished - inferred, 3),
            findings=len(findings),
        )
        return InferenceResult(
            algorithm=self._algorithm,
            finding_classes=m.finding_classes,
            findings=findings,
            label_map=label_map,
            provider=self._provider,
            precision=self._precision,
        )

    def _run_graph(self, image: npt.NDArray[np.float32], *, spent: list[float]) -> npt.NDArray[Any]:
        """The whole padded ``image`` (spatial axes) through the session as ``(1, 1, *image.shape)``:
        the raw output tensor. The seconds onnxruntime took are appended to ``spent``."""
        m = self._manifest
        feed = {m.input.tensor: image[np.newaxis, np.newaxis].astype(self._input_dtype, copy=False)}
        started = time.perf_counter()
        try:
            outputs = self._session.run([m.output.tensor], feed)
        except ORT_ERRORS as err:
            raise InferenceError(f"onnxruntime failed running {m.model.name}: {err}") from err
        spent.append(time.perf_counter() - started)
        return np.asarray(outputs[0])

    def _infer(
        self, image: npt.NDArray[np.float32], predict: preprocess.Predictor
    ) -> npt.NDArray[np.float32]:
        """Probabilities over the whole prepared image, ``(labels, *image.shape)``: one sliding-window
        pass, and with ``test_time_flips`` the mean of it and one pass per mirrored axis."""
        flips = self._manifest.preprocessing.test_time_flips
        total = self._infer_once(image, predict)
        for name in flips:
            axis = _IMAGE_AXES[name]  # the prepared image is (slices, rows, columns) for 2-D models too
            mirrored = np.ascontiguousarray(np.flip(image, axis))
            total += np.flip(self._infer_once(mirrored, predict), axis + 1)
            del mirrored
        if flips:
            total /= len(flips) + 1
        return total

    def _infer_once(
        self, image: npt.NDArray[np.float32], predict: preprocess.Predictor
    ) -> npt.NDArray[np.float32]:
        """Sliding-window inference over the whole prepared image: ``(labels, *image.shape)``."""
        pre = self._manifest.preprocessing
        channels = len(self._manifest.labels)
        fill = preprocess.pad_value(pre)
        if self._manifest.input.dimensions == 3:
            return preprocess.sliding_window(
                image,
                patch=pre.patch_size,
                overlap=pre.overlap,
                blend=pre.blend,
                channels=channels,
                predict=predict,
                fill=fill,
                mirror=pre.edge_mirror_voxels,
            )
        out = np.empty((channels, *image.shape), dtype=np.float32)
        for index in range(image.shape[0]):
            out[:, index] = preprocess.sliding_window(
                image[index],
                patch=pre.patch_size,
                overlap=pre.overlap,
                blend=pre.blend,
                channels=channels,
                predict=predict,
                fill=fill,
                mirror=pre.edge_mirror_voxels,
            )
        return out

    def _predict(self, patch: npt.NDArray[np.float32], *, spent: list[float]) -> npt.NDArray[np.float32]:
        """One patch through the session -> ``(labels, *patch.shape)`` float32 probabilities.

        The seconds onnxruntime took are appended to ``spent``.
        """
        m = self._manifest
        out = self._run_graph(patch, spent=spent)
        labels = m.labels
        if m.output.kind == "probabilities":
            if out.shape != (1, len(labels), *patch.shape):
                raise InferenceError(
                    f"{m.output.tensor} has shape {out.shape}, expected {(1, len(labels), *patch.shape)}"
                )
            return np.asarray(out[0], dtype=np.float32)
        if out.size != patch.size:
            raise InferenceError(f"{m.output.tensor} has shape {out.shape}, expected {(1, 1, *patch.shape)}")
        values = out.reshape(patch.shape)
        # A label map becomes one-hot channels, blended and resampled like probabilities.
        return np.stack([(values == label.value) for label in labels]).astype(np.float32)


def calibrate(findings: tuple[Finding, ...], labels: Sequence[LabelSpec]) -> tuple[Finding, ...]:
    """``findings`` with ``calibrated_score`` set by their label's calibration, where it has one."""
    curves = {label.value: label.calibration for label in labels}
    return tuple(_calibrated(finding, curves.get(finding.finding_class.label)) for finding in findings)


def _calibrated(finding: Finding, curve: Calibration | None) -> Finding:
    if curve is None:
        return finding
    return dataclasses.replace(finding, calibrated_score=curve(finding.score))


def _native_channels(
    probabilities: npt.NDArray[np.float32], labels: Sequence[LabelSpec], native: tuple[int, int, int]
) -> Iterator[tuple[LabelSpec, npt.NDArray[np.float32]]]:
    """Each label's probabilities resampled to the native grid, one map alive at a time."""
    for index, label in enumerate(labels):
        yield label, preprocess.resample_above(probabilities[index], native, label.threshold)


def _open_session(
    path: Path, providers: Sequence[str], options: Mapping[str, Mapping[str, str]]
) -> tuple[ort.InferenceSession, str]:
    """One session on the first provider list that starts; returns it and the provider that runs.

    ``options`` gives providers their onnxruntime options by name (e.g. CUDA's ``device_id``).
    """
    available = set(ort.get_available_providers())
    candidates = [p for p in providers if p in available]
    if not candidates:
        raise ModelError(f"none of the providers {list(providers)} is available (have {sorted(available)})")
    failures: list[str] = []
    # onnxruntime-gpu lists CUDA/TensorRT even where their libraries are absent, and then prints
    # library-load errors and an "EP Error" banner while falling back: expected on a CPU-only
    # machine, so they are silenced here and reported once as model.provider_skipped.
    ort.set_default_logger_severity(4)
    for first in range(len(candidates)):
        attempt = candidates[first:]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                session = ort.InferenceSession(
                    str(path), _session_options(attempt[0]), providers=attempt,
                    provider_options=[dict(options.get(p, {})) for p in attempt])
        except ORT_ERRORS as err:
            log.warning("model.provider_failed", graph=path.name, providers=attempt, error=str(err))
            failures.append(f"{attempt[0]}: {err}")
            continue
        finally:
            ort.set_default_logger_severity(2)
        running = str(session.get_providers()[0])
        skipped = attempt[: attempt.index(running)] if running in attempt else []
        if skipped:
            log.info("model.provider_skipped", graph=path.name, providers=skipped, running=running)
        return session, running
    raise ModelError(f"cannot open {path.name} on any provider: {'; '.join(failures)}")


def _session_options(provider: str) -> ort.SessionOptions:
    """Session options; on the CPU provider without memory patterns.

    A memory pattern pre-plans one arena block per input shape and keeps it: measured here on the
    reference U-Net (32x128x128 patches) it kept ~30 MiB more resident than planning per run, at
    the same speed. GPU providers keep the default.
    """
    options = ort.SessionOptions()
    if provider == "CPUExecutionProvider":
        options.enable_mem_pattern = False
    return options


def _check_io(session: ort.InferenceSession, manifest: ModelManifest) -> type[np.floating[Any]]:
    """Check the graph's input and output against the manifest; return the input element type."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    name = manifest.input.tensor
    if name not in inputs:
        raise ManifestError("input.tensor", f"the graph has no input {name!r} (inputs: {sorted(inputs)})")
    if manifest.output.tensor not in outputs:
        raise ManifestError(
            "output.tensor",
            f"the graph has no output {manifest.output.tensor!r} (outputs: {sorted(outputs)})",
        )
    arg = inputs[name]
    if arg.type not in _FLOAT_TYPES:
        raise ManifestError("input.tensor", f"{name!r} is {arg.type}, expected float or float16")
    patch = manifest.preprocessing.patch_size
    if arg.shape is not None:  # None: rank unknown to onnxruntime, checked when the graph runs
        shape = list(arg.shape)
        if len(shape) != len(patch) + 2:
            raise ManifestError(
                "input.dimensions",
                f"{name!r} has rank {len(shape)}, expected {len(patch) + 2} (1, 1, *patch)",
            )
        for axis, (dim, size) in enumerate(zip(shape[2:], patch, strict=True)):
            if isinstance(dim, int) and dim != size:
                key = f"preprocessing.patch_size[{axis}]"
                raise ManifestError(key, f"the graph fixes this axis to {dim}")
    out_shape = list(outputs[manifest.output.tensor].shape or [])
    if manifest.output.kind == "boxes":
        _check_boxes_output(out_shape, manifest)
    if manifest.output.kind == "probabilities" and len(out_shape) >= 2:
        channels = out_shape[1]
        if isinstance(channels, int) and channels != len(manifest.labels):
            raise ManifestError(
                "labels",
                f"the graph outputs {channels} channels, the manifest has {len(manifest.labels)} labels",
            )
    return _FLOAT_TYPES[arg.type]


def _check_boxes_output(shape: Sequence[object], manifest: ModelManifest) -> None:
    """A boxes output is (N, 6) for 2-D models, (N, 8) for 3-D, or the same with a leading 1."""
    dims = manifest.input.dimensions
    width = 2 * dims + 2
    name = manifest.output.tensor
    if not shape:  # rank unknown to onnxruntime: checked when the graph runs
        return
    if len(shape) not in (2, 3):
        raise ManifestError("output.tensor", f"{name!r} has rank {len(shape)}; boxes are (N, {width})")
    last = shape[-1]
    if isinstance(last, int) and last != width:
        raise ManifestError(
            "output.tensor",
            f"{name!r} gives {last} values per box, a {dims}-D boxes model gives {width} "
            f"({'x0, y0, z0, x1, y1, z1' if dims == 3 else 'x0, y0, x1, y1'}, score, label)",
        )
