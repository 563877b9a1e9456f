"""Peak resident memory of the node processing one series, for 64-, 300- and 1000-slice CTs.

For each size a fresh ``reader serve`` (results kept on disk, no destination) receives the series
with DCMTK ``storescu`` and processes it; when ``series.processed`` is logged, the node's ``VmHWM``
(peak resident set size, ``/proc/PID/status``) is read. ``idle`` is VmHWM right after start-up
(interpreter, numpy, pydicom, highdicom, onnxruntime and the loaded model); ``peak - idle`` is what
the series added. The target compares the peak with the series' pixel bytes (slices x 512 x 512 x 2).

    .venv/bin/python bench/memory.py [--sizes 64,300,1000] [--model DIR] [--name memory]
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

_MIB = 1024 * 1024
_SAMPLE_S = 0.005
_STAGE_EVENTS = ("series.routed", "volume.loaded", "inference.done", "results.encoded", "series.processed")


class _Sampler:
    """Samples a process's VmRSS (MiB) with wall-clock times in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.samples: list[tuple[float, float]] = []
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path(f"/proc/{self._pid}/status")
        while not self._stop.is_set():
            try:
                text = status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.time(), int(line.split()[1]) / 1024))
            self._stop.wait(_SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _stage_peaks(samples: list[tuple[float, float]], events: list[tuple[float, str]]) -> dict[str, float]:
    """The highest RSS sample (MiB) from each event to the next, keyed by the stage that follows it."""
    names = {"start": "receive+complete", "series.routed": "load_volume", "volume.loaded": "model.run",
             "inference.done": "encode", "results.encoded": "kos+write+queue", "series.processed": "after"}
    first = samples[0][0] if samples else 0.0
    bounds: list[tuple[float, str]] = [(first, "start"), *sorted(events), (float("inf"), "")]
    peaks: dict[str, float] = {}
    for (t0, name), (t1, _) in itertools.pairwise(bounds):
        inside = [rss for t, rss in samples if t0 <= t < t1]
        if inside:
            peaks[names.get(name, name)] = max(inside)
    return peaks


def main() -> None:
    """Measure each size in a fresh node, print the table, write bench/results/memory.json."""
    parser = common.parser(__doc__)
    parser.add_argument("--sizes", default="64,300,1000")
    parser.add_argument("--name", default="memory", help="result file name under bench/results")
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
            sampler = _Sampler(node.process.pid)
            common.storescu(node, folder)
            common.wait_until(lambda n=node: bool(common.node_events(n, "series.processed")
                                                  or common.node_events(n, "series.failed")),
                              900, f"{size}-slice series processed")
            peak_kib = common.rss_peak_kib(node.process.pid)
            sampler.stop()
            events = [(common.event_time(e), str(e["event"])) for e in common.node_events(node)
                      if e.get("event") in _STAGE_EVENTS]
            stages = _stage_peaks(sampler.samples, events)
        pixel_bytes = size * 512 * 512 * 2
        peak = peak_kib * 1024
        results[str(size)] = {"pixel_bytes": pixel_bytes, "idle_peak_bytes": idle_kib * 1024,
                              "peak_bytes": peak, "peak_over_pixels": peak / pixel_bytes,
                              "added_over_pixels": (peak - idle_kib * 1024) / pixel_bytes,
                              "stage_peak_rss_mib": stages}
        rows.append([size, pixel_bytes / _MIB, idle_kib / 1024, peak_kib / 1024, peak / pixel_bytes,
                     (peak - idle_kib * 1024) / pixel_bytes])
        print(f"{size} slices: peak {peak_kib / 1024:.0f} MiB; highest RSS sample per stage (MiB): "
              + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
    print(f"\nmodel: {model_what}; load average {info['load_average_start'][0]:.1f}")
    common.print_table(["slices", "pixel MiB", "idle VmHWM MiB", "peak VmHWM MiB", "peak / pixels",
                        "(peak - idle) / pixels"], rows)
    common.write_json(args.name, {
        "what": "VmHWM of a fresh reader serve after receiving and processing one series",
        "model": model_what, "private_netns": netns, "machine": info, "results": results,
    })


if __name__ == "__main__":
    main()
