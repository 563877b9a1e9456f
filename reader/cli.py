"""Command line: ``reader serve | status | retry | backfill | purge``.

``reader serve --role all|receiver|worker`` runs the whole node (``all``, the default) or one
part of a cluster sharing a database and a storage folder (README "Cluster"): a ``receiver`` (DICOM
listener, STOW-RS, completion, sends, retention; loads no model) or a ``worker`` (reads complete
series on ``--device cpu|cuda:N``).

The edge where typed errors become exit codes: 0 success, 2 invalid configuration or flag
(one line naming the key and the problem, before any port opens), a state database that cannot be
reached or whose schema is newer than this code (one line), or a refused ``purge`` (one line), 1
anything else that stops the node.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TypeVar

import structlog

from reader import __version__
from reader.audit import AuditTrail
from reader.backfill import Backfill, BackfillOptions, Window, parse_date, study_query
from reader.config import Device, NodeConfig, Role, load_config
from reader.errors import (
    ConfigError,
    DatabaseUnavailable,
    InputRejected,
    ModelError,
    ReaderError,
    RetrieveError,
    SchemaTooNew,
)
from reader.jobs import JobStore
from reader.log import configure_logging
from reader.retention import Retention
from reader.spool import Spool, check_uid
from reader.status import collect, render

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2

_V = TypeVar("_V")
_PROCESS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # names a lock file and a tmp folder

log = structlog.get_logger(__name__)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (whose usage an error in its flags prints)."""
    p = argparse.ArgumentParser(prog="reader",
                                description="DICOM second-reader node (not a medical device)")
    p.add_argument("--version", action="version", version=f"reader {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="TOML file, see deploy/reader.example.toml")
        sp.add_argument("--data-dir", help="data dir (default ./reader-data)")

    serve = sub.add_parser(
        "serve", help="run the node (or one role of a cluster) until SIGTERM/SIGINT",
        description="Run the node until SIGTERM/SIGINT. Roles (README, Cluster): all = the whole node "
                    "in one process; receiver = DICOM listener, STOW-RS, completion, sends, retention "
                    "(no model); worker = reads complete series from the shared queue on --device.")
    common(serve)
    serve.add_argument("--role", default=Role.ALL.value, choices=[r.value for r in Role],
                       help="what this process does (default all)")
    serve.add_argument("--device", metavar="cpu|cuda:N",
                       help="where a worker (or all) runs its models: the CPU or GPU N "
                            "(default: [inference] providers)")
    serve.add_argument("--name", help="this process's name in the cluster (default HOST-ROLE, then "
                                      "-2, -3... while another process holds it)")
    serve.add_argument("--ae-title", help="our AE title (default SECONDREADER)")
    serve.add_argument("--port", help="listening port (default 11112)")
    serve.add_argument("--bind", help="listening address (default 0.0.0.0)")
    serve.add_argument("--web-port", help="HTTP port for /healthz, /readyz and STOW-RS "
                       "(default 8080; 0: any free port, logged as web.listening)")
    serve.add_argument("--send-to", action="append", default=[], metavar="AE@HOST:PORT",
                       help="destination for results (C-STORE), or a DICOMweb base URL (STOW-RS, "
                            "no authentication); repeat for several")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    status = sub.add_parser("status", help="what is queued, in flight, failed and done")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    retry = sub.add_parser("retry", help="re-queue parked (failed) sends")
    common(retry)
    bf = sub.add_parser("backfill", help="read studies already in a PACS through the running node")
    common(bf)
    bf.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                    help="a [[sources]] name from the config")
    bf.add_argument("--modality", help="only studies with this modality, and only its series (e.g. CT)")
    bf.add_argument("--since", help="first study date, YYYY-MM-DD")
    bf.add_argument("--until", help="last study date, YYYY-MM-DD (inclusive)")
    bf.add_argument("--accession", help="only the study with this accession number")
    bf.add_argument("--limit", help="at most this many studies from the query")
    bf.add_argument("--dry-run", action="store_true", help="list the matches, retrieve and read nothing")
    bf.add_argument("--window", metavar="HH:MM-HH:MM", help="retrieve only in these local hours")
    bf.add_argument("--max-parallel", default="1", help="studies retrieved at once (default 1)")
    bf.add_argument("--study-timeout", default="3600", help="seconds to wait for one study's read")
    bf.add_argument("--ae-title", help="the node's AE title (default from the config)")
    bf.add_argument("--port", help="the node's listening port (default from the config)")
    bf.add_argument("--node-host", default="127.0.0.1", help="where the node listens (default 127.0.0.1)")
    bf.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    purge = sub.add_parser("purge", help="remove one study everywhere: instances, results, state, "
                           "pending sends (cancelled)")
    common(purge)
    purge.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    purge.add_argument("--force", action="store_true",
                       help="with the node stopped: also cancel the study's queued jobs and pending sends")
    return p, {"serve": serve, "status": status, "retry": retry, "backfill": bf, "purge": purge}


def _config(args: argparse.Namespace) -> NodeConfig:
    overrides = {
        "data_dir": args.data_dir,
        "ae_title": getattr(args, "ae_title", None),
        "port": getattr(args, "port", None),
        "bind_address": getattr(args, "bind", None),
        "destinations": getattr(args, "send_to", None),
        "web_port": getattr(args, "web_port", None),
    }
    return load_config(args.config, overrides)


_SIGNAL_POLL_S = 0.5  # longest delay before a delivered SIGTERM/SIGINT is acted on


def _serve_flags(args: argparse.Namespace) -> tuple[Role, Device | None, str | None]:
    """``--role``, ``--device`` and ``--name``, checked; a bad one is a ConfigError naming it."""
    role = Role(args.role)
    device = None if args.device is None else Device.parse(args.device, "--device")
    if device is not None and role is Role.RECEIVER:
        raise ConfigError("--device", "a receiver runs no model: give --device to a worker (or all)")
    name = args.name
    if name is not None and not _PROCESS_NAME.fullmatch(name):
        raise ConfigError("--name", f"{name!r}: letters, digits, '.', '_' and '-', at most 63, "
                                    "starting with a letter or digit")
    return role, device, name


def _serve(config: NodeConfig, args: argparse.Namespace) -> int:
    role, device, name = _serve_flags(args)
    os.umask(0o077)  # everything the node writes carries patient data: owner-only
    from reader.node import Node, load_models  # noqa: PLC0415 - onnxruntime loads only for serve

    models = {}
    if role is not Role.RECEIVER:  # a receiver never reads a series: no model, no onnxruntime session
        try:
            models = load_models(config, device)
        except ModelError as exc:
            raise ConfigError("--device" if device is not None else "models", str(exc)) from exc
    node = Node(config, models, role=role, name=name)
    received: list[int] = []  # the handler only appends: it takes no lock (see below)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    if not config.destinations:
        log.info("node.no_destinations", results_dir=str(node.spool.root / "results"))
    # The handler runs in this thread between two bytecodes, so it must take no lock this thread may
    # hold: setting a threading.Event waited on here deadlocked when the signal landed while
    # Event.wait held the Event's own lock (the node then never stopped). Sleep in short steps: the
    # kernel may deliver SIGTERM to any of the node's threads; the handler runs once this one wakes.
    while not received:
        time.sleep(_SIGNAL_POLL_S)
    log.info("node.signal", signal=signal.Signals(received[0]).name)
    node.stop()
    return EXIT_OK


def _status(config: NodeConfig, as_json: bool) -> int:
    if not config.data_dir.is_dir():
        raise ConfigError("data_dir", f"{config.data_dir} does not exist")
    report = collect(JobStore.open(Spool(config.data_dir), config.cluster.database))
    if as_json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        sys.stdout.write(render(report))
    return EXIT_OK


def _retry(config: NodeConfig) -> int:
    if not config.data_dir.is_dir():
        raise ConfigError("data_dir", f"{config.data_dir} does not exist")
    requeued = JobStore.open(Spool(config.data_dir), config.cluster.database).requeue_failed()
    print(f"re-queued {len(requeued)} send(s)")
    return EXIT_OK


def _backfill_options(config: NodeConfig, args: argparse.Namespace) -> BackfillOptions:
    """The flags of ``reader backfill``, checked; a bad one is a ConfigError naming it."""
    try:
        source = config.source(args.source)
    except KeyError:
        names = ", ".join(s.name for s in config.sources) or "none configured"
        raise ConfigError("--from", f"no source named {args.source!r} in [[sources]] ({names})") from None

    def flag(name: str, parse: Callable[[str], _V], text: str | None) -> _V | None:
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as exc:
            raise ConfigError(name, f"{text!r}: {exc}") from None

    def count(low: int, high: int) -> Callable[[str], int]:
        def parse(text: str) -> int:
            value = int(text)
            if not low <= value <= high:
                raise ValueError(f"must be between {low} and {high}")
            return value
        return parse

    since, until = flag("--since", parse_date, args.since), flag("--until", parse_date, args.until)
    try:
        query = study_query(args.modality, since, until, args.accession)
    except ValueError as exc:
        raise ConfigError("--until", str(exc)) from None
    return BackfillOptions(
        source=source, query=query, limit=flag("--limit", count(1, 10**9), args.limit),
        dry_run=args.dry_run, window=flag("--window", Window.parse, args.window),
        max_parallel=flag("--max-parallel", count(1, 64), args.max_parallel) or 1,
        study_timeout=timedelta(seconds=flag("--study-timeout", count(1, 7 * 86400), args.study_timeout)
                                or 3600),
        node_host=args.node_host)


def _backfill(config: NodeConfig, args: argparse.Namespace) -> int:
    options = _backfill_options(config, args)
    if args.log_level != "debug":  # pynetdicom's own log lines would bury the one line an error gets
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("backfill.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    result: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(Backfill(config, options, stop=stop).run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread, which translates it
            errors.append(exc)

    worker = threading.Thread(target=work, name="backfill", daemon=True)
    worker.start()
    while worker.is_alive():  # the main thread stays free to run the signal handler
        worker.join(_SIGNAL_POLL_S)
    if errors:
        raise errors[0]
    return EXIT_OK if result and result[0] == 0 and not stop.is_set() else EXIT_ERROR


def _purge(config: NodeConfig, study_uid: str, force: bool) -> int:
    """Remove one study; refuse (exit 2, one line) a study still in flight while the node runs,
    and, with the node stopped, unless ``force``."""
    if not config.data_dir.is_dir():
        raise ConfigError("data_dir", f"{config.data_dir} does not exist")
    try:
        study_uid = check_uid(study_uid, "--study")
    except InputRejected as exc:
        raise ConfigError("--study", f"{study_uid!r} is not a valid Study Instance UID") from exc
    spool = Spool(config.data_dir, min_free_bytes=config.min_free_disk_bytes)
    audit = None
    if config.audit.enabled:  # written at once (not started: the running node's senders deliver it)
        audit = AuditTrail(config.audit, config.data_dir, config.ae_title)
        for folder in (audit.root / "tmp", audit.file.parent):  # what AuditTrail.start would create
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    retention = Retention(spool, JobStore.open(spool, config.cluster.database), config.retention, audit=audit,
                          user=getpass.getuser())
    activity = retention.study_activity(study_uid)
    if activity.in_flight:
        busy = (f"{len(activity.queued_jobs)} queued job(s), {len(activity.pending_sends)} pending send(s), "
                f"{len(activity.collecting)} series being received")
        if spool.node_running():
            print(f"reader: purge refused: study in flight ({busy}) and the node is running; let it "
                  "finish, or stop the node and purge with --force", file=sys.stderr)
            return EXIT_CONFIG
        if not force:
            print(f"reader: purge refused: study in flight ({busy}); --force cancels them", file=sys.stderr)
            return EXIT_CONFIG
    report = retention.purge_study(study_uid, reason="purged by an administrator (reader purge)")
    print(f"purged study {study_uid}: {len(report.series)} series, {report.instances} instance(s), "
          f"{report.results} result version(s), {len(report.cancelled_sends)} pending send(s) cancelled")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reader`` console script."""
    parser, parsers = _parser()
    # argparse hands a command's unknown flags up to the top-level parser, whose usage would then be
    # printed: report them with the command's own usage instead (exit 2, as argparse does).
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(getattr(args, "log_level", "info"))
    try:
        config = _config(args)
        commands: dict[str, Callable[[], int]] = {
            "serve": lambda: _serve(config, args), "status": lambda: _status(config, args.json),
            "backfill": lambda: _backfill(config, args), "retry": lambda: _retry(config),
            "purge": lambda: _purge(config, args.study, args.force)}
        return commands[args.command]()
    except ConfigError as exc:
        print(f"reader: configuration error: {exc.key}: {exc.problem}", file=sys.stderr)
        return EXIT_CONFIG
    except DatabaseUnavailable as exc:
        print(f"reader: state database unavailable: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except SchemaTooNew as exc:
        print(f"reader: state database schema too new for this version: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except RetrieveError as exc:
        print(f"reader: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ReaderError as exc:
        log.error("node.fatal", error=type(exc).__name__, detail=str(exc))
        return EXIT_ERROR


def _one_line(exc: Exception) -> str:
    """An error's message on one line (the state layer names a database without its password,
    ``reader.config.redact_url``)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
