"""Fit a package's score calibration on the validation set: raw score -> probability of a true lesion.

Reads the detections ``evaluate.py --json`` reports (every finding with what it overlapped; run it
on the validation set with ``--min-score`` at or below the label's shipped ``min_score``), fits a
monotone curve by isotonic regression (pool-adjacent-violators), keeps the findings the package
reports (score >= ``--min-score``, the shipped operating point), and writes:

* the manifest snippet: ``calibration = { scores = [...], probabilities = [...] }``
  (``models/MANIFEST.md``), at most ``--points`` knots following the fit's steps (:func:`fit`);
* a reliability table: per bin of raw score, the findings, the fraction that were true lesions and
  the mean calibrated probability.

A finding is *true* when its voxels overlap a synthetic lesion, *false* when evaluate.py counts it
as a false positive (it overlaps none and lies mostly outside the ignored region); findings that
overlap only the ignored region (the real tumour of the host scans) are left out.

Raw scores of a segmentation network crowd just below 1.0 (many are 1.0 in float32), so the
reliability bins hold equal numbers of findings rather than equal score ranges.
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
    return np.concatenate([np.full(n, mean) for mean, n, _ in _blocks(y)])


def _blocks(y: npt.NDArray[np.float64]) -> list[tuple[float, int, float]]:
    """The pooled blocks of pool-adjacent-violators: (mean, count, sum) in order."""
    blocks: list[tuple[float, int, float]] = []
    for value in y:
        blocks.append((float(value), 1, float(value)))
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            _, n2, s2 = blocks.pop()
            _, n1, s1 = blocks.pop()
            blocks.append(((s1 + s2) / (n1 + n2), n1 + n2, s1 + s2))
    return blocks


def logit_scale(score: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``-log10(1 - score)``: spreads the scores that crowd below 1.0."""
    return np.asarray(-np.log10(np.maximum(1.0 - score, _EPS)), dtype=np.float64)


def fit(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.float64], points: int,
        floor: float) -> tuple[list[float], list[float]]:
    """Knots (scores strictly increasing from ``floor`` to 1.0) and calibrated probabilities.

    The isotonic fit is a step function; each step is kept as two knots (the last score of one
    block, the first of the next), so the piecewise-linear table follows the steps rather than
    smearing them across the crowded scores near 1.0. Each block's value is its Laplace estimate
    ``(true + 1) / (findings + 2)``: 41 true findings of 41 give 0.98, not a certainty. Adjacent
    blocks are merged (smallest first) until the table has at most ``points`` knots.
    """
    order = np.argsort(scores, kind="stable")
    s, t = scores[order], truth[order]
    spans: list[list[float]] = []  # [low score, high score, true, count]
    start = 0
    for _, n, total in _blocks(t):
        spans.append([float(s[start]), float(s[start + n - 1]), total, float(n)])
        start += n
    while 2 * len(spans) > points and len(spans) > 1:
        i = min(range(len(spans) - 1), key=lambda k: spans[k][3] + spans[k + 1][3])
        a, b = spans[i], spans.pop(i + 1)
        spans[i] = [a[0], b[1], a[2] + b[2], a[3] + b[3]]
    knots: list[float] = []
    probabilities: list[float] = []
    for low, high, total, count in spans:
        value = round((total + 1.0) / (count + 2.0), 3)
        for k in (max(low, floor), high):
            if not knots or k > knots[-1]:
                knots.append(k)
                probabilities.append(max(value, probabilities[-1] if probabilities else 0.0))
    if knots[0] > floor:
        knots.insert(0, floor)
        probabilities.insert(0, probabilities[0])
    if knots[-1] < 1.0:
        knots.append(1.0)
        probabilities.append(probabilities[-1])
    return [round(k, 7) for k in knots], probabilities


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
    parser.add_argument("--points", type=int, default=12, help="knots of the curve (at most 12)")
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
    snippet = (f"calibration = {{ scores = {[float(k) for k in knots]}, "
               f"probabilities = {[float(p) for p in probabilities]} }}")
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
