"""Rebuild a train.py checkpoint from an exported ``model.onnx``, so a shipped network can be fine-tuned.

export.py folds each batch norm into the convolution before it (eval mode, ONNX constant folding):
the graph holds ``W' = W * g / sqrt(v + eps)`` and ``b' = beta - m * g / sqrt(v + eps)``. The
checkpoint written here puts ``W'`` into the convolution and makes each batch norm the identity plus
``b'`` (weight 1, bias ``b'``, running mean 0, running variance ``1 - eps``), so ``UNet3D`` in eval
mode computes what the graph computes. Fine-tune it with ``train.py --init CKPT --frozen-norm``:
batch statistics of small batches would otherwise replace the folded ones at the first step.

    python models/training/from_onnx.py --onnx models/lung-lesion-unet/model.onnx --out /tmp/w/b.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import UNet3D

EPS = 1e-5  # torch.nn.BatchNorm3d's default, as in train.Block


def folded_convolutions(
    graph: onnx.GraphProto, initial: dict[str, np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of every Conv node in graph order: the blocks' convolutions, then the head."""
    out = []
    for node in graph.node:
        if node.op_type == "Conv":
            weight = initial[node.input[1]]
            bias = initial[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
            out.append((weight, bias))
    return out


def channels_of(convolutions: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, ...]:
    """U-Net widths per level: the output channels of the encoder blocks' convolutions.

    L levels have 2 convolutions per encoder level, 2 per decoder level (L - 1) and the head: 4L - 1.
    """
    levels = (len(convolutions) + 1) // 4
    return tuple(int(convolutions[2 * i][0].shape[0]) for i in range(levels))


def checkpoint(path: Path) -> dict[str, object]:
    """The train.py checkpoint (state, channels, step) equivalent to the graph at ``path``."""
    graph = onnx.load(str(path)).graph
    initial = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convolutions = folded_convolutions(graph, initial)
    channels = channels_of(convolutions)
    net = UNet3D(channels)
    state = net.state_dict()
    blocks = [f"down.{i}" for i in range(len(channels))] + [f"merge.{i}" for i in range(len(channels) - 1)]
    names = [(f"{b}.body.{c}", f"{b}.body.{c + 1}") for b in blocks for c in (0, 3)]
    *body, (head_weight, head_bias) = convolutions
    if len(names) != len(body):
        raise ValueError(f"{path}: {len(convolutions)} convolutions do not fit a U-Net of {channels}")
    for (conv, norm), (weight, bias) in zip(names, body, strict=True):
        state[f"{conv}.weight"] = torch.from_numpy(weight.copy())
        state[f"{norm}.weight"] = torch.ones(bias.shape)
        state[f"{norm}.bias"] = torch.from_numpy(bias.copy())
        state[f"{norm}.running_mean"] = torch.zeros(bias.shape)
        state[f"{norm}.running_var"] = torch.full(bias.shape, 1.0 - EPS)
    state["head.weight"] = torch.from_numpy(head_weight.copy())
    state["head.bias"] = torch.from_numpy(head_bias.copy())
    for key in list(state):
        if key.startswith("up."):
            state[key] = torch.from_numpy(initial[f"net.{key}"].copy())
    net.load_state_dict(state)
    return {"state": net.state_dict(), "step": -1, "channels": channels}


def main() -> None:
    """Write the checkpoint and print the largest difference to the graph on a random input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = Path(__file__).resolve().parents[1] / "lung-lesion-unet" / "model.onnx"
    parser.add_argument("--onnx", type=Path, default=shipped)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ckpt = checkpoint(args.onnx)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    import onnxruntime as ort  # noqa: PLC0415 - only for the check

    net = UNet3D(tuple(ckpt["channels"]))  # type: ignore[arg-type]
    net.load_state_dict(ckpt["state"])  # type: ignore[arg-type]
    x = np.random.default_rng(0).random((1, 1, 16, 64, 64), dtype=np.float32)
    with torch.no_grad():
        mine = torch.sigmoid(net.eval()(torch.from_numpy(x))).numpy()
    session = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    graph = session.run(None, {"image": x})[0]
    difference = float(np.abs(mine - graph).max())
    print(f"wrote {args.out}: channels {ckpt['channels']}, max |torch - onnx| = {difference:.2e}")


if __name__ == "__main__":
    main()
