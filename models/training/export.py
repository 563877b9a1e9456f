"""Export a train.py checkpoint to the model package: ``model.onnx`` (fp32) and ``model.fp16.onnx``.

The graph takes ``image`` (1, 1, D, H, W) window-normalized CT and returns ``probabilities``
(1, 1, D, H, W) sigmoid lesion probability, as models/MANIFEST.md specifies for
``kind = "probabilities"``. Spatial dims are dynamic (multiples of 8: three poolings by 2).
The fp16 graph keeps float32 input and output (casts inside), so the node feeds both alike.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import UNet3D

OPSET = 17


class Exported(torch.nn.Module):
    """The U-Net with its sigmoid: logits -> probabilities."""

    def __init__(self, net: UNet3D) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def export_fp32(checkpoint: Path, out: Path) -> None:
    """Trace the network (eval mode: batch norm folded by onnx constant folding) to ``out``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = UNet3D(tuple(state["channels"]))
    net.load_state_dict(state["state"])
    model = Exported(net).eval()
    example = torch.zeros(1, 1, 16, 64, 64)
    dynamic = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    torch.onnx.export(
        model,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": dynamic, "probabilities": dynamic},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    graph = onnx.load(str(out))
    graph.producer_name = "lung-lesion-unet models/training/export.py"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(out))


def to_fp16(src: Path, out: Path) -> None:
    """Float16 weights and activations with float32 input/output (Cast nodes at both ends)."""
    model = onnx.load(str(src))
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    for node in graph.node:  # constants folded into nodes (e.g. Constant) become fp16 too
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                array = onnx.numpy_helper.to_array(attr.t).astype(np.float16)
                attr.t.CopyFrom(onnx.numpy_helper.from_array(array, attr.t.name))
    inp, outp = graph.input[0].name, graph.output[0].name
    cast_in = helper.make_node("Cast", [inp], [inp + "_fp16"], to=onnx.TensorProto.FLOAT16, name="cast_in")
    cast_out = helper.make_node("Cast", [outp + "_fp16"], [outp], to=onnx.TensorProto.FLOAT, name="cast_out")
    for node in graph.node:
        node.input[:] = [inp + "_fp16" if i == inp else i for i in node.input]
        node.output[:] = [outp + "_fp16" if o == outp else o for o in node.output]
    nodes = [cast_in, *graph.node, cast_out]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def check(fp32: Path, fp16: Path) -> float:
    """Largest absolute difference of the two graphs on a random input of a non-training size."""
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 24, 72, 80), dtype=np.float32)
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    b = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    if a.shape != x.shape or b.shape != x.shape:
        raise ValueError(f"unexpected output shapes {a.shape} {b.shape}")
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def main() -> None:
    """Export both graphs into the package folder and print the fp16/fp32 difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/lung-train/model.pt"))
    parser.add_argument(
        "--package", type=Path, default=Path(__file__).resolve().parents[1] / "lung-lesion-unet"
    )
    args = parser.parse_args()
    args.package.mkdir(parents=True, exist_ok=True)
    fp32, fp16 = args.package / "model.onnx", args.package / "model.fp16.onnx"
    export_fp32(args.checkpoint, fp32)
    to_fp16(fp32, fp16)
    print(
        f"exported {fp32} ({fp32.stat().st_size} B) and {fp16} ({fp16.stat().st_size} B); "
        f"max |fp16 - fp32| = {check(fp32, fp16):.4f}"
    )
    manifest = args.package / "model.toml"
    if manifest.is_file():
        write_digests(manifest, {"onnx_sha256": fp32, "onnx_fp16_sha256": fp16})


def write_digests(manifest: Path, graphs: dict[str, Path]) -> None:
    """Replace the ``<key> = "<sha256>"`` lines of ``manifest`` with the graphs' digests: the node
    refuses a package whose graph does not match its manifest (models/MANIFEST.md)."""
    text = manifest.read_text()
    for key, graph in graphs.items():
        digest = hashlib.sha256(graph.read_bytes()).hexdigest()
        pattern = rf'^{key}\s*=\s*"[0-9a-fA-F]*"'
        text, count = re.subn(pattern, f'{key} = "{digest}"', text, flags=re.MULTILINE)
        if count != 1:
            raise SystemExit(f"export: {manifest} has no single {key} line to update")
        print(f"{key} = {digest}")
    manifest.write_text(text)


if __name__ == "__main__":
    main()
