"""Scaling out (issue 18): several receivers, several workers and the shared queue on PostgreSQL.

Four parts, one run, side by side (``--parts``):

1. **ingest**: 4 and 8 concurrent ``storescu`` senders (one distinct study each) into 1, 2 and 4
   ``reader serve --role receiver`` processes sharing one port (``[cluster] reuse_port = true``: the
   kernel spreads the associations over them), one PostgreSQL and one shared storage folder per
   group; against DCMTK ``storescp`` (one association at a time, as ``bench/ingest.py``), ``storescp
   --fork`` (a process per association), Orthanc, and today's single node (``--role all`` on its
   SQLite state) for reference. Every target is started once and stays up; the
   order of the targets rotates every run. Aggregate img/s = images of all senders / wall time from
   the first start to the last storescu's exit. CPU = user + system time of the target's processes
   (the receivers; PostgreSQL's backends separately) over the run, from ``/proc/PID/stat``.
2. **jobs**: jobs per minute with 1 and 2 ``--role worker`` processes (the fixture model of
   ``tests/reliability.write_fixture_model``, CPU): N small series written to the shared storage and
   queued with ``JobStore.enqueue_if_changed`` into a fresh database once the workers have started;
   throughput = N / (first series' "started" to the last one's "encoded", the timeline the workers
   record in each series' state).
3. **claim**: completion-to-claim latency against the queue length: N routine jobs queued (1, 100,
   10 000), then one STAT job enqueued; a poller does what a worker's loader does (``pending_jobs``
   of the best 16 every ``poll_interval``, then ``claim_job`` of the first) and the latency is from
   the start of ``enqueue_if_changed`` to ``claim_job`` returning True; the same with the backlog
   leased by another worker (the query must skip it), and with a real ``--role worker`` (latency to
   the ``started`` time it records when its routing of the job begins). PostgreSQL and SQLite.
4. **arrival**: what ``JobStore.record_arrival`` (one transaction per stored instance, in every
   receiver of a PostgreSQL cluster) costs the calling process, wall and CPU time per call.

PostgreSQL: the Debian server (``/usr/lib/postgresql/*/bin``), a cluster made by the bench in its
scratch folder (``initdb``, ``pg_ctl``; as root it runs as the ``postgres`` user), default settings
(fsync and synchronous commit on), reached through pg8000 on 127.0.0.1 (not ``tests/postgres.py``'s
server: it turns fsync and synchronous commit off, which tests may and a benchmark may not).

    .venv/bin/python bench/cluster.py [--runs 3] [--slices 200] [--senders 4,8] [--receivers 1,2,4]
                                      [--parts ingest,jobs,claim,arrival] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# --- PostgreSQL ------------------------------------------------------------------------------------


@dataclass
class Postgres:
    """A PostgreSQL server the bench started in ``folder``, on ``127.0.0.1:port``, trust auth."""

    folder: Path
    port: int
    bindir: Path
    user: str | None  # the OS user running the server (``postgres`` when the bench runs as root)
    pid: int = 0

    def url(self, database: str) -> str:
        """The ``[cluster] database`` URL of ``database``."""
        return f"postgresql://bench@{common.LOCALHOST}:{self.port}/{database}"

    def create(self, database: str) -> str:
        """Create ``database`` (fresh); returns its URL."""
        import pg8000.native  # noqa: PLC0415 - the cluster's driver, imported where used

        conn = pg8000.native.Connection("bench", host=common.LOCALHOST, port=self.port, database="postgres")
        try:
            conn.run(f'DROP DATABASE IF EXISTS "{database}"')
            conn.run(f'CREATE DATABASE "{database}"')
        finally:
            conn.close()
        return self.url(database)

    def backend_pids(self) -> list[int]:
        """The server's processes (postmaster and its children)."""
        return with_children(self.pid) if self.pid else []

    def version(self) -> str:
        """``postgres --version``."""
        return subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True,
                              check=False).stdout.strip()

    def stop(self) -> None:
        """``pg_ctl stop -m fast``."""
        subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w",
                        "stop"], user=self.user, capture_output=True, check=False, timeout=60)


def start_postgres(folder: Path, settings: Sequence[str] = ()) -> Postgres:
    """``initdb`` and ``pg_ctl start`` in ``folder`` (as the ``postgres`` user when root);
    ``settings``: extra ``name=value`` server settings (default: none, PostgreSQL's defaults)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not bins:
        raise RuntimeError("PostgreSQL server not installed (Debian package postgresql)")
    bindir = Path(bins[-1])
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        owner = pwd.getpwnam(user)
    folder.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        for parent in folder.parents:  # the server must reach its folder
            if parent == Path("/"):
                break
            with contextlib.suppress(OSError):
                parent.chmod(parent.stat().st_mode | 0o011)
    data = folder / "data"
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "bench", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], user=user, capture_output=True, check=True, timeout=120)
    port = common.free_port()
    options = f"-c listen_addresses={common.LOCALHOST} -p {port} -k {folder} -c max_connections=200"
    options += "".join(f" -c {setting}" for setting in settings)
    subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
                    "-w", "start"], user=user, capture_output=True, check=True, timeout=120)
    server = Postgres(folder, port, bindir, user)
    server.pid = int((data / "postmaster.pid").read_text().split()[0])
    return server


# --- processes and their CPU -------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes (those whose parent it is in ``/proc/PID/stat``)."""
    found = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` so far, with their children's that they waited for
    (``storescp --fork``); gone ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
    return total / _TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / _TICK, total / _TICK


def wait_quiet(pids: Sequence[int], *, idle_cpu_s: float = 0.01, window_s: float = 0.5,
               timeout_s: float = 30.0) -> None:
    """Wait (untimed) until ``pids`` use less than ``idle_cpu_s`` CPU over ``window_s``: completion and
    other work a run left behind must not spill into the next measurement."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = cpu_seconds(pids)
        if now - last < idle_cpu_s:
            return
        last = now


@dataclass
class Role:
    """One ``reader serve --role ...`` process, its log in ``folder / "node.log"``."""

    name: str
    process: subprocess.Popen[bytes]
    folder: Path

    @property
    def server(self) -> common.Server:
        """The process as ``bench.common`` handles a started server (no AE title or port of its own)."""
        return common.Server(self.name, self.process, "", 0, self.folder)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Its JSON log events so far (only ``name`` when given)."""
        return common.node_events(self.server, name)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s (``common.Server.stop``)."""
        self.server.stop()


def start_role(folder: Path, config: str, role: str, name: str, storage: Path, *, port: int = 0,
               extra: Sequence[str] = ()) -> Role:
    """Start ``reader serve --role ROLE --name NAME`` with ``config`` (TOML) on the shared storage."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reader.toml").write_text(config)
    cmd = [sys.executable, "-m", "reader.cli", "serve", "--config", str(folder / "reader.toml"),
           "--role", role, "--name", name, "--data-dir", str(storage), "--bind", common.LOCALHOST,
           "--ae-title", "SECONDREADER", *extra]
    if port:
        cmd += ["--port", str(port)]
    log = (folder / "node.log").open("ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.REPO)
    return Role(name, process, folder)


def wait_started(roles: Sequence[Role], timeout_s: float = 180.0) -> None:
    """Wait until every role logged ``node.started``."""
    def ready() -> bool:
        for role in roles:
            if role.process.poll() is not None:
                tail = (role.folder / "node.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{role.name} exited with {role.process.returncode}:\n{tail}")
        return all(role.events("node.started") for role in roles)

    common.wait_until(ready, timeout_s, "node.started of " + ", ".join(r.name for r in roles))


def cluster_toml(database: str, storage: Path, *, reuse_port: bool = False, body: str = "") -> str:
    """A node config of one cluster process: ``body`` plus ``[cluster]`` and no HTTP server."""
    return (f"{body}\n[web]\nenabled = false\n\n[cluster]\ndatabase = {json.dumps(database)}\n"
            f"storage = {json.dumps(str(storage))}\nreuse_port = {str(reuse_port).lower()}\n")


# --- part 1: aggregate ingest ----------------------------------------------------------------------


@dataclass
class Target:
    """Something the senders send to: its port, AE title, processes (for CPU) and how to clear it."""

    name: str
    port: int
    aet: str
    pids: Callable[[], list[int]]
    clear: Callable[[], None] = lambda: None
    db_pids: Callable[[], list[int]] = list
    stop: Callable[[], None] = lambda: None
    roles: list[Role] = field(default_factory=list)


def _send_all(target: Target, folders: Sequence[Path]) -> tuple[float, list[float]]:
    """One storescu per folder, all started at once; (first start to last exit, each one's exit)."""
    exe = shutil.which("storescu") or "storescu"
    started = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aet", f"BENCH{i}", "-aec", target.aet, "-to", "60", "-ta", "60",
                               "-td", "120", "+sd", common.LOCALHOST, str(target.port), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=common.peer_env())
             for i, folder in enumerate(folders)]
    each = []
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        each.append(time.perf_counter() - started)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-800:])
    if errors:
        raise RuntimeError(f"storescu to {target.name} failed: {errors[0]}")
    return max(each), each


def _no_processing(model: Path) -> str:
    """The model and a CT route whose series never complete (as bench/ingest.py: no processing)."""
    return (f'[models.bench]\npath = "{model}"\n\n[[routes]]\nname = "bench"\nmodel = "bench"\n'
            f'modalities = ["CT"]\nmin_instances = 1000000\n')


def _receivers(pg: Postgres, run_dir: Path, count: int, model: Path) -> Target:
    """``count`` receivers on one port (SO_REUSEPORT), one database and one storage of their own."""
    storage = run_dir / f"receivers-{count}" / "storage"
    database = pg.create(f"ingest_r{count}")
    port = common.free_port()
    config = cluster_toml(database, storage, reuse_port=True, body=_no_processing(model))
    roles = [start_role(run_dir / f"receivers-{count}" / f"r{k}", config, "receiver", f"recv{count}-{k}",
                        storage, port=port) for k in range(count)]
    wait_started(roles)

    def stop() -> None:
        for role in roles:
            role.stop()
    return Target(f"{count} receiver{'s' if count > 1 else ''}", port, "SECONDREADER",
                  lambda: [r.process.pid for r in roles], db_pids=pg.backend_pids, stop=stop, roles=roles)


def _single_node(run_dir: Path, model: Path) -> Target:
    """Today's single node for reference: ``--role all`` on its data dir's SQLite, no cluster."""
    folder = run_dir / "node-all"
    storage = folder / "data"
    body = _no_processing(model) + "\n[web]\nenabled = false\n"
    port = common.free_port()
    role = start_role(folder, body, "all", "node-all", storage, port=port)
    wait_started([role])
    return Target("node --role all (SQLite)", port, "SECONDREADER", lambda: [role.process.pid],
                  stop=role.stop, roles=[role])


def _storescp(run_dir: Path, *, fork: bool) -> Target:
    server = common.start_storescp(run_dir / ("storescp-fork" if fork else "storescp"), fork=fork)
    out = server.workdir / "out"

    def clear() -> None:
        shutil.rmtree(out)
        out.mkdir()

    # with --fork: the parent and its children (one per association)
    return Target("storescp --fork" if fork else "storescp", server.port, server.aet,
                  partial(with_children, server.process.pid), clear, stop=server.stop)


def _orthanc(run_dir: Path) -> Target:
    server = common.start_orthanc(run_dir / "orthanc")

    def clear() -> None:
        for study in server.rest("/studies"):
            server.rest(f"/studies/{study}", method="DELETE")

    return Target("Orthanc", server.port, server.aet, lambda: [server.process.pid], clear, stop=server.stop)


def part_ingest(args: argparse.Namespace, pg: Postgres, run_dir: Path, model: Path) -> dict[str, Any]:
    """Part 1: aggregate ingest of 4 and 8 senders into receivers, storescp and Orthanc."""
    most = max(args.senders)
    folders = [common.synthetic_ct(args.slices, args.work / "data" / f"cluster-{args.slices}-s{i}",
                                   tag=f"cluster-s{i}")[0].parent for i in range(most)]
    targets: list[Target] = []
    try:
        for count in args.receivers:
            targets.append(_receivers(pg, run_dir, count, model))
        if args.single_node:
            targets.append(_single_node(run_dir, model))
        targets.append(_storescp(run_dir, fork=False))
        targets.append(_storescp(run_dir, fork=True))
        targets.append(_orthanc(run_dir))
        idle = {}
        for target in targets:  # warm-up (page cache, first association, Orthanc's index); idle CPU
            _send_all(target, folders[:2])
            wait_quiet(target.pids() + target.db_pids())
            target.clear()
            before = cpu_seconds(target.pids())
            time.sleep(2.0)
            idle[target.name] = (cpu_seconds(target.pids()) - before) / 2.0
        rows: list[dict[str, Any]] = []
        for run in range(args.runs):
            for senders in args.senders:
                shift = run % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    pids = target.pids()
                    db = target.db_pids()
                    accepted0 = [len(r.events("association.accepted")) for r in target.roles]
                    cpu0, db0 = cpu_seconds(pids), cpu_seconds(db)
                    load = os.getloadavg()[0]
                    busy0, total0 = machine_busy()
                    wall, each = _send_all(target, folders[:senders])
                    busy1, total1 = machine_busy()
                    cpu1, db1 = cpu_seconds(target.pids()), cpu_seconds(db)
                    spread = [cpu_seconds([p]) for p in pids] if target.roles else []
                    accepted = [len(r.events("association.accepted")) - n  # the kernel's spread
                                for r, n in zip(target.roles, accepted0, strict=True)]
                    images = senders * args.slices
                    row = {"run": run + 1, "target": target.name, "senders": senders, "images": images,
                           "wall_s": wall, "sender_exits_s": each, "img_per_s": images / wall,
                           "cpu_s": cpu1 - cpu0, "db_cpu_s": db1 - db0, "load_average": load,
                           "machine_busy_cores": (os.cpu_count() or 1) * (busy1 - busy0) / (total1 - total0),
                           "receiver_cpu_total_s": spread, "associations_per_receiver": accepted}
                    rows.append(row)
                    print(f"run {run + 1} {senders} senders -> {target.name}: {images / wall:.0f} img/s, "
                          f"CPU {row['cpu_s']:.1f} s (+db {row['db_cpu_s']:.1f} s), machine "
                          f"{row['machine_busy_cores']:.2f} cores busy, load {load:.1f}"
                          + (f", associations per receiver {accepted}" if accepted else ""), flush=True)
                    wait_quiet(target.pids() + target.db_pids())  # completion, untimed
                    target.clear()
        for target in targets:
            for role in target.roles:
                bad = [e for e in role.events() if e.get("level") in ("error", "critical")]
                if bad:
                    print(f"warning: {role.name} logged {len(bad)} errors, first: {bad[0]}", file=sys.stderr)
    finally:
        for target in targets:
            target.stop()
    return {"rows": rows, "idle_cpu_cores": idle, "slices": args.slices, "senders": args.senders,
            "receivers": args.receivers, "runs": args.runs}


def table_ingest(result: dict[str, Any]) -> list[list[Any]]:
    """Medians per (target, senders): img/s, x storescp, CPU."""
    rows = result["rows"]
    names = list(dict.fromkeys(r["target"] for r in rows))
    out: list[list[Any]] = []
    for senders in result["senders"]:
        ref = common.median([r["img_per_s"] for r in rows
                             if r["target"] == "storescp" and r["senders"] == senders])
        for name in names:
            mine = [r for r in rows if r["target"] == name and r["senders"] == senders]
            if not mine:
                continue
            rate = common.median([r["img_per_s"] for r in mine])
            cores = common.median([r["cpu_s"] / r["wall_s"] for r in mine])
            ms_img = common.median([1000 * r["cpu_s"] / r["images"] for r in mine])
            db_ms = (common.median([1000 * r["db_cpu_s"] / r["images"] for r in mine])
                     if mine[0]["db_cpu_s"] else "")
            busy = (common.median([r["machine_busy_cores"] for r in mine])
                    if "machine_busy_cores" in mine[0] else "")
            out.append([senders, name, rate, f"{min(r['img_per_s'] for r in mine):.0f}-"
                        f"{max(r['img_per_s'] for r in mine):.0f}", rate / ref, cores, ms_img, db_ms, busy])
    return out


INGEST_HEADERS = ["senders", "target", "img/s aggregate (median)", "range", "x storescp",
                  "target CPU (cores busy)", "target CPU ms/image", "PostgreSQL CPU ms/image",
                  "machine CPU (cores busy)"]


# --- part 2: jobs per minute ------------------------------------------------------------------------


def _store_series(storage: Path, studies: Sequence[Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Write the studies' files into the shared storage as a receiver does; (study, series, SOP UIDs)."""
    import pydicom  # noqa: PLC0415 - imported after the netns re-exec

    from reader.spool import Spool  # noqa: PLC0415

    spool = Spool(storage)
    out = []
    for study in studies:
        sops = []
        for path in study.files:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            spool.store_instance(study.study_uid, study.series_uid, sop, path.read_bytes())
            sops.append(sop)
        out.append((study.study_uid, study.series_uid, tuple(sops)))
    return out


def _all_done(store: Any, count: int) -> bool:
    """Whether ``count`` series have an outcome (none is still queued): one indexed count."""
    import sqlalchemy as sa  # noqa: PLC0415

    with store.database.transaction(write=False) as conn:
        done = conn.execute(sa.text("SELECT count(*) FROM series WHERE status <> 'queued'")).scalar()
    return int(done or 0) >= count


def part_jobs(args: argparse.Namespace, pg: Postgres, run_dir: Path) -> dict[str, Any]:
    """Part 2: N small series queued at once, processed by 1 and 2 workers."""
    from reader.jobs import JobStore  # noqa: PLC0415
    from reader.spool import Spool  # noqa: PLC0415
    from reader.state import Database  # noqa: PLC0415
    from tests import reliability  # noqa: PLC0415

    model = reliability.write_fixture_model(run_dir / "fixture-model")
    rows: list[dict[str, Any]] = []
    order = [w for run in range(args.job_runs)  # 1, 2, 2, 1, ...: neither count always goes first
             for w in (args.workers if run % 2 == 0 else args.workers[::-1])]
    for k, count in enumerate(order):
        name = f"jobs-w{count}-{k}"
        folder = run_dir / name
        storage = folder / "storage"
        database = pg.create(name.replace("-", "_"))
        studies = [reliability.write_study(folder / "src" / f"s{i}", args.job_slices, rows=args.job_size,
                                           columns=args.job_size) for i in range(args.job_series)]
        config = cluster_toml(database, storage, body=reliability.serve_config(model))
        workers = [start_role(folder / f"w{i}", config, "worker", f"{name}-w{i}", storage,
                              extra=["--device", "cpu"]) for i in range(count)]
        try:
            wait_started(workers)
            load = os.getloadavg()[0]
            series = _store_series(storage, studies)
            db = Database(database)
            try:
                reader_store = JobStore(Spool(storage), database=db, owner="bench-completion")
                t0 = time.time()
                cpu0, db0 = cpu_seconds([w.process.pid for w in workers]), cpu_seconds(pg.backend_pids())
                for study_uid, series_uid, sops in series:  # as a receiver's completion does
                    reader_store.enqueue_if_changed(study_uid, series_uid, sops)

                common.wait_until(partial(_all_done, reader_store, len(studies)), 600,
                                  f"{len(studies)} series processed by {count} workers")
                t1 = time.time()
                cpu1, db1 = cpu_seconds([w.process.pid for w in workers]), cpu_seconds(pg.backend_pids())
                states = reader_store.series_states()
            finally:
                db.close()
            statuses = [str(s.status) for s in states.values()]
            starts = [s.timeline["started"] for s in states.values()
                      if s.timeline and "started" in s.timeline]
            ends = [s.timeline.get("encoded", s.updated_at) if s.timeline else s.updated_at
                    for s in states.values()]
            span = max(ends) - min(starts)
            per_worker = {w.name: len(w.events("series.processed")) for w in workers}
            stages = {f"{a}->{b}": common.median([st.timeline[b] - st.timeline[a] for st in states.values()
                                                   if st.timeline and a in st.timeline and b in st.timeline])
                      for a, b in (("complete", "started"), ("started", "routed"), ("routed", "loaded"),
                                   ("loaded", "inference_started"), ("inference_started", "inferred"),
                                   ("inferred", "encoded"), ("started", "encoded"))}
            row = {"workers": count, "series": len(studies), "slices": args.job_slices,
                   "statuses": {st: statuses.count(st) for st in set(statuses)},
                   "first_start_to_last_done_s": span, "enqueue_to_last_done_s": max(ends) - t0,
                   "jobs_per_minute": 60 * len(studies) / span, "per_worker": per_worker,
                   "stage_s_median": stages,
                   "worker_cpu_s": cpu1 - cpu0, "db_cpu_s": db1 - db0, "cpu_window_s": t1 - t0,
                   "load_average": load}
            rows.append(row)
            print(f"{count} worker(s): {row['jobs_per_minute']:.0f} jobs/min ({span:.1f} s for "
                  f"{len(studies)} series; {row['statuses']}; per worker {per_worker}), load {load:.1f}",
                  flush=True)
        finally:
            for worker in workers:
                worker.stop()
    return {"rows": rows, "model": "tests/reliability.write_fixture_model (pointwise sigmoid, 8 mm grid, "
            "16x64x64 patches)", "series": args.job_series, "slices": args.job_slices, "size": args.job_size}


def table_jobs(result: dict[str, Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for count in sorted({r["workers"] for r in result["rows"]}):
        mine = [r for r in result["rows"] if r["workers"] == count]
        out.append([count, len(mine), common.median([r["jobs_per_minute"] for r in mine]),
                    common.median([r["first_start_to_last_done_s"] for r in mine]),
                    common.median([r["worker_cpu_s"] / r["cpu_window_s"] for r in mine]),
                    common.median([1000 * r["db_cpu_s"] / r["series"] for r in mine])])
    return out


JOBS_HEADERS = ["workers", "runs", "jobs/min (median)", "first start -> last done s", "workers' CPU (cores)",
                "PostgreSQL CPU ms/job"]


# --- part 3: completion-to-claim latency ------------------------------------------------------------


STAT = 1  # reader.node.PRIORITY_STAT: above routine work (0)
HOLDER = "bench-holder"  # the owner of "held" backlog: another worker's unexpired leases


def _fill(store: Any, count: int, start: int, *, held: bool) -> None:
    """Queue ``count`` routine jobs (series ``start`` .. ``start + count``) in batched transactions:
    the rows ``JobStore.enqueue_if_changed`` writes for a new series (its ``series`` row QUEUED and
    its ``jobs`` row); ``held``: leased for a day by another owner, as by a busy worker."""
    from reader import jobs as jobs_module  # noqa: PLC0415 - imported after the netns re-exec
    from reader.state import schema  # noqa: PLC0415

    now = time.time()
    batch = 1000
    for first in range(start, start + count, batch):
        series_rows, job_rows = [], []
        for i in range(first, min(start + count, first + batch)):
            study, series = f"2.25.{1000 + i}", f"2.25.{900000000 + i}"
            instances = tuple(f"2.25.{900000000 + i}.{k}" for k in range(16))
            job = jobs_module.ProcessJob(study, series, 1, instances, 0, created_at=now + i * 1e-6)
            state = jobs_module.SeriesState(study, series, 1, instances, jobs_module.SeriesStatus.QUEUED,
                                            updated_at=now)
            series_rows.append(jobs_module._series_row(state))
            row = jobs_module._job_row(job)
            if held:
                row.update(claimed_by=HOLDER, lease_until=now + 86400)
            job_rows.append(row)

        def work(conn: Any, s: list[dict[str, Any]] = series_rows,
                 j: list[dict[str, Any]] = job_rows) -> None:
            conn.execute(schema.series.insert(), s)
            conn.execute(schema.jobs.insert(), j)

        store.database.run(work)


def _summary(length: int, latencies: list[float], **extra: Any) -> dict[str, Any]:
    return {"queued": length, "latency_ms": latencies, "p50_ms": common.percentile(latencies, 50),
            "p95_ms": common.percentile(latencies, 95), "max_ms": max(latencies), **extra}


def _poller_latencies(url: str, storage: Path, queue_lengths: Sequence[int], repeats: int, poll_s: float,
                      *, held: bool) -> list[dict[str, Any]]:
    """In process: a poller doing a worker loader's queries; STAT enqueue -> ``claim_job`` True."""
    from reader.jobs import JobStore, SeriesStatus  # noqa: PLC0415
    from reader.spool import Spool  # noqa: PLC0415
    from reader.state import Database  # noqa: PLC0415

    spool = Spool(storage)
    enq_db, work_db = Database(url), Database(url)
    completion = JobStore(spool, database=enq_db, owner="bench-receiver")
    worker = JobStore(spool, database=work_db, owner="bench-worker")
    out = []
    queued = 0
    phase = random.Random(1)
    try:
        for length in queue_lengths:
            _fill(completion, length - queued, queued, held=held)
            queued = length
            if len(worker.pending_jobs(limit=16)) != (0 if held else min(16, length)):
                raise RuntimeError("the filler jobs are not what the worker's query sees")
            latencies, enqueue_ms, poll_ms, claim_ms = [], [], [], []
            for rep in range(repeats + 1):  # the first is a warm-up
                target = f"2.25.{uuid.uuid4().int}"
                claimed_at: list[float] = []
                stop = threading.Event()

                def poller(target: str = target, claimed_at: list[float] = claimed_at,
                           stop: threading.Event = stop, poll_ms: list[float] = poll_ms,
                           claim_ms: list[float] = claim_ms) -> None:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        best = worker.pending_jobs(limit=16)
                        t1 = time.perf_counter()
                        poll_ms.append(1000 * (t1 - t0))
                        if best and best[0].series_uid == target and worker.claim_job(best[0], 60.0):
                            claimed_at.append(time.perf_counter())
                            claim_ms.append(1000 * (claimed_at[-1] - t1))
                            return
                        stop.wait(poll_s)

                thread = threading.Thread(target=poller, daemon=True)
                thread.start()
                time.sleep(poll_s * (1 + phase.random()))  # any phase of the poller's cycle
                t_enqueue = time.perf_counter()
                job = completion.enqueue_if_changed(target, target, (f"{target}.1",), priority=STAT)
                enqueue_ms.append(1000 * (time.perf_counter() - t_enqueue))
                thread.join(30)
                stop.set()
                if not claimed_at or job is None:
                    raise RuntimeError(f"STAT job not claimed within 30 s at {length} queued")
                if rep > 0:
                    latencies.append(1000 * (claimed_at[0] - t_enqueue))
                worker.finish_job(job, SeriesStatus.SKIPPED, "bench")
            out.append(_summary(length, latencies, enqueue_ms_median=common.median(enqueue_ms[1:]),
                                poll_query_ms_median=common.median(poll_ms),
                                poll_query_ms_p95=common.percentile(poll_ms, 95),
                                claim_ms_median=common.median(claim_ms)))
            print(f"  {length} queued ({'held' if held else 'free'}): p50 {out[-1]['p50_ms']:.1f} ms, p95 "
                  f"{out[-1]['p95_ms']:.1f} ms (poll query {out[-1]['poll_query_ms_median']:.1f} ms)",
                  flush=True)
    finally:
        enq_db.close()
        work_db.close()
    return out


def _worker_latencies(url: str, folder: Path, queue_lengths: Sequence[int], repeats: int,
                      poll_s: float) -> list[dict[str, Any]]:
    """A real ``--role worker``: the backlog held by another owner (else the worker would work on
    it); STAT enqueue -> the ``started`` time the worker records when its routing of the job begins."""
    from reader.jobs import JobStore  # noqa: PLC0415
    from reader.spool import Spool  # noqa: PLC0415
    from reader.state import Database  # noqa: PLC0415
    from tests import reliability  # noqa: PLC0415

    storage = folder / "storage"
    spool = Spool(storage)
    db = Database(url)
    store = JobStore(spool, database=db, owner="bench-receiver")
    model = reliability.write_fixture_model(folder / "fixture-model")
    config = cluster_toml(url, storage, body=reliability.serve_config(model)).replace(
        "[cluster]\n", f"[cluster]\npoll_interval_seconds = {poll_s}\n")
    worker = start_role(folder / "worker", config, "worker", "claim-worker", storage,
                        extra=["--device", "cpu"])
    out = []
    queued = 0
    phase = random.Random(2)
    try:
        wait_started([worker])
        for length in queue_lengths:
            _fill(store, length - queued, queued, held=True)
            queued = length
            latencies, processed = [], []
            for rep in range(repeats + 1):
                study = reliability.write_study(folder / "src" / f"{length}-{rep}", 16)
                ((_, _, sops),) = _store_series(storage, [study])
                time.sleep(poll_s * phase.random())
                t_enqueue = time.time()
                store.enqueue_if_changed(study.study_uid, study.series_uid, sops, priority=STAT)

                def done(series_uid: str = study.series_uid) -> bool:
                    state = store.series_state(series_uid)
                    return state is not None and str(state.status) != "queued"

                common.wait_until(done, 60, "the worker's outcome of the STAT series")
                state = store.series_state(study.series_uid)
                assert state is not None
                if str(state.status) != "done" or not state.timeline:
                    raise RuntimeError(f"STAT series ended {state.status}: {state.reason}")
                if rep > 0:
                    latencies.append(1000 * (state.timeline["started"] - t_enqueue))
                    processed.append(state.timeline.get("encoded", state.updated_at) - t_enqueue)
            out.append(_summary(length, latencies, enqueue_to_done_s_median=common.median(processed)))
            print(f"  {length} queued (held), real worker: p50 {out[-1]['p50_ms']:.1f} ms, p95 "
                  f"{out[-1]['p95_ms']:.1f} ms", flush=True)
    finally:
        worker.stop()
        db.close()
    return out


def part_claim(args: argparse.Namespace, pg: Postgres, run_dir: Path) -> dict[str, Any]:
    """Part 3: completion-to-claim latency on PostgreSQL and SQLite against the queue length."""
    result: dict[str, Any] = {"poll_interval_s": args.poll, "repeats": args.repeats}

    def sqlite(name: str) -> str:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{run_dir / name / 'state.db'}"

    engines: list[tuple[str, Callable[[str], str]]] = [("postgresql", pg.create), ("sqlite", sqlite)]
    for engine, make in engines:
        for held in (False, True):
            variant = "held" if held else "free"
            print(f"claim latency, {engine}, backlog {variant}, in-process poller:", flush=True)
            name = f"claim_{engine}_{variant}"
            result[f"{engine}/poller/{variant}"] = _poller_latencies(
                make(name), run_dir / name / "storage", args.queue, args.repeats, args.poll, held=held)
        print(f"claim latency, {engine}, backlog held, real worker:", flush=True)
        name = f"claim_{engine}_worker"
        result[f"{engine}/worker/held"] = _worker_latencies(make(name), run_dir / name, args.queue,
                                                            args.repeats, args.poll)
    return result


def table_claim(result: dict[str, Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for key, rows in result.items():
        if not isinstance(rows, list):
            continue
        engine, who, backlog = key.split("/")
        for row in rows:
            out.append([engine, "poller (JobStore)" if who == "poller" else "reader serve --role worker",
                        "free (routine, unclaimed)" if backlog == "free" else "held by another worker",
                        row["queued"], row["p50_ms"], row["p95_ms"], row["max_ms"],
                        row.get("poll_query_ms_median", ""), row.get("enqueue_ms_median", "")])
    return out


CLAIM_HEADERS = ["engine", "claimer", "backlog", "queued", "latency p50 ms", "p95 ms", "max ms",
                 "poll query ms", "enqueue ms"]


# --- part 4: what a receiver's per-instance arrival row costs ----------------------------------------


def part_arrival(args: argparse.Namespace, pg: Postgres, run_dir: Path) -> dict[str, Any]:
    """In process: ``JobStore.record_arrival`` as a receiver calls it for every stored instance (one
    transaction each), wall and CPU time of this process per call, PostgreSQL and SQLite."""
    from reader.jobs import JobStore  # noqa: PLC0415 - imported after the netns re-exec
    from reader.spool import Spool  # noqa: PLC0415
    from reader.state import Database  # noqa: PLC0415

    out: dict[str, Any] = {"calls": args.arrival_calls}
    urls = {"sqlite": f"sqlite:///{run_dir / 'arrival-sqlite.db'}", "postgresql": pg.create("arrival")}
    for engine, url in urls.items():
        db = Database(url)
        try:
            store = JobStore(Spool(run_dir / f"arrival-{engine}"), database=db, owner="bench-receiver")
            store.record_arrival("2.25.1", "2.25.2", time.time())  # warm-up: the row exists
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(args.arrival_calls):
                store.record_arrival("2.25.1", "2.25.2", time.time())
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        finally:
            db.close()
        out[engine] = {"wall_ms_per_call": 1000 * wall / args.arrival_calls,
                       "cpu_ms_per_call": 1000 * cpu / args.arrival_calls}
        print(f"record_arrival on {engine}: {out[engine]['wall_ms_per_call']:.2f} ms wall, "
              f"{out[engine]['cpu_ms_per_call']:.2f} ms CPU of the calling process per call", flush=True)
    return out


# --- main ------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _arguments() -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--parts", default="ingest,jobs,claim,arrival")
    p.add_argument("--runs", type=int, default=3, help="ingest runs per target and sender count")
    p.add_argument("--slices", type=int, default=200, help="slices (512 x 512) per sender's study")
    p.add_argument("--senders", type=_ints, default=[4, 8])
    p.add_argument("--receivers", type=_ints, default=[1, 2, 4])
    p.add_argument("--no-single-node", dest="single_node", action="store_false",
                   help="leave out today's single node (--role all on SQLite) from the ingest part")
    p.add_argument("--workers", type=_ints, default=[1, 2])
    p.add_argument("--job-runs", type=int, default=2, help="runs per worker count")
    p.add_argument("--job-series", type=int, default=20)
    p.add_argument("--job-slices", type=int, default=16)
    p.add_argument("--job-size", type=int, default=64, help="rows = columns of the job series")
    p.add_argument("--queue", type=_ints, default=[1, 100, 10000], help="queue lengths for the claim latency")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--arrival-calls", type=int, default=1000)
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a PostgreSQL server setting (repeatable), e.g. synchronous_commit=off")
    p.add_argument("--poll", type=float, default=0.05, help="the workers' poll interval (s)")
    p.add_argument("--output", default="cluster")
    p.add_argument("--quick", action="store_true", help="a smoke test: 1 run, small studies, short queues")
    args = p.parse_args()
    if args.quick:
        args.runs, args.slices, args.senders, args.receivers = 1, 40, [4], [1, 2]
        args.job_runs, args.job_series, args.queue, args.repeats = 1, 4, [1, 100], 5
        args.arrival_calls = 100
    return args


def main() -> None:
    """Run the parts asked for, print their tables, write bench/results/<output>.json."""
    args = _arguments()
    netns = common.enter_private_netns()
    info = common.machine()
    parts = args.parts.split(",")
    run_dir = args.work / f"cluster-{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    model, model_what = common.model_dir(args.model, args.work)
    needs_pg = {"ingest", "jobs", "claim", "arrival"} & set(parts)
    pg = start_postgres(run_dir / "pg", args.pg_setting) if needs_pg else None
    result: dict[str, Any] = {"private_netns": netns, "machine": info, "parts": parts,
                              "postgresql": pg.version() if pg else None,
                              "postgresql_settings": args.pg_setting}
    try:
        if "ingest" in parts:
            assert pg is not None
            result["ingest"] = part_ingest(args, pg, run_dir, model)
            result["ingest"]["receivers_model"] = model_what
        if "jobs" in parts:
            assert pg is not None
            result["jobs"] = part_jobs(args, pg, run_dir)
        if "claim" in parts:
            assert pg is not None
            result["claim"] = part_claim(args, pg, run_dir)
        if "arrival" in parts:
            assert pg is not None
            result["arrival"] = part_arrival(args, pg, run_dir)
    finally:
        if pg is not None:
            pg.stop()
    _report(args, result)


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if "ingest" in result:
        rows = result["ingest"]["rows"]
        loads = [r["load_average"] for r in rows]
        print(f"\nAggregate ingest: {args.slices}-slice 512x512 CT per sender (distinct studies), median of "
              f"{args.runs} runs, load average {min(loads):.1f}-{max(loads):.1f}")
        common.print_table(INGEST_HEADERS, table_ingest(result["ingest"]))
    if "jobs" in result:
        print(f"\nJobs per minute: {args.job_series} series of {args.job_slices} slices "
              f"{args.job_size}x{args.job_size}, fixture model, CPU")
        common.print_table(JOBS_HEADERS, table_jobs(result["jobs"]))
    if "claim" in result:
        print(f"\nCompletion-to-claim latency, poll interval {args.poll * 1000:.0f} ms, "
              f"{args.repeats} repeats")
        common.print_table(CLAIM_HEADERS, table_claim(result["claim"]))
    common.write_json(args.output, result)


if __name__ == "__main__":
    main()
