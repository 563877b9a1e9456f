"""Peak resident memory of the node processing one series, for 64-, 300- and 1000-slice CTs.

For each size a fresh ``reader serve`` (results kept on disk, no destination) receives the series
with DCMTK ``storescu`` and processes it; when ``series.processed`` is logged, the node's ``VmHWM``
(peak resident set size, ``/proc/PID/status``) is read. ``idle`` is VmHWM right after start-up
(interpreter, numpy, pydicom, highdicom, onnxruntime and the loaded model); ``peak - idle`` is what
the series added. The target compares the peak with the series' pixel bytes (slices x 512 x 512 x 2).

    .venv/bin/python bench/memory.py [--sizes 64,300,1000] [--model DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

_MIB = 1024 * 1024


def main() -> None:
    """Measure each size in a fresh node, print the table, write bench/results/memory.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--sizes", default="64,300,1000")
    args = parser.parse_args()
    netns = common.enter_private_netns()
    work: Path = args.work
    info = common.machine()
    model, model_what = common.model_dir(args.model, work)
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        folder = common.synthetic_ct(size, work / "data" / f"memory-{size}", tag=f"memory-{size}")[0].parent
        node = common.start_node(work / f"memory-{int(time.time())}-{size}", model)
        with common.servers(node):
            time.sleep(1.0)  # let start-up settle before reading the idle figure
            idle_kib = common.rss_peak_kib(node.process.pid)
            common.storescu(node, folder)
            common.wait_until(lambda n=node: bool(common.node_events(n, "series.processed")
                                                  or common.node_events(n, "series.failed")),
                              900, f"{size}-slice series processed")
            peak_kib = common.rss_peak_kib(node.process.pid)
        pixel_bytes = size * 512 * 512 * 2
        peak = peak_kib * 1024
        results[str(size)] = {"pixel_bytes": pixel_bytes, "idle_peak_bytes": idle_kib * 1024,
                              "peak_bytes": peak, "peak_over_pixels": peak / pixel_bytes,
                              "added_over_pixels": (peak - idle_kib * 1024) / pixel_bytes}
        rows.append([size, pixel_bytes / _MIB, idle_kib / 1024, peak_kib / 1024, peak / pixel_bytes,
                     (peak - idle_kib * 1024) / pixel_bytes])
        print(f"{size} slices: peak {peak_kib / 1024:.0f} MiB", flush=True)
    print(f"\nmodel: {model_what}; load average {info['load_average_start'][0]:.1f}")
    common.print_table(["slices", "pixel MiB", "idle VmHWM MiB", "peak VmHWM MiB", "peak / pixels",
                        "(peak - idle) / pixels"], rows)
    common.write_json("memory", {
        "what": "VmHWM of a fresh reader serve after receiving and processing one series",
        "model": model_what, "private_netns": netns, "machine": info, "results": results,
    })


if __name__ == "__main__":
    main()
