"""Hard-negative patches: training patches cut around the false positives of a model package.

Runs the package through the node's runtime (``reader.inference.ModelPackage``, as ``evaluate.py``
does) on whole training hosts (``synth.py --split hard``: phantoms and copies of the lung-kernel
series with synthetic lesions, seeds of no other split), takes every finding that overlaps no
lesion and lies mostly outside the ignored region (``evaluate.py``'s false positive), and writes
``--copies`` patches around each (jittered corners, on ``--grid``) with the host's labels, in the
cache format of ``synth.py`` (npz: image int16 HU, label uint8 with the ignore value). ``train.py``
takes the folder as one more ``--cache``. See models/README.md ("Tried after 1.5.0, not shipped:
hard negatives").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import finding_masks, overlap, synthetic_volume, with_settings  # noqa: E402
from synth import (  # noqa: E402
    CACHE_PATCH,
    IGNORE,
    Vec3,
    clip_corner,
    parse_grid,
    sample_patch,
    target_shape,
)

from reader.inference import ModelPackage  # noqa: E402

JITTER = 0.15  # corners move by up to this share of the patch, so a false positive is not always centred


def training_label(truth: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A whole case's instance map (1..n lesions, IGNORE) as a training label (1, IGNORE, 0)."""
    label = ((truth > 0) & (truth < IGNORE)).astype(np.uint8)
    label[truth == IGNORE] = IGNORE
    return label


def corners_around(
    centre: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    spacing: Vec3,
    grid: Vec3,
    *,
    copies: int,
    rng: np.random.Generator,
) -> list[tuple[int, int, int]]:
    """``copies`` patch corners on ``grid`` whose patch holds the native voxel ``centre`` (at its
    corner-aligned place on the grid, as :func:`synth.sample_patch` samples)."""
    tshape = target_shape(shape, spacing, grid)
    place = [c * (t - 1) / (n - 1) if n > 1 else 0.0 for c, n, t in zip(centre, shape, tshape, strict=True)]
    out = []
    for _ in range(copies):
        corner = [
            round(x - p / 2 + rng.uniform(-p * JITTER, p * JITTER))
            for x, p in zip(place, CACHE_PATCH, strict=True)
        ]
        out.append(clip_corner(corner, tshape))
    return out


def main() -> None:
    """Mine every case of ``--cases`` and write ``--out/<case>.npz`` for those with false positives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "lung-lesion-unet")
    parser.add_argument("--cases", type=Path, default=Path("/tmp/lung-synth/hard"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/lung-hard/train"))
    parser.add_argument("--min-score", type=float, default=0.5, help="mine findings of this score and up")
    parser.add_argument(
        "--grid", type=parse_grid, default="4,1.5,1.5", help="patches are cut on this grid, mm"
    )
    parser.add_argument("--copies", type=int, default=3, help="patches per false positive")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies takes at least 1")
    grid: Vec3 = args.grid
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    total = 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = with_settings(
            args.package, Path(scratch) / "package", spacing=None, flips=None, min_score=args.min_score
        )
        package = ModelPackage.load(folder, providers=("CPUExecutionProvider",))
    for path in sorted(args.cases.glob("*.npz")):
        with np.load(path) as data:
            image = data["image"].astype(np.float32)
            truth = data["label"]
            meta = json.loads(str(data["meta"]))
        spacing: Vec3 = (meta["spacing_mm"][0], meta["spacing_mm"][1], meta["spacing_mm"][2])
        volume = synthetic_volume(image, spacing, meta["name"])
        result = package.run(volume)
        label = training_label(truth)
        images, labels, scores = [], [], []
        for finding, mask in finding_masks(result, volume):
            if not overlap(truth, mask)[1]:  # evaluate.py's false positive
                continue
            scores.append(round(finding.score, 3))
            centre = np.argwhere(mask).mean(axis=0)
            for corner in corners_around(centre, image.shape, spacing, grid, copies=args.copies, rng=rng):
                patch, patch_label = sample_patch(image, label, spacing, corner, grid)
                images.append(patch)
                labels.append(patch_label)
        if images:
            np.savez(args.out / f"{meta['name']}.npz", image=np.stack(images), label=np.stack(labels))
        total += len(scores)
        print(f"{meta['name']}: {len(scores)} false positives {scores}", flush=True)
    print(f"{total} false positives, {total * args.copies} patches in {args.out}", flush=True)


if __name__ == "__main__":
    main()
