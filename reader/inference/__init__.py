"""Model packages: the manifest (``model.toml``, see ``models/MANIFEST.md``) and the ONNX runtime.

``load_manifest`` validates a package folder; ``ModelPackage.load`` opens one warm onnxruntime
session and ``ModelPackage.run`` turns a :class:`reader.volume.Volume` into an
:class:`reader.findings.InferenceResult` on the volume's native grid: a segmentation model's
label map and components (``postprocess``), or a detection model's boxes (``boxes``), each
finding's score mapped through the package's calibration where it ships one.
"""

from __future__ import annotations

from reader.inference.manifest import (
    Calibration,
    InputSpec,
    LabelSpec,
    ModelInfo,
    ModelManifest,
    OutputSpec,
    Preprocessing,
    load_manifest,
)
from reader.inference.runtime import DEFAULT_PROVIDERS, ModelPackage, calibrate

__all__ = [
    "DEFAULT_PROVIDERS",
    "Calibration",
    "InputSpec",
    "LabelSpec",
    "ModelInfo",
    "ModelManifest",
    "ModelPackage",
    "OutputSpec",
    "Preprocessing",
    "calibrate",
    "load_manifest",
]
