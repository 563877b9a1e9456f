"""Fit a package's score calibration on the validation set: raw score -> probability of a true lesion.

Reads the detections ``evaluate.py --json`` reports (every finding with what it overlapped; run it
on the validation set with ``--min-score`` at or below the label's shipped ``min_score``), fits a
monotone curve by isotonic regression (pool-adjacent-violators), keeps the findings the package
reports (score >= ``--min-score``, the shipped operating point), and writes:

* the manifest snippet: ``calibration = { scores = [...], probabilities = [...] }``
  (``models/MANIFEST.md``), at most ``--points`` knots at score quantiles, piecewise linear;
* a reliability table: per bin of raw score, the findings, the fraction that were true lesions and
  the mean calibrated probability.

A finding is *true* when its voxels overlap a synthetic lesion, *false* when evaluate.py counts it
as a false positive (it overlaps none and lies mostly outside the ignored region); findings that
overlap only the ignored region (the real tumour of the host scans) are left out.

Raw scores of a segmentation network crowd just below 1.0, so bins and knots are placed on
``-log10(1 - score)`` quantiles rather than on the score itself.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

_EPS = 1e-7  # 1 - score floor: a float32 probability of 1.0 is "at least 1 - 1e-7"


def isotonic(y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Pool-adjacent-violators: the non-decreasing sequence closest (least squares) to ``y``."""
    blocks: list[list[float]] = []  # [mean, weight]
    for value in y:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * weight) / (blocks[-1][1] + weight),
                          blocks[-1][1] + weight]
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def logit_scale(score: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``-log10(1 - score)``: spreads the scores that crowd below 1.0."""
    return np.asarray(-np.log10(np.maximum(1.0 - score, _EPS)), dtype=np.float64)


def fit(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.float64], points: int,
        floor: float) -> tuple[list[float], list[float]]:
    """Knots (scores strictly increasing from ``floor``, up to 1.0) and calibrated probabilities."""
    order = np.argsort(scores, kind="stable")
    s, fitted = scores[order], isotonic(truth[order])
    quantiles = np.quantile(logit_scale(s), np.linspace(0.0, 1.0, points - 1))
    knots = sorted({floor, *(float(1.0 - 10.0 ** -q) for q in quantiles), 1.0})
    knots = [k for k in knots if floor <= k <= 1.0]
    probabilities = []
    for k in knots:
        below = np.flatnonzero(s <= k + 1e-12)
        probabilities.append(float(fitted[below[-1]]) if below.size else float(fitted[0]))
    rounded = [round(p, 3) for p in np.maximum.accumulate(probabilities)]
    kept_s, kept_p = [], []
    for k, p in zip(knots, rounded, strict=True):
        if not kept_s or k > kept_s[-1] + 1e-9:
            kept_s.append(round(k, 7))
            kept_p.append(p)
    return kept_s, kept_p


def apply(knots: list[float], probabilities: list[float], score: float) -> float:
    """The calibrated probability at ``score``: piecewise linear, constant beyond the ends."""
    return float(np.interp(score, knots, probabilities))


def reliability(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.float64], knots: list[float],
                probabilities: list[float], bins: int) -> list[dict[str, float]]:
    """Per bin of raw score (equal counts on the -log10(1 - score) scale): range, count, observed
    fraction true, mean calibrated probability."""
    order = np.argsort(scores, kind="stable")
    rows = []
    for part in np.array_split(order, bins):
        if part.size == 0:
            continue
        s = scores[part]
        rows.append({"score_low": float(s.min()), "score_high": float(s.max()), "findings": int(part.size),
                     "observed_true": float(truth[part].mean()),
                     "calibrated_mean": float(np.mean([apply(knots, probabilities, v) for v in s]))})
    return rows


def main() -> None:
    """Fit, print the reliability table and the manifest snippet, optionally write both as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path, help="evaluate.py --json output on the validation set")
    parser.add_argument("--min-score", type=float, default=0.95, help="the label's shipped min_score")
    parser.add_argument("--points", type=int, default=8, help="knots of the curve (at most 12)")
    parser.add_argument("--bins", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 2 <= args.points <= 12:
        parser.error("--points must be between 2 and 12")
    report = json.loads(args.evaluation.read_text())
    detections = report["synthetic"]["detections"]
    rows = [(float(d["score"]), 1.0 if d["lesions"] else 0.0) for d in detections
            if (d["lesions"] or d["false_positive"]) and float(d["score"]) >= args.min_score]
    if len(rows) < args.points:
        raise SystemExit(f"calibrate: only {len(rows)} findings at score >= {args.min_score}: too few")
    scores = np.array([r[0] for r in rows])
    truth = np.array([r[1] for r in rows])
    knots, probabilities = fit(scores, truth, args.points, args.min_score)
    table = reliability(scores, truth, knots, probabilities, args.bins)
    scans = int(report["synthetic"]["scans"])
    true = int(truth.sum())
    print(f"{len(rows)} findings on {scans} scans: {true} true, {len(rows) - true} false")
    print("| raw score | findings | observed true | calibrated (mean) |\n| --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['score_low']:.5f}-{row['score_high']:.7f} | {row['findings']} | "
              f"{row['observed_true']:.2f} | {row['calibrated_mean']:.2f} |")
    snippet = f"calibration = {{ scores = {knots}, probabilities = {probabilities} }}"
    print(snippet)
    brier = float(np.mean([(apply(knots, probabilities, s) - t) ** 2
                           for s, t in zip(scores, truth, strict=True)]))
    constant = float(np.mean((truth.mean() - truth) ** 2))
    print(f"Brier score {brier:.3f} (a constant {truth.mean():.2f}: {constant:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"findings": len(rows), "scans": scans, "true": int(truth.sum()),
                                         "scores": knots, "probabilities": probabilities, "bins": table,
                                         "brier": brier}, indent=1) + "\n")
    if not all(math.isfinite(p) for p in probabilities):
        raise SystemExit("calibrate: a probability is not finite")


if __name__ == "__main__":
    main()
