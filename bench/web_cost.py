"""What the HTTP server and /metrics cost ingest: the same storescu run, with and without.

Two nodes run side by side with the same configuration (the route matches nothing, so nothing is
processed, as in ``ingest.py``): ``web-off`` with ``[web] enabled = false``, and ``web-on`` with
its HTTP server on while a Prometheus-like scraper GETs ``/metrics`` every ``--interval`` seconds
(with Prometheus' Accept header, so it gets OpenMetrics) for as long as that node is ingesting.
One synthetic 512 x 512 CT series is sent to each in turn with ``storescu`` over one association,
the order alternating every run (ABBA), ``--runs`` times; each run waits for the node to log the
series complete (``grace_seconds = 0.5``) before the next, so no completion work spills into
another run's timing. Images per second are storescu's wall time (process start to exit); the
table gives medians and the cost as ``1 - on / off``, and, less moved by the load drifting over
the run, the median of the per-run ratios (run i on / run i off, taken back to back). Beside it,
the node process's CPU time (user + system, ``/proc/PID/stat``) per image over the same run: on a
machine shared with other work, wall time moves with their load, CPU time much less.

It also times, in this process, what the metrics add to each C-STORE (``instance_received``) and
what one scrape costs (``exposition``), with the figures of the run's node.

    .venv/bin/python bench/web_cost.py [--runs 10] [--slices 300] [--interval 1.0] [--no-scrape] [--control]

``--no-scrape`` keeps the HTTP server on without scraping it (what the server alone costs);
``--control`` turns it off on both nodes (what two identical node processes differ by here: the
"web-on" row is then a second web-off node).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import timeit
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from reader.metrics import PROTOCOL_DIMSE, NodeMetrics

# What Prometheus 2.42 sends: it prefers OpenMetrics
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
CONFIG = "[completion]\ngrace_seconds = 0.5\n"
TARGET_COST = 0.05  # at most 5 % fewer images per second with the page and metrics on


class Scraper:
    """GET /metrics every ``interval`` seconds in a thread while :meth:`running`."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape(self) -> None:
        """One scrape, timed."""
        started = time.perf_counter()
        request = urllib.request.Request(self.url, headers={"Accept": PROMETHEUS_ACCEPT})
        with self._opener.open(request, timeout=10) as response:
            body = response.read()
        self.seconds.append(time.perf_counter() - started)
        self.sizes.append(len(body))

    @contextmanager
    def running(self) -> Iterator[None]:
        """Scrape at once, then every ``interval`` s, until the block ends."""
        stop = threading.Event()

        def loop() -> None:
            while True:
                self.scrape()
                if stop.wait(self.interval):
                    return

        thread = threading.Thread(target=loop, name="scraper", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(15)


def _in_process() -> dict[str, float]:
    """Microseconds per ``instance_received`` and per exposition of a registry like a node's."""
    metrics = NodeMetrics()
    metrics.watch(lambda: {"collecting": 1, "queued": 0, "loading": 0, "ready": 0, "inferring": 0,
                           "handed": 0, "finishing": 0, "sending": 0}, Path.cwd(), 1 << 29)
    metrics.model_loaded("bench", name="m", version="1", weights_sha256="0" * 64,
                         provider="CPUExecutionProvider", precision="fp32")
    calls = 200_000
    per_instance = timeit.timeit(lambda: metrics.instance_received(PROTOCOL_DIMSE, "BENCHSCU", 525_000),
                                 number=calls) / calls
    scrapes = 200
    per_scrape = timeit.timeit(lambda: metrics.exposition(PROMETHEUS_ACCEPT), number=scrapes) / scrapes
    return {"instance_received_us": per_instance * 1e6, "exposition_us": per_scrape * 1e6}


def _arguments() -> argparse.Namespace:
    parser = common.parser(__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--control", action="store_true",
                        help="both nodes with [web] off, nothing scraped: how far two identical nodes differ")
    parser.add_argument("--no-scrape", action="store_true",
                        help="the HTTP server on, but nothing scraped: what the server alone costs")
    parser.add_argument("--output", default="web-cost", help="name of the JSON file under bench/results/")
    return parser.parse_args()


def main() -> None:
    """Run the comparison, print the table, write bench/results/<output>.json."""
    args = _arguments()
    netns = common.enter_private_netns()
    work: Path = args.work
    info = common.machine()
    series = common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}", tag="ingest")
    folder = series[0].parent
    model, _ = common.model_dir(args.model, work)
    run_dir = work / f"web-cost-{int(time.time())}"
    off = common.start_node(run_dir / "web-off", model, process_series=False, config_extra=CONFIG,
                            name="web-off", web=False)
    on = common.start_node(run_dir / "web-on", model, process_series=False, config_extra=CONFIG,
                           name="web-on", web=not args.control)
    scraper = Scraper(f"http://{common.LOCALHOST}:{on.http_port}/metrics", args.interval)
    seconds: dict[str, list[float]] = {"web-off": [], "web-on": []}
    cpu_seconds: dict[str, list[float]] = {"web-off": [], "web-on": []}
    loads: list[float] = []
    with common.servers(off, on):
        for server in (off, on):  # warm-up: first association, page cache
            _send(server, folder, 1)
        sent = 1
        for run in range(args.runs):
            order = (off, on) if run % 4 in (0, 3) else (on, off)  # ABBA
            for server in order:
                if server is on and not (args.control or args.no_scrape):
                    with scraper.running():
                        took, cpu = _send(server, folder, sent + 1)
                else:
                    took, cpu = _send(server, folder, sent + 1)
                seconds[server.name].append(took)
                cpu_seconds[server.name].append(cpu)
                loads.append(os.getloadavg()[0])
                print(f"run {run + 1} {server.name}: {args.slices / took:.0f} img/s ({took:.2f} s), "
                      f"node CPU {1000 * cpu / args.slices:.2f} ms/image", flush=True)
            sent += 1
    _report(args, seconds, cpu_seconds, scraper, loads, extra=
            {"private_netns": netns, "machine": info, "in_process": _in_process()})


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _send(server: common.Server, folder: Path, nth: int) -> tuple[float, float]:
    """storescu the series; wait (untimed) until the node has found it complete for the nth time.
    Returns storescu's wall seconds and the node's CPU seconds over the same span."""
    cpu = _cpu_seconds(server.process.pid)
    took = common.storescu(server, folder)
    cpu = _cpu_seconds(server.process.pid) - cpu
    common.wait_until(lambda: len(common.node_events(server, "series.complete")) >= nth, 60,
                      f"{server.name}: series complete")
    return took, cpu


def _report(args: argparse.Namespace, seconds: dict[str, list[float]], cpu_seconds: dict[str, list[float]],
            scraper: Scraper, loads: list[float], *, extra: dict[str, Any]) -> None:
    rate = {name: args.slices / common.median(values) for name, values in seconds.items()}
    cost = 1 - rate["web-on"] / rate["web-off"]
    cpu_ms = {name: 1000 * common.median(values) / args.slices for name, values in cpu_seconds.items()}
    paired = [off / on for off, on in zip(seconds["web-off"], seconds["web-on"], strict=True)]  # rate on/off
    paired_cpu = [on / off for off, on in zip(cpu_seconds["web-off"], cpu_seconds["web-on"], strict=True)]
    rows = [[name, rate[name], min(args.slices / s for s in values), max(args.slices / s for s in values),
             cpu_ms[name]] for name, values in seconds.items()]
    print(f"\n{args.slices}-slice 512x512 CT, storescu over one association, median of {args.runs} runs "
          f"each (ABBA order); /metrics scraped every {args.interval:g} s during web-on runs; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    common.print_table(["node", "img/s (median)", "min", "max", "node CPU ms/image (median)"], rows)
    scrape_ms = 1000 * common.median(scraper.seconds) if scraper.seconds else float("nan")
    micro = extra["in_process"]
    print(f"cost: {100 * cost:.1f} % fewer images per second (target <= {100 * TARGET_COST:.0f} %), "
          f"{100 * (cpu_ms['web-on'] / cpu_ms['web-off'] - 1):.1f} % more node CPU per image; "
          f"paired: {100 * (1 - common.median(paired)):.1f} % fewer img/s (quartiles of on/off "
          f"{_quartiles(paired)}), {100 * (common.median(paired_cpu) - 1):.1f} % more CPU; "
          f"{len(scraper.seconds)} scrapes, median {scrape_ms:.1f} ms, "
          f"{common.median(scraper.sizes) if scraper.sizes else 0:.0f} bytes; "
          f"in process: {micro['instance_received_us']:.2f} us per instance, "
          f"{micro['exposition_us']:.0f} us per exposition")
    common.write_json(args.output, {
        "what": "storescu wall seconds per series into a node with [web] off, and with it on and "
                "/metrics scraped; medians; cost = 1 - on/off",
        "slices": args.slices, "runs": args.runs, "scrape_interval_s": args.interval,
        "control_both_off": args.control, "not_scraped": args.no_scrape, **extra,
        "load_average_during": loads, "seconds": seconds, "images_per_second_median": rate,
        "cost_fraction": cost, "target_cost_fraction": TARGET_COST, "met": cost <= TARGET_COST,
        "node_cpu_seconds": cpu_seconds, "node_cpu_ms_per_image_median": cpu_ms,
        "paired_rate_ratio_on_over_off": paired, "paired_cost_fraction": 1 - common.median(paired),
        "paired_cpu_ratio_on_over_off": paired_cpu,
        "scrapes": len(scraper.seconds), "scrape_seconds": scraper.seconds,
        "scrape_bytes_median": common.median(scraper.sizes) if scraper.sizes else None,
    })


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.3f}-{high:.3f}"


if __name__ == "__main__":
    main()
