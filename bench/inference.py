"""Inference speed of a model package per onnxruntime execution provider, in slices per second.

The input is the synthetic 300-slice 512 x 512 CT (``bench/common.py``) loaded by the node's own
``reader.volume.load_volume``; each provider runs ``ModelPackage.run`` once to warm up and then
``--repeats`` times. ``slices/s`` = slices / ``model_s`` of the ``inference.done`` event (the
sliding-window ONNX runs only: no resampling, normalisation or connected components, which are
reported beside it). A provider that cannot start here (no GPU) is reported as not run, never
silently replaced by another: the package reports which provider actually runs the graph.

    .venv/bin/python bench/inference.py [--model DIR] [--slices 300] [--repeats 3]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from structlog.testing import capture_logs

from reader.inference import ModelPackage
from reader.volume import load_volume

_VARIANTS = (
    ("CPU fp32", "CPUExecutionProvider", False),
    ("CUDA fp32", "CUDAExecutionProvider", False),
    ("CUDA fp16", "CUDAExecutionProvider", True),
    ("TensorRT fp32", "TensorrtExecutionProvider", False),
    ("TensorRT fp16", "TensorrtExecutionProvider", True),
)


def main() -> None:
    """Run every provider variant, print the table, write bench/results/inference.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work: Path = args.work
    info = common.machine()
    files = common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}", tag="ingest")
    model_path, model_what = common.model_dir(args.model, work)
    volume = load_volume(files)
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for label, provider, fp16 in _VARIANTS:
        with capture_logs() as logs:
            package = ModelPackage.load(model_path, providers=[provider], fp16=fp16)
        fp16_used = not any(e.get("event") == "model.fp16_skipped" for e in logs)
        if package.provider != provider or (fp16 and not fp16_used):
            why = f"runs on {package.provider}" if package.provider != provider else "no fp16 graph"
            results[label] = {"run": False, "why": why}
            rows.append([label, "not run", why, "", "", ""])
            continue
        runs = []
        for i in range(args.repeats + 1):
            with capture_logs() as logs:
                started = time.perf_counter()
                package.run(volume)
                wall = time.perf_counter() - started
            done = next(e for e in logs if e.get("event") == "inference.done")
            if i > 0:  # the first run warms the session up
                runs.append({"model_s": done["model_s"], "preprocess_s": done["preprocess_s"],
                             "postprocess_s": done["postprocess_s"], "run_s": wall})
        model_s = common.median([r["model_s"] for r in runs])
        results[label] = {"run": True, "runs": runs, "slices_per_second": args.slices / model_s}
        rows.append([label, args.slices / model_s, model_s,
                     common.median([r["preprocess_s"] for r in runs]),
                     common.median([r["postprocess_s"] for r in runs]),
                     common.median([r["run_s"] for r in runs])])
    cpu = results.get("CPU fp32", {}).get("slices_per_second")
    best = max((r["slices_per_second"] for r in results.values() if r.get("run")), default=None)
    print(f"\n{args.slices}-slice 512x512 CT, model: {model_what}; median of {args.repeats} runs after one "
          f"warm-up; load average {info['load_average_start'][0]:.1f}")
    common.print_table(["provider", "slices/s", "model s", "preprocess s", "postprocess s", "run s"], rows)
    common.write_json("inference", {
        "what": "ModelPackage.run on a loaded volume; slices/s = slices / model_s (ONNX sliding window)",
        "slices": args.slices, "model": model_what, "machine": info, "results": results,
        "best_over_cpu": (best / cpu) if best and cpu else None,
    })


if __name__ == "__main__":
    main()
