"""Evaluate the lung-lesion-unet package through the node's own runtime (reader.inference).

* Held-out synthetic set (``synth.py --split test``): FROC (sensitivity at 0.5, 1, 2, 4 false
  positives per scan) per lesion size bucket, and Dice of detected lesions, at the package's
  operating point. A finding is a hit for every lesion its voxels overlap; a finding that overlaps
  no lesion and lies mostly (>= 50 %) outside the ignored region is a false positive.
* The two real A0001 series (loaded with ``reader.volume.load_volume``): is the annotated
  adenocarcinoma found (a finding's voxels overlap a radiologist box on an annotated slice), and
  how many other findings are reported. Also the wall time of ``ModelPackage.run``.

Prints a JSON report (``--json`` also writes it to a file). See models/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth import DATA_DIR, IGNORE, REAL_SERIES, SIZE_BUCKETS_MM, tumour_boxes  # noqa: E402

from reader.findings import Finding, InferenceResult  # noqa: E402
from reader.inference import ModelPackage  # noqa: E402
from reader.volume import SourceInstance, Volume, load_volume  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FP_RATES = (0.5, 1.0, 2.0, 4.0)
MIN_SCORES = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)  # the operating points tabulated per report


@dataclass(frozen=True)
class Detection:
    """One finding of one case with what it overlaps."""

    case: str
    score: float
    lesions: tuple[int, ...]  # truth instance numbers it overlaps
    false_positive: bool


def synthetic_volume(
    image: npt.NDArray[np.float32], spacing: tuple[float, float, float], name: str
) -> Volume:
    """A held-out array as a node Volume (axial, identity orientation, made-up UIDs)."""
    uid = "2.25." + str(abs(hash(name)) % 10**30)
    sources = tuple(
        SourceInstance(Path(f"{name}-{k}.dcm"), CT_IMAGE_STORAGE, f"{uid}.{k + 1}")
        for k in range(image.shape[0])
    )
    return Volume(
        voxels=image,
        spacing_mm=spacing,
        origin_mm=(0.0, 0.0, 0.0),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, 1.0, 0.0),
        sources=sources,
        modality="CT",
        study_instance_uid=uid + ".1",
        series_instance_uid=uid + ".2",
        frame_of_reference_uid=uid + ".3",
    )


def finding_masks(result: InferenceResult, volume: Volume) -> list[tuple[Finding, npt.NDArray[np.bool_]]]:
    """Each finding with its voxels: the 26-connected component of the label map that matches it."""
    components, count = ndimage.label(result.label_map > 0, structure=np.ones((3, 3, 3)))
    boxes = ndimage.find_objects(components)
    out: list[tuple[Finding, npt.NDArray[np.bool_]]] = []
    used: set[int] = set()
    for finding in result.findings:
        best, best_d = 0, float("inf")
        for index in range(1, count + 1):
            if index in used:
                continue
            box = boxes[index - 1]
            if box is None:
                continue
            sel = components[box] == index
            if int(sel.sum()) != finding.voxel_count:
                continue
            centre = np.argwhere(sel).mean(axis=0) + [b.start for b in box]
            p = volume.voxel_to_patient((float(centre[0]), float(centre[1]), float(centre[2])))
            d = float(np.linalg.norm(np.subtract(p, finding.centroid_mm)))
            if d < best_d:
                best, best_d = index, d
        if best == 0:
            raise ValueError(f"no component matches finding {finding.number}")
        used.add(best)
        out.append((finding, components == best))
    return out


def overlap(truth: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_]) -> tuple[tuple[int, ...], bool]:
    """The truth instances a finding's voxels ``mask`` overlap, and whether it is a false positive:
    it overlaps none and lies mostly (>= 50 %) outside the ignored region."""
    inside = truth[mask]
    hit = tuple(sorted({int(v) for v in np.unique(inside) if 0 < v < IGNORE}))
    return hit, not hit and float((inside != IGNORE).mean()) >= 0.5


def froc(detections: list[Detection], lesion_ids: list[tuple[str, int]], scans: int) -> dict[str, float]:
    """Sensitivity at each FP rate: the best sensitivity whose FP/scan does not exceed the rate."""
    thresholds = sorted({d.score for d in detections}, reverse=True)
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    wanted = set(lesion_ids)
    for t in thresholds:
        kept = [d for d in detections if d.score >= t]
        fps = sum(d.false_positive for d in kept) / scans
        hits = {(d.case, k) for d in kept for k in d.lesions} & wanted
        points.append((fps, len(hits) / max(1, len(wanted))))
    return {f"{rate:g}": max(s for f, s in points if f <= rate) for rate in FP_RATES}


def bucket_of(diameter_mm: float) -> str:
    """Size bucket name, e.g. "8-15"."""
    for lo, hi in SIZE_BUCKETS_MM:
        if lo <= diameter_mm < hi or (hi == SIZE_BUCKETS_MM[-1][1] and diameter_mm == hi):
            return f"{lo:g}-{hi:g}"
    return "other"


def evaluate_synthetic(package: ModelPackage, folder: Path, limit: int | None) -> dict[str, object]:
    """FROC per size bucket and Dice of detected lesions on the held-out cases."""
    detections: list[Detection] = []
    lesions: list[tuple[str, int, float, str, str, str]] = []  # case, id, diameter, shape, density, location
    dice: dict[tuple[str, int], float] = {}
    cases = sorted(folder.glob("*.npz"))[:limit]
    seconds = 0.0
    for path in cases:
        with np.load(path) as data:
            image = data["image"].astype(np.float32)
            truth = data["label"]
            meta = json.loads(str(data["meta"]))
        name = meta["name"]
        volume = synthetic_volume(image, tuple(meta["spacing_mm"]), name)
        started = time.perf_counter()
        result = package.run(volume)
        seconds += time.perf_counter() - started
        present = {int(v) for v in np.unique(truth) if 0 < v < IGNORE}
        for i, spec in enumerate(meta["lesions"], start=1):
            if i in present:
                lesions.append(
                    (name, i, spec["diameter_mm"], spec["shape"], spec["density"], spec["location"])
                )
        union: dict[int, npt.NDArray[np.bool_]] = {}
        for finding, mask in finding_masks(result, volume):
            hit, false_positive = overlap(truth, mask)
            detections.append(Detection(name, finding.score, hit, false_positive))
            for k in hit:
                union[k] = union.get(k, np.zeros_like(mask)) | mask
        for k, mask in union.items():
            t = truth == k
            dice[(name, k)] = float(2 * (mask & t).sum() / (mask.sum() + t.sum()))
        print(
            f"{name}: {len(result.findings)} findings, lesions {sorted(present)}, hit {sorted(union)}",
            file=sys.stderr,
            flush=True,
        )
    scans = len(cases)
    report: dict[str, object] = {
        "scans": scans,
        "lesions": len(lesions),
        "seconds_per_scan": seconds / max(1, scans),
    }
    groups: dict[str, list[tuple[str, int]]] = {"all": [(c, i) for c, i, *_ in lesions]}
    groups[">=8"] = [(c, i) for c, i, d, *_ in lesions if d >= 8]
    for lo, hi in SIZE_BUCKETS_MM:
        groups[f"{lo:g}-{hi:g}"] = [(c, i) for c, i, d, *_ in lesions if bucket_of(d) == f"{lo:g}-{hi:g}"]
    for attr, index in (("shape", 3), ("density", 4), ("location", 5)):
        for value in sorted({les[index] for les in lesions}):
            groups[f"{attr}={value}"] = [(les[0], les[1]) for les in lesions if les[index] == value]
    fp_total = sum(d.false_positive for d in detections)
    table: dict[str, object] = {}
    for group, ids in groups.items():
        found = [dice[i] for i in ids if i in dice]
        table[group] = {
            "lesions": len(ids),
            "sensitivity_at_operating_point": len(found) / max(1, len(ids)),
            "froc": froc(detections, ids, scans),
            "dice_detected_mean": float(np.mean(found)) if found else None,
            "dice_detected_median": float(np.median(found)) if found else None,
        }
    report["fp_per_scan_at_operating_point"] = fp_total / max(1, scans)
    # every finding with what it overlapped: what models/training/calibrate.py fits the score on
    report["detections"] = [
        {"case": d.case, "score": d.score, "lesions": list(d.lesions), "false_positive": d.false_positive}
        for d in detections
    ]
    report["groups"] = table
    report["min_scores"] = operating_points(detections, groups[">=8"], scans)
    return report


def operating_points(
    detections: list[Detection], lesion_ids: list[tuple[str, int]], scans: int
) -> dict[str, dict[str, float]]:
    """FP/scan and sensitivity of ``lesion_ids`` if the package's ``min_score`` were each of MIN_SCORES
    (only those at or above the one it ran with are meaningful: lower scores were never reported)."""
    wanted = set(lesion_ids)
    out: dict[str, dict[str, float]] = {}
    for floor in MIN_SCORES:
        kept = [d for d in detections if d.score >= floor]
        hits = {(d.case, k) for d in kept for k in d.lesions} & wanted
        out[f"{floor:g}"] = {
            "fp_per_scan": sum(d.false_positive for d in kept) / max(1, scans),
            "sensitivity": len(hits) / max(1, len(wanted)),
        }
    return out


def with_settings(
    package: Path,
    scratch: Path,
    *,
    spacing: str | None,
    flips: str | None,
    min_score: float | None,
    mirror: str | None = None,
) -> Path:
    """A copy of ``package`` in ``scratch`` whose model.toml has the given ``target_spacing_mm``
    ("Z,Y,X"), ``test_time_flips`` ("slice,row", "" for none), ``min_score`` and
    ``edge_mirror_voxels`` ("Z,Y,X", "" for none); the package itself is left as it is. This is how
    the settings compared in MODEL_CARD.md are reproduced. Raises ValueError when model.toml has no
    line to put a setting in."""
    shutil.copytree(package, scratch, dirs_exist_ok=True)
    wanted = {
        "target_spacing_mm": spacing,
        "blend": flips or mirror or None,  # test_time_flips and edge_mirror_voxels go after blend
        "min_score": None if min_score is None else str(min_score),
    }
    applied: set[str] = set()
    lines = []
    for original in (scratch / "model.toml").read_text().splitlines():
        key = original.split("=", 1)[0].strip()
        if (flips is not None and key == "test_time_flips") or (
            mirror is not None and key == "edge_mirror_voxels"
        ):
            continue
        line = original
        if key == "target_spacing_mm" and spacing is not None:
            line = f"target_spacing_mm = [{', '.join(str(float(v)) for v in spacing.split(','))}]"
        elif key == "min_score" and min_score is not None:
            line = f"min_score = {min_score}"
        lines.append(line)
        if key == "blend" and flips:
            lines.append("test_time_flips = [" + ", ".join(f'"{a}"' for a in flips.split(",")) + "]")
        if key == "blend" and mirror:
            lines.append(f"edge_mirror_voxels = [{', '.join(str(int(v)) for v in mirror.split(','))}]")
        applied.add(key)
    missing = sorted(k for k, v in wanted.items() if v is not None and k not in applied)
    if missing:
        raise ValueError(f"the package's model.toml has no {', '.join(missing)} line to change")
    (scratch / "model.toml").write_text("\n".join(lines) + "\n")
    return scratch


def evaluate_real(package: ModelPackage) -> dict[str, object]:
    """Tumour found and other findings on both real series of A0001."""
    report: dict[str, object] = {}
    for series in REAL_SERIES:
        paths = sorted((DATA_DIR / series).glob("*.dcm"))
        volume = load_volume(paths)
        uids = [s.sop_instance_uid for s in volume.sources]
        boxes = tumour_boxes(uids, DATA_DIR / "annotations-A0001")
        box_mask = np.zeros(volume.voxels.shape, dtype=bool)
        for k, (x0, y0, x1, y1) in boxes.items():
            box_mask[k, y0 : y1 + 1, x0 : x1 + 1] = True
        started = time.perf_counter()
        result = package.run(volume)
        seconds = time.perf_counter() - started
        tumour, others = [], []
        for finding, mask in finding_masks(result, volume):
            entry = {
                "score": round(finding.score, 3),
                "diameter_mm": round(finding.longest_diameter_mm, 1),
                "volume_mm3": round(finding.volume_mm3, 1),
                "slices": [min(finding.slice_indices), max(finding.slice_indices)],
            }
            if (mask & box_mask).any():
                inside = mask[sorted(boxes)]
                entry["box_overlap_fraction"] = round(
                    float((inside & box_mask[sorted(boxes)]).sum() / max(1, inside.sum())), 3
                )
                tumour.append(entry)
            else:
                others.append(entry)
        report[series] = {
            "annotated_slices": sorted(boxes),
            "tumour_found": bool(tumour),
            "tumour_findings": tumour,
            "other_findings": len(others),
            "others": others,
            "seconds": round(seconds, 2),
            "provider": result.provider,
        }
        print(
            f"{series}: tumour {bool(tumour)}, others {len(others)}, {seconds:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report's figures as the Markdown tables of MODEL_CARD.md."""
    lines: list[str] = []
    synthetic = report.get("synthetic")
    if isinstance(synthetic, dict):
        fp = synthetic["fp_per_scan_at_operating_point"]
        lines += [
            f"Held-out synthetic set: {synthetic['scans']} scans, {synthetic['lesions']} lesions; "
            f"FP/scan at the operating point {fp:.2f}; "
            f"{synthetic['seconds_per_scan']:.1f} s per scan.",
            "",
            "| lesions | n | sens. @0.5 FP | @1 FP | @2 FP | @4 FP "
            "| sens. at operating point | Dice (mean / median) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for group, row in synthetic["groups"].items():
            f = row["froc"]
            mean, median = row["dice_detected_mean"], row["dice_detected_median"]
            dice = "-" if mean is None else f"{mean:.2f} / {median:.2f}"
            lines.append(
                f"| {group} | {row['lesions']} | {f['0.5']:.2f} | {f['1']:.2f} | {f['2']:.2f} | {f['4']:.2f} "
                f"| {row['sensitivity_at_operating_point']:.2f} | {dice} |"
            )
        lines += ["", "| min score | FP/scan | sens. >= 8 mm |", "| --- | --- | --- |"]
        for floor, row in synthetic.get("min_scores", {}).items():
            lines.append(f"| {floor} | {row['fp_per_scan']:.2f} | {row['sensitivity']:.2f} |")
    real = report.get("real")
    if isinstance(real, dict):
        lines += [
            "",
            "| series | tumour found | tumour finding(s) | other findings | run time |",
            "| --- | --- | --- | --- | --- |",
        ]
        for series, row in real.items():
            tumour = "; ".join(
                f"score {t['score']}, {t['diameter_mm']} mm, slices {t['slices'][0]}-{t['slices'][1]}"
                for t in row["tumour_findings"]
            )
            others = "; ".join(f"score {o['score']}, {o['diameter_mm']} mm" for o in row["others"])
            lines.append(
                f"| {series} | {'yes' if row['tumour_found'] else 'no'} | {tumour or '-'} "
                f"| {row['other_findings']}{' (' + others + ')' if others else ''} | {row['seconds']} s |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run both evaluations and print (and optionally write) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "lung-lesion-unet")
    parser.add_argument("--test", type=Path, default=Path("/tmp/lung-synth/test"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out cases")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--target-spacing-mm", default=None, help="run with this model grid, e.g. 4,2,2")
    parser.add_argument("--test-time-flips", default=None, help='these flips, e.g. "slice" ("": none)')
    parser.add_argument("--min-score", type=float, default=None, help="run with this min_score, e.g. 0.5")
    parser.add_argument(
        "--edge-mirror-voxels", default=None, help='run with this edge mirroring, e.g. 4,0,0 ("": none)'
    )
    args = parser.parse_args()
    overrides = (args.target_spacing_mm, args.test_time_flips, args.min_score, args.edge_mirror_voxels)
    with tempfile.TemporaryDirectory() as scratch:  # the session holds the graph once loaded
        folder: Path = args.package
        if overrides != (None, None, None, None):
            folder = with_settings(
                folder,
                Path(scratch) / "package",
                spacing=args.target_spacing_mm,
                flips=args.test_time_flips,
                min_score=args.min_score,
                mirror=args.edge_mirror_voxels,
            )
        package = ModelPackage.load(folder, providers=("CPUExecutionProvider",))
    report: dict[str, object] = {
        "package": str(args.package),
        "settings": {
            "target_spacing_mm": list(package.manifest.preprocessing.target_spacing_mm or ()),
            "test_time_flips": list(package.manifest.preprocessing.test_time_flips),
            "edge_mirror_voxels": list(package.manifest.preprocessing.edge_mirror_voxels),
            "min_score": [label.min_score for label in package.manifest.labels],
        },
    }
    if not args.skip_real:
        report["real"] = evaluate_real(package)
    if not args.skip_synthetic:
        report["synthetic"] = evaluate_synthetic(package, args.test, args.limit)
    text = json.dumps(report, indent=1)
    print(text)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
