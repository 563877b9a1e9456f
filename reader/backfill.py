"""Retrospective reads (``reader backfill``): studies already in a PACS, read by the running node.

The backfill is a client of two peers: the source PACS (``[[sources]]`` in the node's config), which
it queries (C-FIND, Study Root) and asks to C-MOVE each study to the node's own AE title, and the
running node, which receives the instances on its listener exactly as a push and reads them at
routine priority. It shares the node's data dir, where it reads what the node recorded and keeps
its own progress:

1. **List.** The STUDY-level C-FIND responses are taken one at a time (``reader.queryretrieve``),
   and each match becomes a small durable record, ``state/backfill/<run>/<study UID>.json`` (atomic
   writes, ``reader.spool``), ``<run>`` naming the source, the query and the models configured
   (a model update starts a new run). The list lives on disk, not in memory; ``--limit`` stops the
   query early.
2. **Skip what is read.** A study is skipped when one of its series is recorded done by one of the
   models the node is configured with now, same name, version and graph digest
   (``SeriesState.model``, ``reader.pipeline.model_record``), or when its record holds a final
   outcome from an earlier run.
3. **Hold, move, verify.** The study's series of ``--modality`` and their SOP Instance UIDs are
   queried (SERIES, then IMAGE level). A hold (``reader.holds``) listing them is written before the
   first C-MOVE, so the node reads nothing from a partial set. A move with failed sub-operations
   (warning 0xB000, the Failed SOP Instance UID List) is followed by a check of what the node stored
   and an IMAGE-level C-MOVE of exactly the missing instances, up to ``move_attempts`` times. A
   study still incomplete keeps its hold and is recorded ``incomplete``; a rerun tries it again.
4. **Wait for the read.** The node queues the study once its last listed instance is stored and
   ends the hold; the backfill then waits until every moved series is settled and records the
   outcome (``read``, or ``not_read`` with the node's reasons).

A crash or SIGKILL anywhere leaves records that a rerun of the same command continues from: final
outcomes are skipped, a study the node finished meanwhile is found read, and moving a study again is
harmless (the node queues a series only when its instances changed). ``--window`` keeps retrievals
to off-peak hours: outside it the backfill sleeps until the window opens, the time computed.
"""

from __future__ import annotations

import enum
import hashlib
import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from typing import Any, Protocol, TextIO

import structlog

from reader.config import NodeConfig, Source
from reader.errors import InputRejected, RetrieveError, SendError
from reader.holds import HOLDS, StudyHold
from reader.jobs import JobStore, SeriesStatus
from reader.qido import DicomWebSource
from reader.queryretrieve import MoveOutcome, QueryRetrieveSCU, SeriesInstances, StudyMatch, StudyQuery
from reader.send import Destination, StoreSCU
from reader.spool import Spool, atomic_write, check_uid

__all__ = ["Backfill", "BackfillOptions", "Outcome", "StudySource", "Window", "current_models", "parse_date",
           "run_key", "study_query"]

log = structlog.get_logger(__name__)

_SETTLE_POLL_S = 0.5  # how often the node's records are re-read while a study is being read
_UIDS_PER_MOVE = 500  # SOP Instance UIDs in one IMAGE-level C-MOVE of missing instances


class Outcome(enum.StrEnum):
    """Where one study of a backfill stands (its record's ``status``)."""

    PENDING = "pending"  # listed, not yet retrieved
    MOVING = "moving"  # hold written, C-MOVE under way or done, read not yet seen
    READ = "read"  # the node read it with a model configured now
    ALREADY_READ = "already_read"  # read by a model configured now before this backfill came to it
    NOT_READ = "not_read"  # moved; the node settled it without a result (no route, rejected, failed)
    NOTHING_TO_READ = "nothing_to_read"  # no instance of the modality asked for
    INCOMPLETE = "incomplete"  # instances still missing after the retries; hold kept, rerun retries
    TIMEOUT = "timeout"  # moved, but the node had not settled it within the study timeout

    @property
    def final(self) -> bool:
        """True when a rerun leaves the study alone."""
        return self in (Outcome.READ, Outcome.ALREADY_READ, Outcome.NOT_READ, Outcome.NOTHING_TO_READ)


@dataclass(frozen=True)
class Window:
    """Off-peak hours, local time, ``HH:MM-HH:MM``; the end is exclusive and may be past midnight."""

    start: clock_time
    end: clock_time

    @classmethod
    def parse(cls, text: str) -> Window:
        """``"22:00-06:00"``; raises ValueError naming the problem."""
        try:
            a, b = text.split("-")
            start, end = clock_time.fromisoformat(a.strip()), clock_time.fromisoformat(b.strip())
        except ValueError as exc:
            raise ValueError(f"{text!r} is not HH:MM-HH:MM") from exc
        if start == end:
            raise ValueError(f"{text!r} is empty: start and end are the same time")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, now: datetime) -> bool:
        """Whether ``now`` falls in the window."""
        t = now.time()
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def opens_in(self, now: datetime) -> timedelta:
        """Zero inside the window, else the time until it next opens."""
        if self.is_open(now):
            return timedelta(0)
        opening = datetime.combine(now.date(), self.start, tzinfo=now.tzinfo)
        if opening <= now:
            opening += timedelta(days=1)
        return opening - now


@dataclass(frozen=True)
class BackfillOptions:
    """One ``reader backfill`` invocation, validated by the CLI."""

    source: Source
    query: StudyQuery
    limit: int | None = None
    dry_run: bool = False
    window: Window | None = None
    max_parallel: int = 1
    study_timeout: timedelta = timedelta(hours=1)  # move to settled read, per study
    move_attempts: int = 3  # IMAGE-level moves of missing instances after the first move
    node_host: str = "127.0.0.1"


def run_key(source: Source, query: StudyQuery, models: list[dict[str, str]]) -> str:
    """The name of a run's progress folder: the source, the query and the models (a model update
    starts afresh), hashed (no PHI in file names)."""
    text = json.dumps([source.name.casefold(), str(query.since), str(query.until), query.modality,
                       query.accession, sorted(m["weights_sha256"] for m in models)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def current_models(config: NodeConfig) -> list[dict[str, str]]:
    """The ``model_record`` a series read now would carry, for every routed model: its fp32 graph,
    and its fp16 graph where the package names one (which of them runs depends on the provider)."""
    from reader.inference.manifest import load_manifest  # noqa: PLC0415 - imports onnxruntime

    records = []
    for name in sorted({r.model for r in config.routes}):
        info = load_manifest(config.model(name).path).model
        for digest in (info.onnx_sha256, info.onnx_fp16_sha256):
            if digest is not None:
                records.append({"name": info.name, "version": info.version, "weights_sha256": digest})
    return records


class StudySource(Protocol):
    """What the backfill asks of a source: DIMSE (:class:`QueryRetrieveSCU`, which also moves) or
    DICOMweb (:class:`reader.qido.DicomWebSource`)."""

    def find_studies(self, query: StudyQuery, limit: int | None = None) -> Iterator[StudyMatch]: ...

    def find_instances(self, study_uid: str, modality: str | None = None) -> list[SeriesInstances]: ...

    def get(self, study_uid: str, series_uid: str, store: Callable[[str, bytes], None],
            sop_uids: Sequence[str] = ()) -> MoveOutcome: ...


@dataclass
class _Progress:
    """One progress line: ``n/N studies``, the current study's state and instance count."""

    stream: TextIO
    total: int = 0
    finished: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def show(self, text: str) -> None:
        with self._lock:
            line = f"[{self.finished}/{self.total} studies] {text}"
            if self.stream.isatty():
                self.stream.write("\r\x1b[2K" + line)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def done(self, outcome: Outcome) -> None:
        with self._lock:
            self.finished += 1
            self.counts[outcome.value] = self.counts.get(outcome.value, 0) + 1

    def end(self) -> None:
        if self.stream.isatty():
            self.stream.write("\n")


class Backfill:
    """Runs one backfill; :meth:`run` returns the number of studies not brought to a final outcome."""

    def __init__(self, config: NodeConfig, options: BackfillOptions, *,
                 stop: threading.Event | None = None, clock: Callable[[], datetime] = datetime.now,
                 out: TextIO = sys.stdout) -> None:
        self.config = config
        self.options = options
        source = options.source
        self.scu: StudySource
        if source.url:
            self.scu = DicomWebSource(source.url, timeout=config.network_timeout)
        else:
            self.scu = QueryRetrieveSCU(config.ae_title, source.ae_title, source.host, source.port,
                                        acse_timeout=config.acse_timeout, dimse_timeout=config.dimse_timeout,
                                        network_timeout=config.network_timeout)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.out = out
        self.kind = ""  # set by run(), once the models are known
        self._spool: Spool | None = None
        self._store: JobStore | None = None
        self._models: list[dict[str, str]] = []

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(self.config.data_dir, min_free_bytes=0)
        return self._spool

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> int:
        """List, then retrieve and read each study; returns how many are left unfinished."""
        self._models = current_models(self.config)
        self.kind = f"backfill/{run_key(self.options.source, self.options.query, self._models)}"
        if self.options.dry_run:
            self._dry_run()
            return 0
        node = QueryRetrieveSCU(self.config.ae_title, self.config.ae_title, self.options.node_host,
                                self.config.port, acse_timeout=self.config.acse_timeout)
        if not node.echo():
            raise RetrieveError(f"the node {node} does not answer C-ECHO: start `reader serve` first")
        listed = self._list()
        names = self.spool.list_state(self.kind)
        progress = _Progress(self.out, total=len(names))
        progress.show(f"{listed} matched at {self.options.source.name}")
        unfinished = self._retrieve_all(names, progress)
        progress.end()
        summary = ", ".join(f"{k} {v}" for k, v in sorted(progress.counts.items()))
        self.out.write(f"backfill: {len(names)} studies: {summary or 'none'}"
                       + (f"; {unfinished} unfinished (run again to continue)" if unfinished else "") + "\n")
        return unfinished

    def _matches(self) -> Iterator[StudyMatch]:
        for match in self.scu.find_studies(self.options.query, self.options.limit):
            try:
                check_uid(match.study_uid, "Study Instance UID")
            except InputRejected:
                log.warning("backfill.invalid_study_uid")
                continue
            yield match

    def _dry_run(self) -> None:
        """Print each match and whether it would be read; retrieve and write nothing."""
        n = 0
        for match in self._matches():
            n += 1
            state = "already read" if self._read_by_current_model(match.study_uid) else "would read"
            count = "?" if match.instances is None else str(match.instances)
            self.out.write(f"{match.study_uid} {match.study_date or '-'} {count} instances: {state}\n")
        self.out.write(f"backfill (dry run): {n} studies matched; nothing retrieved\n")

    def _list(self) -> int:
        """Record every match not recorded yet (pending); returns how many matched."""
        n = 0
        for match in self._matches():
            n += 1
            if self.spool.read_state(self.kind, match.study_uid) is None:
                self._record(match.study_uid, Outcome.PENDING, study_date=match.study_date,
                             instances=match.instances)
        log.info("backfill.listed", source=self.options.source.name, matched=n)
        return n

    def _retrieve_all(self, names: list[str], progress: _Progress) -> int:
        in_flight: set[Future[Outcome]] = set()
        with ThreadPoolExecutor(max_workers=self.options.max_parallel,
                                thread_name_prefix="backfill") as pool:
            for uid in names:
                status = self._status(uid)
                if status.final:
                    progress.done(status)
                    continue
                while len(in_flight) >= self.options.max_parallel:
                    finished, in_flight = _wait_any(in_flight)
                    for f in finished:
                        f.result()  # a RetrieveError stops the run (the others end first)
                if not self._wait_for_window(progress) or self.stop.is_set():
                    break
                in_flight.add(pool.submit(self._study, uid, progress))
            for f in in_flight:
                f.result()
        return sum(not self._status(uid).final for uid in names)

    def _status(self, uid: str) -> Outcome:
        return Outcome((self.spool.read_state(self.kind, uid) or {}).get("status", Outcome.PENDING.value))

    def _wait_for_window(self, progress: _Progress) -> bool:
        """Sleep until the retrieval window is open; False when stopped meanwhile."""
        window = self.options.window
        while window is not None and not self.stop.is_set():
            now = self.clock()
            delay = window.opens_in(now)
            if delay <= timedelta(0):
                return True
            opening = now + delay
            progress.show(f"outside the window {window}: waiting {_human(delay)}"
                          f" until {opening:%Y-%m-%d %H:%M}")
            log.info("backfill.waiting_for_window", window=str(window), seconds=round(delay.total_seconds()))
            if self.stop.wait(delay.total_seconds()):
                return False
        return not self.stop.is_set()

    # -- one study ------------------------------------------------------------------------------------
    def _study(self, uid: str, progress: _Progress) -> Outcome:
        try:
            outcome, extra = self._read_study(uid, progress)
        except BaseException:
            progress.show(f"study {uid}: error")
            raise
        self._record(uid, outcome, **extra)
        progress.done(outcome)
        progress.show(f"study {uid}: {outcome.value}")
        log.info("backfill.study", study_uid=uid, outcome=outcome.value)
        return outcome

    def _read_study(self, uid: str, progress: _Progress) -> tuple[Outcome, dict[str, Any]]:
        if self._read_by_current_model(uid):
            return Outcome.ALREADY_READ, {}
        series = [s for s in self.scu.find_instances(uid, self.options.query.modality) if s.sop_uids]
        expected = {s.series_uid: s.sop_uids for s in series}
        total = sum(len(s) for s in expected.values())
        if not expected:
            return Outcome.NOTHING_TO_READ, {}
        hold = StudyHold(uid, expected, time.time() + self.options.source.hold_ttl.total_seconds())
        hold.write(self.spool)
        self._record(uid, Outcome.MOVING, instances=total)
        failed_named = self._move(uid, series, progress, total)
        missing = hold.missing(self.spool)
        for attempt in range(1, self.options.move_attempts + 1):
            if not missing or self.stop.is_set():
                break
            count = sum(len(m) for m in missing.values())
            log.warning("backfill.instances_missing", study_uid=uid, missing=count, attempt=attempt)
            for series_uid, sops in missing.items():
                for i in range(0, len(sops), _UIDS_PER_MOVE):
                    self._move_again(uid, series_uid, sops[i:i + _UIDS_PER_MOVE])
            missing = hold.missing(self.spool)
        if missing and self.stop.is_set():
            return Outcome.MOVING, {}  # stopped part-way: the next run moves the study again
        if missing:  # the hold stays: the node must not read the partial set
            count = sum(len(m) for m in missing.values())
            progress.show(f"study {uid}: {count} of {total} instances missing after the retries")
            return Outcome.INCOMPLETE, {"missing": count, "failed_named": failed_named}
        progress.show(f"study {uid}: {total}/{total} instances at the node, reading")
        return self._await_read(uid, hold, total)

    def _fetch(self, uid: str, series_uid: str, sops: tuple[str, ...] = ()) -> MoveOutcome:
        """Bring a series (or ``sops`` of it) to the node: C-MOVE to the node's AE title, or, for a
        source with ``retrieve = "get"``, C-GET here and C-STORE to the node on one association."""
        if isinstance(self.scu, QueryRetrieveSCU) and self.options.source.retrieve == "move":
            return self.scu.move(self.config.ae_title, uid, series_uid, sops)
        staging = self.config.data_dir / "backfill-staging" / uid / series_uid
        staging.mkdir(parents=True, exist_ok=True, mode=0o700)

        def store(sop_uid: str, data: bytes) -> None:
            check_uid(sop_uid, "SOP Instance UID")  # becomes a file name
            atomic_write(staging / f"{sop_uid}.dcm", data, staging)

        try:
            outcome = self.scu.get(uid, series_uid, store, sops)
            files = sorted(staging.glob("*.dcm"))
            if files:
                scu = StoreSCU(self.config.ae_title, acse_timeout=self.config.acse_timeout,
                               dimse_timeout=self.config.dimse_timeout,
                               network_timeout=self.config.network_timeout)
                node = Destination(self.config.ae_title, self.options.node_host, self.config.port)
                try:
                    scu.send(node, files)
                except SendError as exc:  # what did not arrive is found missing and fetched again
                    log.warning("backfill.forward_failed", study_uid=uid, series_uid=series_uid,
                                error=type(exc).__name__, detail=str(exc))
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
        return outcome

    def _move(self, uid: str, series: list[SeriesInstances], progress: _Progress, total: int) -> int:
        """Fetch each series to the node; returns how many failed instances the PACS named."""
        failed_named = 0
        for s in series:
            if self.stop.is_set():
                break
            outcome = self._fetch(uid, s.series_uid)
            failed_named += len(outcome.failed_sop_uids)
            log.info("backfill.moved", study_uid=uid, series_uid=s.series_uid, completed=outcome.completed,
                     failed=outcome.failed, warning=outcome.warning, status=f"0x{outcome.status:04X}")
            stored = sum(len(self.spool.series_instances(uid, x.series_uid)) for x in series)
            progress.show(f"study {uid}: {stored}/{total} instances moved")
        return failed_named

    def _move_again(self, uid: str, series_uid: str, sops: tuple[str, ...]) -> None:
        """IMAGE-level C-MOVE of missing instances; when the PACS fails that move, one instance per
        move, so that one instance the node refuses does not keep the others away."""
        outcome = self._fetch(uid, series_uid, sops)
        log.info("backfill.moved_again", study_uid=uid, series_uid=series_uid, requested=len(sops),
                 completed=outcome.completed, failed=outcome.failed, status=f"0x{outcome.status:04X}")
        if outcome.partial and len(sops) > 1:
            stored = {p.stem for p in self.spool.series_instances(uid, series_uid)}
            for sop in sops:
                if sop not in stored and not self.stop.is_set():
                    self._fetch(uid, series_uid, (sop,))

    def _await_read(self, uid: str, hold: StudyHold, total: int) -> tuple[Outcome, dict[str, Any]]:
        """Wait (polling the node's records, with the study timeout) until the node has queued the
        study (hold ended) and settled every series moved."""
        deadline = time.monotonic() + self.options.study_timeout.total_seconds()
        jobs = self._jobs()
        while not self.stop.is_set():
            if self.spool.read_state(HOLDS, uid) is None:
                states = [jobs.series_state(s) for s in hold.series]
                if all(st is not None and st.status is not SeriesStatus.QUEUED
                       and set(st.instances) >= set(hold.series[st.series_uid]) for st in states):
                    if self._read_by_current_model(uid):
                        return Outcome.READ, {"instances": total}
                    reasons = sorted({st.reason for st in states if st is not None and st.reason})
                    return Outcome.NOT_READ, {"instances": total, "reasons": reasons}
            if time.monotonic() >= deadline:
                return Outcome.TIMEOUT, {"instances": total}
            self.stop.wait(_SETTLE_POLL_S)
        return Outcome.MOVING, {"instances": total}  # stopped (SIGTERM): the next run looks again

    def _jobs(self) -> JobStore:
        """The node's state (``[cluster] database``, or the data dir's SQLite file), opened once."""
        if self._store is None:
            self._store = JobStore.open(self.spool, self.config.cluster.database)
        return self._store

    # -- records --------------------------------------------------------------------------------------
    def _read_by_current_model(self, study_uid: str) -> bool:
        if not (self.config.data_dir / "incoming" / study_uid).is_dir():
            return False  # nothing of it at the node (and a dry run creates no data dir)
        jobs = self._jobs()
        for series_uid in self.spool.study_series(study_uid):
            state = jobs.series_state(series_uid)
            if state is not None and state.status is SeriesStatus.DONE and state.model in self._models:
                return True
        return False

    def _record(self, uid: str, outcome: Outcome, **extra: Any) -> None:
        record = self.spool.read_state(self.kind, uid) or {"study_uid": uid}
        record.update({k: v for k, v in extra.items() if v is not None})
        record.update({"status": outcome.value, "updated_at": time.time(),
                       "attempts": int(record.get("attempts", 0)) + (outcome is Outcome.MOVING)})
        self.spool.write_state(self.kind, uid, record)


def _wait_any(futures: set[Future[Outcome]]) -> tuple[set[Future[Outcome]], set[Future[Outcome]]]:
    done, pending = wait(futures, return_when=FIRST_COMPLETED)
    return set(done), set(pending)


def _human(span: timedelta) -> str:
    minutes = int(span.total_seconds() + 59) // 60
    return f"{minutes // 60} h {minutes % 60:02d} min"


def parse_date(text: str) -> date:
    """``YYYY-MM-DD`` (or ``YYYYMMDD``); raises ValueError."""
    return date.fromisoformat(text.strip())


def study_query(modality: str | None, since: date | None, until: date | None,
                accession: str | None) -> StudyQuery:
    """The query of a backfill; raises ValueError when ``until`` is before ``since``."""
    if since is not None and until is not None and until < since:
        raise ValueError("--until is before --since")
    return StudyQuery(since=since, until=until, modality=modality.upper() if modality else None,
                      accession=accession)

