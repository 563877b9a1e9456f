"""Train lung-lesion-unet: a compact 3-D U-Net on the synthetic patch cache written by synth.py.

Reproducible: one seed drives patch order, crops and augmentation; deterministic algorithms on CPU.
Uses CUDA when available. Run ``nice -n 10 python models/training/train.py`` (see models/README.md);
the default schedule finishes within 90 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

WINDOW_HU = (-1000.0, 400.0)  # must equal model.toml [preprocessing] window
TRAIN_PATCH = (16, 64, 64)
CHANNELS = (8, 16, 32, 64)
IGNORE = 255


class Block(nn.Module):
    """Two 3x3x3 convolutions, each with batch norm and leaky ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


class UNet3D(nn.Module):
    """U-Net with len(channels)-1 poolings by 2; spatial dims must be multiples of 2**(levels-1).

    Input (N, 1, D, H, W) window-normalized CT; output (N, 1, D, H, W) logits (``sigmoid`` in export).
    """

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for c in channels:
            self.down.append(Block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose3d(cin, c, 2, stride=2))
            self.merge.append(Block(2 * c, c))
            cin = c
        self.head = nn.Conv3d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = up(x)
            x = merge(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Cache:
    """All cached patches in memory: images int16 HU, labels uint8, lesion flags."""

    images: npt.NDArray[np.int16]
    labels: npt.NDArray[np.uint8]
    has_lesion: npt.NDArray[np.bool_]
    source: npt.NDArray[np.int_]  # index of the cache folder each patch came from


def load_cache(folders: list[Path]) -> Cache:
    """Every ``*.npz`` patch file of the cache folders, concatenated."""
    images, labels, sources = [], [], []
    for index, folder in enumerate(folders):
        for path in sorted(folder.glob("*.npz")):
            with np.load(path) as data:
                images.append(data["image"])
                labels.append(data["label"])
                sources.append(np.full(len(data["label"]), index))
    image = np.concatenate(images)
    label = np.concatenate(labels)
    return Cache(image, label, (label == 1).reshape(len(label), -1).any(axis=1), np.concatenate(sources))


@dataclass(frozen=True)
class Draw:
    """One patch of a batch: which cached patch, the crop, the flipped axes and the jitter."""

    index: int
    region: tuple[slice, ...]
    flips: tuple[int, ...]
    scale: float
    shift: float
    slab: tuple[int, int] = (0, 0)  # slices replaced at the start, at the end: by air (label 0) ...
    mirror: bool = False  # ... or by the mirror image of the slices next to them (EdgeCrops.slab)

    def slab_slices(self, depth: int) -> slice | None:
        """The crop's slices that become air or a mirror image (of ``depth``), or None."""
        if self.slab[0]:
            return slice(0, self.slab[0])
        return slice(depth - self.slab[1], None) if self.slab[1] else None

    def mirror_source(self, depth: int) -> slice | None:
        """With ``mirror``, the slices whose reversal fills :meth:`slab_slices` as ``numpy.pad`` mode
        "reflect" would (the edge slice itself not repeated), as the node's ``edge_mirror_voxels``
        extends a scan; None for an air slab or none."""
        if not self.mirror or not any(self.slab):
            return None
        if self.slab[0]:
            return slice(self.slab[0] + 1, 2 * self.slab[0] + 1)
        return slice(depth - 2 * self.slab[1] - 1, depth - self.slab[1] - 1)


EDGE_AIR_CHANCE = 0.2  # --edge-crops: share of crops that end in an air slab, as a scan edge padded
EDGE_AIR_SLICES = (1, 6)  # ... of this many slices (inclusive), at one end


@dataclass(frozen=True)
class EdgeCrops:
    """``--edge-crops``: lesions on any slice of a crop, and ``chance`` of the crops ending in a slab
    of ``slab`` ("air", as the node pads a scan shorter than its window; "mirror", as the node's
    ``edge_mirror_voxels`` extends a scan since 1.4.0)."""

    slab: Literal["air", "mirror"] = "air"
    chance: float = EDGE_AIR_CHANCE

    def __post_init__(self) -> None:
        if self.slab not in {"air", "mirror"} or not 0.0 <= self.chance <= 1.0:
            raise ValueError(f"edge crops need slab air or mirror and a chance in [0, 1], got {self}")


def draw(
    cache: Cache,
    rng: np.random.Generator,
    extra_fraction: float,
    lesion_points: Callable[[int], npt.NDArray[np.int_]],
    edges: EdgeCrops | None = None,
) -> Draw:
    """Draw one patch: about 2/3 holding a lesion (``extra_fraction`` of them from the second and
    later cache folders), a crop keeping lesion voxels in view 80 % of the time (a voxel from
    ``lesion_points(index)``), flips and +-4 % / +-25 HU intensity jitter. The draws' order is
    that of 1.1.0's CPU training, so a CPU run stays reproducible.

    ``edges`` (``--edge-crops``) teaches the first and last slices of a scan: the lesion voxel may
    fall on any slice of the crop, its first or last included (otherwise at least 1/6 of the crop
    away from either end), and ``edges.chance`` of the crops end in an air slab, as the node pads a
    scan shorter than its window. Without it the network never saw a lesion at the edge of its
    input and missed nodules cut by the first or last slice (MODEL_CARD.md, "1.4.0: edge
    mirroring and a focused fine-tune"). With ``edges.slab`` "mirror" (``--edge-slab mirror``) the
    slab is the mirror image of the slices next to it, as the node shows the network since 1.4.0
    (mirrored anatomy at the apex and the base drew false positives; MODEL_CARD.md, "1.5.0:
    training on the mirrored edges"); the draws are those of "air"."""
    positives = np.flatnonzero(cache.has_lesion)
    extra = np.flatnonzero(cache.source > 0)
    if extra_fraction > 0 and extra.size and rng.random() < extra_fraction:
        pool = extra
    elif positives.size and rng.random() < 0.67:
        pool = positives
    else:
        pool = np.arange(len(cache.labels))
    k = int(pool[int(rng.integers(0, len(pool)))])
    shape = cache.images.shape[1:]
    if cache.has_lesion[k] and rng.random() < 0.8:  # crop that keeps lesion voxels in view
        pts = lesion_points(k)
        centre = pts[int(rng.integers(0, len(pts)))]
        # where in the crop the lesion voxel lands: any slice with --edge-crops, else 1/6 in
        spans = [
            (0, p) if edges is not None and axis == 0 else (p // 6, p - p // 6)
            for axis, p in enumerate(TRAIN_PATCH)
        ]
        starts = [
            int(np.clip(c - int(rng.integers(*span)), 0, n - p))
            for c, p, n, span in zip(centre, TRAIN_PATCH, shape, spans, strict=True)
        ]
    else:
        starts = [int(rng.integers(0, n - p + 1)) for p, n in zip(TRAIN_PATCH, shape, strict=True)]
    region = tuple(slice(s, s + p) for s, p in zip(starts, TRAIN_PATCH, strict=True))
    flips = tuple(axis for axis, chance in ((2, 0.5), (1, 0.2), (0, 0.3)) if rng.random() < chance)
    scale, shift = float(rng.uniform(0.96, 1.04)), float(rng.uniform(-25, 25))
    slab = (0, 0)
    if edges is not None and rng.random() < edges.chance:
        slices = int(rng.integers(EDGE_AIR_SLICES[0], EDGE_AIR_SLICES[1] + 1))
        slab = (slices, 0) if rng.random() < 0.5 else (0, slices)
    return Draw(k, region, flips, scale, shift, slab, edges is not None and edges.slab == "mirror")


def batch(
    cache: Cache,
    size: int,
    rng: np.random.Generator,
    extra_fraction: float = 0.0,
    edges: EdgeCrops | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of :func:`draw` patches, cut on the CPU."""
    xs, ys = [], []
    for _ in range(size):
        d = draw(cache, rng, extra_fraction, lambda k: np.argwhere(cache.labels[k] == 1), edges)
        x = cache.images[d.index][d.region].astype(np.float32)
        y = cache.labels[d.index][d.region]
        if d.flips:
            x, y = np.flip(x, d.flips), np.flip(y, d.flips)
        x = x * d.scale + d.shift
        x = np.clip((x - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0]), 0.0, 1.0)
        slab, source = d.slab_slices(len(x)), d.mirror_source(len(x))
        if slab is not None:
            x, y = x.copy(), y.copy()
            if source is not None:
                x[slab], y[slab] = x[source][::-1], y[source][::-1]
            else:
                x[slab], y[slab] = 0.0, 0
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


class DeviceBatcher:
    """:func:`batch` with the cache held on the GPU: the same draws, crops cut there.

    Used when training on CUDA, where copying every batch from host memory would leave the GPU
    waiting. Lesion-centred crops pick from at most ~256 lesion voxels per patch, so the sequence
    differs from :func:`batch` (not bit-identical).
    """

    def __init__(self, cache: Cache, device: torch.device) -> None:
        self.cache = cache
        self.images = torch.from_numpy(cache.images).to(device)
        self.labels = torch.from_numpy(cache.labels).to(device)
        self.points = {
            int(k): np.argwhere(cache.labels[k] == 1)[:: max(1, int((cache.labels[k] == 1).sum()) // 256)]
            for k in np.flatnonzero(cache.has_lesion)
        }

    def __call__(
        self,
        size: int,
        rng: np.random.Generator,
        extra_fraction: float = 0.0,
        edges: EdgeCrops | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (x float32 window-normalized, y uint8 labels) on the device."""
        xs, ys = [], []
        for _ in range(size):
            d = draw(self.cache, rng, extra_fraction, self.points.__getitem__, edges)
            x = self.images[(d.index, *d.region)].float()
            y = self.labels[(d.index, *d.region)]
            if d.flips:
                x, y = torch.flip(x, d.flips), torch.flip(y, d.flips)
            x = x * d.scale + d.shift
            x = ((x - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0])).clamp(0.0, 1.0)
            slab, source = d.slab_slices(len(x)), d.mirror_source(len(x))
            if slab is not None:
                y = y.clone()
                if source is not None:
                    x[slab], y[slab] = torch.flip(x[source], [0]), torch.flip(y[source], [0])
                else:
                    x[slab], y[slab] = 0.0, 0
            xs.append(x)
            ys.append(y)
        return torch.stack(xs)[:, None], torch.stack(ys)[:, None]


SMALL_LESION_REFERENCE_VOXELS = 262  # a 20 mm sphere on the 4 x 2 x 2 mm grid


def lesion_weights(labels: torch.Tensor, most: float) -> torch.Tensor:
    """Per-voxel BCE weights that lift small lesions: 1 on background, and on each lesion (26-connected
    component of label 1 in the crop) of n voxels ``clip(sqrt(262 / n), 1, most)``, so an 8 mm
    lesion (~17 voxels) counts about 4x per voxel and a lesion of 20 mm or more as before.

    The batch soft Dice and BCE otherwise weigh a lesion by its voxel count, so a few large lesions
    outweigh many small ones; this is what ``--small-lesion-weight`` turns on.
    """
    out = np.ones(labels.shape, dtype=np.float32)
    array = labels.cpu().numpy() == 1
    for index in np.ndindex(*array.shape[:2]):
        components, count = ndimage.label(array[index], structure=np.ones((3, 3, 3)))
        if not count:
            continue
        sizes = np.bincount(components.ravel())
        factor = np.clip(np.sqrt(SMALL_LESION_REFERENCE_VOXELS / np.maximum(sizes, 1)), 1.0, most)
        factor[0] = 1.0
        out[index] = factor[components]
    return torch.from_numpy(out).to(labels.device)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy plus batch soft Dice, both over the voxels that are not ignored.

    ``weights`` (from :func:`lesion_weights`) scales each voxel's cross-entropy.
    """
    valid = (labels != IGNORE).float()
    target = (labels == 1).float()
    weight = valid if weights is None else valid * weights
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / valid.sum()
    prob = torch.sigmoid(logits) * valid
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def train_mode(model: nn.Module, *, frozen_norm: bool) -> None:
    """``model.train()``; with ``frozen_norm`` the batch norms stay in eval mode, so their running
    statistics (the folded ones of a from_onnx.py checkpoint) are used and kept, not batch ones."""
    model.train()
    if frozen_norm:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.eval()


def main() -> None:  # noqa: PLR0915 - the training loop reads best in one piece
    """Train and save the checkpoint (state dict and the options it was trained with)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, nargs="+", default=[Path("/tmp/lung-synth/train")])
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint (stage 2)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--extra-fraction", type=float, default=0.0, help="share of patches from --cache[1:]")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lung-train/model.pt"))
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=85.0, help="stop early (and save) past this")
    parser.add_argument(
        "--channels", default=",".join(map(str, CHANNELS)), help="U-Net widths per level, e.g. 16,32,64,128"
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps (schedule unchanged)"
    )
    parser.add_argument(
        "--frozen-norm",
        action="store_true",
        help="keep batch norm in eval mode (running statistics fixed): fine-tuning from_onnx.py checkpoints",
    )
    parser.add_argument(
        "--small-lesion-weight",
        type=float,
        default=0.0,
        help="lift small lesions in the cross-entropy, at most this factor (0: off; see lesion_weights)",
    )
    parser.add_argument(
        "--edge-crops",
        action="store_true",
        help="lesions on the first and last slices of crops, and air slabs: the edges of a scan (see draw)",
    )
    parser.add_argument(
        "--edge-slab",
        choices=("air", "mirror"),
        default="air",
        help="with --edge-crops, what fills a crop's end slab: air, or the mirror image (edge_mirror_voxels)",
    )
    parser.add_argument(
        "--edge-chance",
        type=float,
        default=EDGE_AIR_CHANCE,
        help="with --edge-crops, share of crops with a slab",
    )
    args = parser.parse_args()
    edges = EdgeCrops(args.edge_slab, args.edge_chance) if args.edge_crops else None

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    cache = load_cache(args.cache)
    print(
        f"cache {len(cache.labels)} patches, {int(cache.has_lesion.sum())} with lesions, device {device}",
        flush=True,
    )
    channels = tuple(int(c) for c in args.channels.split(","))
    model = UNet3D(channels).to(device)
    on_device = DeviceBatcher(cache, device) if device.type == "cuda" else None
    if on_device is not None:
        torch.backends.cudnn.benchmark = True
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location=device, weights_only=True)["state"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = args.warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return float((step + 1) / warmup)
        span = max(1, args.iterations - warmup)
        return float(0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * 0.97 + 0.03)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    running = 0.0
    step = 0
    for step in range(args.iterations):
        if on_device is not None:
            x, y = on_device(args.batch, rng, args.extra_fraction, edges)
        else:
            x, y = batch(cache, args.batch, rng, args.extra_fraction, edges)
        x, y = x.to(device), y.to(device)
        train_mode(model, frozen_norm=args.frozen_norm)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_device is not None):
            logits = model(x)
        weights = lesion_weights(y, args.small_lesion_weight) if args.small_lesion_weight > 0 else None
        loss = loss_fn(logits.float(), y, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        value = loss.item() if on_device is None or step % 50 == 0 else running
        running = 0.98 * running + 0.02 * value if step else value
        minutes = (time.perf_counter() - started) / 60
        if step % (25 if on_device is None else 250) == 0 or step == args.iterations - 1:
            print(
                f"step {step} loss {running:.4f} lr {scheduler.get_last_lr()[0]:.2e} {minutes:.1f} min",
                flush=True,
            )
        if step % 200 == 199:
            torch.save({"state": model.state_dict(), "step": step, "channels": channels}, args.out)
        if args.stop_after is not None and step + 1 >= args.stop_after:
            print(f"stopping after step {step} (--stop-after)", flush=True)
            break
        if minutes > args.max_minutes:
            print(f"stopping at step {step}: {minutes:.1f} min", flush=True)
            break
    torch.save({"state": model.state_dict(), "step": step, "channels": channels}, args.out)
    print(
        f"saved {args.out} after {step + 1} steps, {(time.perf_counter() - started) / 60:.1f} min", flush=True
    )


if __name__ == "__main__":
    main()
