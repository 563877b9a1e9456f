"""Compare lung-field gate settings (fraction, margin, min score) for one network, as 1.2.0 was chosen.

Runs a package once with no gate and ``min_score`` 0.5 over the validation set
(``synth.py --split val``; 1.2.0 was chosen on the test set, see MODEL_CARD.md) and the two real
series, records for every finding its score, the lesions it hits, whether it is a false positive
(as ``evaluate.py`` counts them) and the fraction of its voxels within d mm of the lung field
(``reader.inference.anatomy``), then prints, for each setting, the sensitivity for lesions >= 8 mm
at <= 1 and <= 4 FP/scan, FP/scan and the real-series outcome. Settings chosen this way are chosen
on the set they were swept on: quote the test set's figures only from a set they were not chosen on.

    .venv/bin/python models/training/sweep_gate.py --package DIR [--test DIR] [--json out.json]

``--package`` must hold the network's ``model.onnx``; its ``model.toml`` is copied to a scratch
folder with the gate removed and ``min_score`` set to 0.5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate  # noqa: E402
from synth import DATA_DIR, IGNORE, REAL_SERIES, tumour_boxes  # noqa: E402

from reader.inference import ModelPackage, anatomy  # noqa: E402
from reader.volume import Volume, load_volume  # noqa: E402

MARGINS_MM = (0.0, 3.0, 6.0, 10.0, 15.0)
FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8)
MIN_SCORES = (0.5, 0.8, 0.9)


def ungated(package: Path, scratch: Path) -> Path:
    """A copy of the package with no lung gate and min_score 0.5."""
    shutil.copytree(package, scratch, dirs_exist_ok=True)
    text = (scratch / "model.toml").read_text()
    lines = [
        line
        for line in text.splitlines()
        if not line.startswith(("min_lung_fraction", "lung_margin_mm", "min_score"))
    ]
    out = "\n".join(lines).replace("threshold = 0.5\n", "threshold = 0.5\nmin_score = 0.5\n") + "\n"
    tomllib.loads(out)
    (scratch / "model.toml").write_text(out)
    return scratch


def near_lung(volume: Volume, mask: npt.NDArray[np.bool_]) -> dict[str, float]:
    """Fraction of ``mask`` within each margin of the lung field (0 when no lungs are found)."""
    gate = anatomy.lung_gate(volume)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    pad = [int(np.ceil(max(MARGINS_MM) / s)) + 1 for s in volume.spacing_mm]
    grown = tuple(
        slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, mask.shape, strict=True)
    )
    lung = gate(grown, 0.0)
    if lung is None or not lung.any():
        return {f"{m:g}": 0.0 for m in MARGINS_MM}
    distance = ndimage.distance_transform_edt(~lung, sampling=volume.spacing_mm)[mask[grown]]
    return {f"{m:g}": float((distance <= m + 1e-6).mean()) for m in MARGINS_MM}


def record(package: ModelPackage, test: Path) -> dict[str, Any]:
    """Every finding of the ungated package on the held-out set and the real series."""
    out: dict[str, Any] = {"synthetic": [], "real": [], "lesions": [], "scans": 0}
    for path in sorted(test.glob("*.npz")):
        with np.load(path) as data:
            image = data["image"].astype(np.float32)
            truth = data["label"]
            meta = json.loads(str(data["meta"]))
        name = meta["name"]
        volume = evaluate.synthetic_volume(image, tuple(meta["spacing_mm"]), name)
        result = package.run(volume)
        out["scans"] += 1
        present = {int(v) for v in np.unique(truth) if 0 < v < IGNORE}
        out["lesions"] += [
            [name, i, spec["diameter_mm"]] for i, spec in enumerate(meta["lesions"], start=1) if i in present
        ]
        ignore = truth == IGNORE
        for finding, mask in evaluate.finding_masks(result, volume):
            hit = sorted({int(v) for v in np.unique(truth[mask]) if 0 < v < IGNORE})
            fp = not hit and float((~ignore[mask]).mean()) >= 0.5
            out["synthetic"].append(
                {"case": name, "score": finding.score, "hit": hit, "fp": fp, "near": near_lung(volume, mask)}
            )
        print(f"{name}: {len(result.findings)} findings", file=sys.stderr, flush=True)
    for series in REAL_SERIES:
        volume = load_volume(sorted((DATA_DIR / series).glob("*.dcm")))
        boxes = tumour_boxes([s.sop_instance_uid for s in volume.sources], DATA_DIR / "annotations-A0001")
        box_mask = np.zeros(volume.shape, dtype=bool)
        for k, (x0, y0, x1, y1) in boxes.items():
            box_mask[k, y0 : y1 + 1, x0 : x1 + 1] = True
        for finding, mask in evaluate.finding_masks(package.run(volume), volume):
            out["real"].append(
                {
                    "series": series,
                    "score": finding.score,
                    "tumour": bool((mask & box_mask).any()),
                    "near": near_lung(volume, mask),
                }
            )
        print(f"{series} done", file=sys.stderr, flush=True)
    return out


def sensitivity(
    detections: list[dict[str, Any]], wanted: set[tuple[str, int]], scans: int, rate: float
) -> float:
    """Best sensitivity over score thresholds whose FP/scan stays <= ``rate`` (as evaluate.froc)."""
    best = 0.0
    for t in sorted({d["score"] for d in detections}, reverse=True):
        kept = [d for d in detections if d["score"] >= t]
        if sum(d["fp"] for d in kept) / scans <= rate:
            hits = {(d["case"], k) for d in kept for k in d["hit"]} & wanted
            best = max(best, len(hits) / max(1, len(wanted)))
    return best


def table(found: dict[str, Any]) -> list[str]:
    """One Markdown row per (margin, fraction, min score)."""
    scans = found["scans"]
    wanted = {(c, i) for c, i, d in found["lesions"] if d >= 8}
    rows = [
        "| margin mm | fraction | min score | sens. >= 8 mm @1 FP | @4 FP | FP/scan | tumour (lung / std) "
        "| others (lung / std) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for margin in MARGINS_MM:
        for fraction in FRACTIONS:
            for min_score in MIN_SCORES:

                def keep(
                    d: dict[str, Any], m: float = margin, f: float = fraction, s: float = min_score
                ) -> bool:
                    return bool(d["near"][f"{m:g}"] >= f and d["score"] >= s)

                dets = [d for d in found["synthetic"] if keep(d)]
                real = [d for d in found["real"] if keep(d)]
                outcome = [
                    (
                        any(d["tumour"] for d in real if d["series"] == s),
                        sum(not d["tumour"] for d in real if d["series"] == s),
                    )
                    for s in REAL_SERIES
                ]
                at1 = sensitivity(dets, wanted, scans, 1.0)
                at4 = sensitivity(dets, wanted, scans, 4.0)
                fps = sum(d["fp"] for d in dets) / scans
                tumour = " / ".join("yes" if o[0] else "no" for o in outcome)
                others = " / ".join(str(o[1]) for o in outcome)
                rows.append(
                    f"| {margin:g} | {fraction:g} | {min_score:g} | {at1:.2f} | {at4:.2f} | {fps:.2f} "
                    f"| {tumour} | {others} |"
                )
    return rows


def main() -> None:
    """Record the ungated findings once, then print the table of settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "lung-lesion-unet")
    parser.add_argument(
        "--test", type=Path, default=Path("/tmp/lung-synth/val"), help="the set to choose on (validation)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the per-finding records here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        package = ModelPackage.load(ungated(args.package, Path(scratch) / "package"))
        found = record(package, args.test)
    if args.json is not None:
        args.json.write_text(json.dumps(found))
    print("\n".join(table(found)))


if __name__ == "__main__":
    main()
