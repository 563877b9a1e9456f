"""Where the processing time and memory of one series go, stage by stage, in one process.

Runs the node's own stages on the synthetic CT (default 300 slices) without the network:
``load_volume``, ``ModelPackage.run`` (CPU) split into onnxruntime's own time (``onnx_s`` of the
``inference.done`` event) and everything around it (resampling, stitching, postprocessing), and
``encode_results`` + ``encode_kos`` + writing SEG, SR and KOS to bytes. The whole series is
processed ``--repeat`` times (a fresh volume each time, as the node does per job); figures are
medians. The first repetition also pays one-time costs (highdicom loading its standard tables),
which a running node pays once.

For each stage it prints the wall seconds, the growth of the peak resident set (``VmHWM``, reset
before each stage through ``/proc/self/clear_refs``) over the RSS before the series, and with
``--profile`` (cProfile on, so slower) the functions with the most own time.

    .venv/bin/python bench/stages.py [--model DIR] [--slices 300] [--repeat 3] [--profile] [--top 8]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import onnxruntime

from reader.flag import FlagDecision, FlagState
from reader.inference import ModelPackage
from reader.results import encode_results
from reader.results.kos import encode_kos
from reader.volume import load_volume

STAGES = ("load_volume", "model.run", "model.run without onnx", "encode SEG+SR+KOS", "all but onnx")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (proc(5))


def _save(ds: Any) -> None:
    ds.save_as(io.BytesIO(), enforce_file_format=True)


def _time_onnxruntime(spent: list[float]) -> None:
    """Make every ``InferenceSession.run`` append its seconds to ``spent`` (benchmark only).

    The same figure as the ``onnx_s`` of ``inference.done``, measured from outside so that older
    versions of the node, without that field, can be compared.
    """
    original = onnxruntime.InferenceSession.run

    def timed(self: onnxruntime.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    onnxruntime.InferenceSession.run = timed


def _one_series(files: list[Path], package: ModelPackage, profile: bool, profiles: dict[str, pstats.Stats],
                spent: list[float]) -> dict[str, dict[str, float]]:
    """Process the series once; seconds and peak growth (MiB over the RSS before the series) per stage."""
    state: dict[str, Any] = {}

    def encode() -> None:
        objects = encode_results(state["volume"], state["result"], result_version=1, previous_sr=None)
        result = state["result"]
        datasets = list(objects.datasets)
        if result.findings:
            decision = FlagDecision(FlagState.FLAGGED, "bench", (result.findings[0].number,))
            datasets.append(encode_kos(state["volume"], result, seg=objects.seg, sr=objects.sr,
                                       result_version=1, decision=decision))
        for ds in datasets:
            _save(ds)

    def run() -> None:
        spent.clear()
        state["result"] = package.run(state["volume"])
        state["onnx_s"] = sum(spent)

    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("load_volume", lambda: state.__setitem__("volume", load_volume(files))),
        ("model.run", run),
        ("encode SEG+SR+KOS", encode),
    )
    base = _status_mib("VmRSS")
    out: dict[str, dict[str, float]] = {}
    peak_all = 0.0
    for name, step in steps:
        _reset_peak()
        started = time.perf_counter()
        if profile:
            prof = cProfile.Profile()
            prof.runcall(step)
            if name in profiles:
                profiles[name].add(prof)
            else:
                profiles[name] = pstats.Stats(prof)
        else:
            step()
        seconds = time.perf_counter() - started
        grown = _status_mib("VmHWM") - base
        peak_all = max(peak_all, grown)
        out[name] = {"seconds": seconds, "peak_growth_mib": grown}
    onnx = state["onnx_s"]
    out["model.run without onnx"] = {"seconds": out["model.run"]["seconds"] - onnx,
                                     "peak_growth_mib": out["model.run"]["peak_growth_mib"]}
    out["all but onnx"] = {"seconds": sum(out[n]["seconds"] for n, _ in steps) - onnx,
                           "peak_growth_mib": peak_all}
    out["onnx"] = {"seconds": onnx, "peak_growth_mib": float("nan")}
    state.clear()
    return out


def main() -> None:
    """Process the series ``--repeat`` times; print medians and profiles; write results/<name>.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="run each stage under cProfile")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--name", default="stages", help="result file name under bench/results")
    args = parser.parse_args()
    work: Path = args.work
    info = common.machine()
    files = common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}", tag="ingest")
    model_path, model_what = common.model_dir(args.model, work)
    package = ModelPackage.load(model_path, providers=["CPUExecutionProvider"])
    profiles: dict[str, pstats.Stats] = {}
    spent: list[float] = []
    _time_onnxruntime(spent)
    runs = [_one_series(files, package, args.profile, profiles, spent) for _ in range(args.repeat)]
    pixel_mib = args.slices * 512 * 512 * 2 / 2**20
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for name in (*STAGES, "onnx"):
        seconds = [r[name]["seconds"] for r in runs]
        grown = [r[name]["peak_growth_mib"] for r in runs]
        results[name] = {"seconds": seconds, "seconds_median": statistics.median(seconds),
                         "peak_growth_mib": grown, "peak_growth_median_mib": statistics.median(grown),
                         "peak_growth_over_pixels": statistics.median(grown) / pixel_mib}
        rows.append([name, statistics.median(seconds), min(seconds), max(seconds), statistics.median(grown),
                     statistics.median(grown) / pixel_mib])
    tops: dict[str, list[str]] = {}
    for name, stats in profiles.items():
        text = io.StringIO()
        stats.stream = text  # type: ignore[attr-defined]  # pstats prints to its stream attribute
        stats.sort_stats("tottime").print_stats(args.top)
        tops[name] = [line for line in text.getvalue().splitlines() if line.strip()[:1].isdigit()]
    load = os.getloadavg()
    print(f"\n{args.slices}-slice 512x512 CT, model: {model_what}; {args.repeat} runs, medians"
          f"{' under cProfile (slower than plain)' if args.profile else ''}; pixel data {pixel_mib:.0f} MiB; "
          f"load average {info['load_average_start'][0]:.1f} at start, {load[0]:.1f} at end")
    headers = ["stage", "seconds", "min", "max", "peak RSS growth MiB", "growth / pixel bytes"]
    common.print_table(headers, rows)
    print("peak RSS growth: over the RSS before the series was loaded (the volume stays alive to the end)")
    for name, lines in tops.items():
        print(f"\n{name}: top own time over all runs (ncalls tottime percall cumtime percall function)")
        print("\n".join(lines))
    common.write_json(args.name, {"what": "per-stage time and peak-RSS growth, in-process, medians of runs",
                                  "profiled": args.profile, "slices": args.slices, "model": model_what,
                                  "machine": info, "results": results, "top_own_time": tops})


if __name__ == "__main__":
    main()
