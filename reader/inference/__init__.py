"""Model packages: the manifest (``model.toml``, see ``models/MANIFEST.md``) and the ONNX runtime.

``load_manifest`` validates a package folder; ``ModelPackage.load`` opens one warm onnxruntime
session and ``ModelPackage.run`` turns a :class:`reader.volume.Volume` into an
:class:`reader.findings.InferenceResult` on the volume's native grid.
"""

from __future__ import annotations

from reader.inference.manifest import (
    InputSpec,
    LabelSpec,
    ModelInfo,
    ModelManifest,
    OutputSpec,
    Preprocessing,
    load_manifest,
)
from reader.inference.runtime import DEFAULT_PROVIDERS, ModelPackage

__all__ = [
    "DEFAULT_PROVIDERS",
    "InputSpec",
    "LabelSpec",
    "ModelInfo",
    "ModelManifest",
    "ModelPackage",
    "OutputSpec",
    "Preprocessing",
    "load_manifest",
]
