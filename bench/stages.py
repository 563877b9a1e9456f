"""Where the processing time and memory of one series go, stage by stage, in one process.

Runs the node's own stages on the synthetic 300-slice CT without the network: ``load_volume``,
``ModelPackage.run`` (CPU) and ``encode_results`` + writing SEG and SR to bytes. For each stage it
prints the wall seconds, the growth of the peak resident set (``VmHWM``, reset before each stage
through ``/proc/self/clear_refs``) and the functions with the most own time (cProfile).

    .venv/bin/python bench/stages.py [--model DIR] [--slices 300] [--top 8]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from reader.inference import ModelPackage
from reader.results import encode_results
from reader.volume import load_volume


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (proc(5))


def main() -> None:
    """Profile each stage, print a table and the top functions, write bench/results/stages.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    work: Path = args.work
    info = common.machine()
    files = common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}", tag="ingest")
    model_path, model_what = common.model_dir(args.model, work)
    package = ModelPackage.load(model_path, providers=["CPUExecutionProvider"])
    state: dict[str, Any] = {}

    def encode() -> None:
        objects = encode_results(state["volume"], state["result"], result_version=1, previous_sr=None)
        for ds in (objects.seg, objects.sr):
            if ds is not None:
                ds.save_as(io.BytesIO(), enforce_file_format=True)

    steps = (("load_volume", lambda: state.__setitem__("volume", load_volume(files))),
             ("model.run", lambda: state.__setitem__("result", package.run(state["volume"]))),
             ("encode SEG+SR", encode))
    pixel_mib = args.slices * 512 * 512 * 2 / 2**20
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    tops: dict[str, list[str]] = {}
    for name, step in steps:
        _reset_peak()
        before = _status_mib("VmRSS")
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.runcall(step)
        seconds = time.perf_counter() - started
        grown = _status_mib("VmHWM") - before
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        tops[name] = [line for line in out.getvalue().splitlines() if line.strip()[:1].isdigit()]
        results[name] = {"seconds_profiled": seconds, "peak_growth_mib": grown,
                         "peak_growth_over_pixels": grown / pixel_mib, "top_own_time": tops[name]}
        rows.append([name, seconds, grown, grown / pixel_mib])
    print(f"\n{args.slices}-slice 512x512 CT, model: {model_what}; under cProfile (slower than plain); "
          f"pixel data {pixel_mib:.0f} MiB; load average {info['load_average_start'][0]:.1f}")
    common.print_table(["stage", "seconds (profiled)", "peak RSS growth MiB", "growth / pixel bytes"], rows)
    for name, lines in tops.items():
        print(f"\n{name}: top own time (ncalls tottime percall cumtime percall function)")
        print("\n".join(lines))
    common.write_json("stages", {"what": "per-stage time and peak-RSS growth, in-process, cProfile on",
                                 "slices": args.slices, "model": model_what, "machine": info,
                                 "results": results})


if __name__ == "__main__":
    main()
