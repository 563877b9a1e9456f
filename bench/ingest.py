"""Ingest throughput: DCMTK storescu -> the node, DCMTK storescp and Orthanc, side by side.

One synthetic 512 x 512 CT series is sent with ``storescu`` over one association to each target in
turn (the order rotates every run, so load from other work on the machine hits every target alike);
then ``--senders`` storescu processes send distinct series of the same size at once and the
aggregate images per second is taken from the first start to the last exit. Timings are storescu's
wall time (process start to exit: association set-up, every C-STORE, release). Medians over
``--runs`` runs. Between runs, storescp's and Orthanc's stored copies are deleted (not timed) so
every store is a first store; the node replaces its files (same cost as a first write: temporary
file, fsync, rename, fsync of the folder).

The node runs with a route nothing matches, so no processing competes with the measurement.

    .venv/bin/python bench/ingest.py [--runs 5] [--slices 300] [--senders 4] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def _clear(server: common.Server) -> None:
    """Delete what a peer stored (not timed), so the next run stores afresh."""
    if server.name == "storescp":
        shutil.rmtree(server.workdir / "out")
        (server.workdir / "out").mkdir()
    elif server.name == "orthanc":
        for study in server.rest("/studies"):
            server.rest(f"/studies/{study}", method="DELETE")


def _concurrent(server: common.Server, folders: list[Path]) -> tuple[float, list[float]]:
    """Start one storescu per folder at once; (seconds from first start to last exit, each one's)."""
    exe = shutil.which("storescu") or "storescu"
    ports = [s.port for s in (server, *server.siblings)]  # sender i -> process i mod n
    started = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aet", f"BENCH{i}", "-aec", server.aet, "-to", "30", "-ta", "30",
                               "-td", "60", "+sd", common.LOCALHOST, str(ports[i % len(ports)]), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=common.peer_env())
             for i, folder in enumerate(folders)]
    each = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        each.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu to {server.name} failed: {err.decode(errors='replace')[-1000:]}")
    return max(each), each


def _arguments() -> argparse.Namespace:
    parser = common.parser(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--targets", default="node,storescp,orthanc",
                        help="comma-separated: node, storescp, orthanc, and node variants "
                             "node-no-tune, node-no-fsync, node-no-fsync-no-tune, node-2proc")
    parser.add_argument("--node-config", default="", help="extra TOML appended to the node's config")
    parser.add_argument("--output", default="ingest", help="name of the JSON file under bench/results/")
    return parser.parse_args()


def main() -> None:
    """Run the ingest benchmark, print the tables, write bench/results/<output>.json."""
    args = _arguments()
    netns = common.enter_private_netns()
    work: Path = args.work
    info = common.machine()
    series = common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}", tag="ingest")
    folders = [series[0].parent] + [
        common.synthetic_ct(args.slices, work / "data" / f"ingest-{args.slices}-c{i}",
                            tag=f"ingest-c{i}")[0].parent for i in range(1, args.senders)]
    model, model_what = common.model_dir(args.model, work)
    run_dir = work / f"ingest-{int(time.time())}"
    wanted = args.targets.split(",")
    started: list[common.Server] = []
    try:
        for name in wanted:  # node, or a variant: node-no-tune, node-no-fsync, node-no-fsync-no-tune;
            if name.startswith("node"):  # "-2proc": two node processes, concurrent senders split over them
                variant = [f"--{v}" for v in ("no-fsync", "no-tune") if v in name]
                node = common.start_node(run_dir / name, model, process_series=False,
                                         config_extra=args.node_config, variant=variant, name=name)
                started.append(node)
                if name.endswith("-2proc"):
                    node.siblings.append(common.start_node(run_dir / f"{name}-b", model, process_series=False,
                                                           config_extra=args.node_config, variant=variant,
                                                           name=name))
        if "storescp" in wanted:
            started.append(common.start_storescp(run_dir / "storescp"))
        if "orthanc" in wanted:
            started.append(common.start_orthanc(run_dir / "orthanc"))
        for server in started:  # warm-up: first association, page cache, Orthanc's index
            common.storescu(server, folders[0])
            _clear(server)
        single: dict[str, list[float]] = {s.name: [] for s in started}
        multi: dict[str, list[float]] = {s.name: [] for s in started}
        loads: list[float] = []
        for run in range(args.runs):
            order = started[run % len(started):] + started[:run % len(started)]
            for server in order:
                seconds = common.storescu(server, folders[0])
                single[server.name].append(seconds)
                _clear(server)
                loads.append(os.getloadavg()[0])
                print(f"run {run + 1} {server.name}: {args.slices / seconds:.0f} img/s ({seconds:.2f} s)",
                      flush=True)
            if args.senders > 1:
                for server in order:
                    wall, _ = _concurrent(server, folders)
                    multi[server.name].append(wall)
                    _clear(server)
                    print(f"run {run + 1} {server.name} x{args.senders}: "
                          f"{args.slices * args.senders / wall:.0f} img/s aggregate", flush=True)
    finally:
        for server in started:
            server.stop()
    _report(args, single, multi, loads, {"private_netns": netns, "node_model": model_what, "machine": info})


def _report(args: argparse.Namespace, single: dict[str, list[float]], multi: dict[str, list[float]],
            loads: list[float], extra: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    ref = {name: args.slices / common.median(v) for name, v in single.items()}
    nan = float("nan")
    for name, seconds in single.items():
        one = args.slices / common.median(seconds)
        agg = args.slices * args.senders / common.median(multi[name]) if multi[name] else nan
        results[name] = {
            "seconds_one_association": seconds, "images_per_second_one_association": one,
            "seconds_concurrent": multi[name], "images_per_second_concurrent_aggregate": agg,
            "concurrent_over_one": agg / one,
        }
        rows.append([name, one, one / ref.get("storescp", nan), one / ref.get("orthanc", nan), agg,
                     agg / one])
    print(f"\n{args.slices}-slice 512x512 CT, storescu over one association, median of {args.runs} runs; "
          f"{args.senders} concurrent senders (distinct series); "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    common.print_table(["target", "img/s (1 assoc)", "x storescp", "x Orthanc",
                        f"img/s aggregate ({args.senders} senders)", "aggregate / single"], rows)
    common.write_json(args.output, {
        "what": "storescu wall seconds per series, one association; and N concurrent storescu",
        "slices": args.slices, "senders": args.senders, "runs": args.runs,
        "node_config_extra": args.node_config, **extra, "load_average_during": loads, "results": results,
    })


if __name__ == "__main__":
    main()
