"""Durable work tickets: what each stage owes the next, kept in the state database (``reader.state``).

- :class:`SeriesState`: which instances of a series were last processed, as which result version.
- :class:`ProcessJob`: a complete series waiting for route -> volume -> infer -> encode.
- a study's result lineage (table ``study_reads``, :meth:`JobStore.study_result_version`): which series
  and instances each result version of a study read (``reader.study``) came from;
- :class:`SendTicket`: result files owed to one destination, with attempts and the next retry;
  pending and settled ones (done, superseded, parked, cancelled) in one table, told apart by their
  state, so that the dispatcher's frequent passes read only pending work (an indexed query).
- :class:`Arrival`: when a receiver last stored an instance of a series (completion across the
  receivers of a cluster).

A ticket is written before the work it describes starts and updated after it ends, so a restart
finds every piece of unfinished work. Each step that several processes may take at once (queueing
a series, minting a study's result version, claiming a job or a send, creating a ticket) is one
transaction, safe on a PostgreSQL database shared by the processes of a cluster: row locks, unique
constraints and a retry after a conflict (:meth:`reader.state.Database.run`). Work is claimed by a
lease (``claimed_by``, ``lease_until``): renewed while it runs, free again once it expires.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, RowMapping

from reader.spool import Spool
from reader.state import Database
from reader.state import schema as t
from reader.state.legacy import import_json_state

__all__ = ["Arrival", "JobStore", "ProcessJob", "SendState", "SendTicket", "SeriesState", "SeriesStatus",
           "backoff"]

T = TypeVar("T")


class SeriesStatus(enum.StrEnum):
    """Where a series stands after its last processing."""

    QUEUED = "queued"
    DONE = "done"
    SKIPPED = "skipped"  # no route matched, or the input was rejected; ``reason`` says why
    FAILED = "failed"  # the model or the encoder failed; ``reason`` says why


class SendState(enum.StrEnum):
    """Lifecycle of a send ticket."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"  # parked: permanent failure or attempts exhausted; ``reader retry`` re-queues
    SUPERSEDED = "superseded"  # a newer result version of the same series replaced it before sending
    CANCELLED = "cancelled"  # an operator cancelled it (status page); ``last_error`` says who and why


@dataclass(frozen=True)
class SeriesState:
    """The last processing outcome of a series."""

    study_uid: str
    series_uid: str
    version: int  # result version of the last processing, 1-based
    instances: tuple[str, ...]  # SOP Instance UIDs it covered, sorted
    status: SeriesStatus
    reason: str = ""
    updated_at: float = 0.0
    flag: dict[str, Any] | None = None  # reader.flag.FlagDecision.as_record() of a processed series
    # the model that read a processed series: name, version, weights_sha256 (reader.pipeline.model_record)
    model: dict[str, str] | None = None
    # wall-clock times (s since the epoch) of the last processing's steps: "complete" (the job was
    # queued), "started" (routing began), "routed", "loaded", "inference_started", "inferred",
    # "encoded" (results written); only those the outcome reached (``reader.web.queries``)
    timeline: dict[str, float] | None = None


@dataclass(frozen=True)
class ProcessJob:
    """A complete series queued for processing as result ``version``."""

    study_uid: str
    series_uid: str
    version: int
    instances: tuple[str, ...]
    priority: int = 0  # higher runs first; STAT work (issue: worklist flagging) raises it
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SendTicket:
    """Result files owed to one target, named by its key: ``AE@HOST:PORT`` (C-STORE), ``stow:URL``
    (STOW-RS), ``mllp://HOST:PORT`` (HL7) or a webhook URL (``reader.dispatch``)."""

    name: str
    series_uid: str
    version: int
    destination: str
    files: tuple[str, ...]
    state: SendState = SendState.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    last_status: int | None = None
    created_at: float = field(default_factory=time.time)
    # whose result versions supersede each other: the series, or a study read from several series
    lineage: str = ""
    updated_at: float = 0.0  # when this state was written (a done ticket: when it was delivered)

    @property
    def line(self) -> str:
        """The lineage this ticket's version belongs to (its series when none was recorded)."""
        return self.lineage or self.series_uid


@dataclass(frozen=True)
class Arrival:
    """When a receiver last stored an instance of a series (``JobStore.record_arrival``); ``stat``:
    one of its instances asked for STAT priority."""

    study_uid: str
    series_uid: str
    last_instance_at: float
    stat: bool = False


def backoff(attempts: int, initial: timedelta, maximum: timedelta, rng: random.Random) -> timedelta:
    """Exponential backoff with full jitter: uniform in [initial/2, min(max, initial * 2^(n-1))]."""
    ceiling = min(maximum.total_seconds(), initial.total_seconds() * 2 ** max(0, attempts - 1))
    low = min(initial.total_seconds() / 2, ceiling)
    return timedelta(seconds=rng.uniform(low, ceiling))


# --- rows <-> tickets ----------------------------------------------------------------------------
def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _series_row(state: SeriesState) -> dict[str, Any]:
    return {"series_uid": state.series_uid, "study_uid": state.study_uid, "version": state.version,
            "instances": json.dumps(list(state.instances)), "status": state.status.value,
            "reason": state.reason, "updated_at": state.updated_at, "flag": t.json_text(state.flag),
            "model": t.json_text(state.model), "timeline": t.json_text(state.timeline)}


def _series_from(row: RowMapping) -> SeriesState:
    return SeriesState(
        study_uid=row["study_uid"], series_uid=row["series_uid"], version=int(row["version"]),
        instances=tuple(json.loads(row["instances"])), status=SeriesStatus(row["status"]),
        reason=row["reason"], updated_at=float(row["updated_at"]), flag=_unjson(row["flag"]),
        model=_unjson(row["model"]), timeline=_unjson(row["timeline"]))


def _job_row(job: ProcessJob) -> dict[str, Any]:
    return {"series_uid": job.series_uid, "study_uid": job.study_uid, "version": job.version,
            "instances": json.dumps(list(job.instances)), "priority": job.priority,
            "created_at": job.created_at, "claimed_by": None, "lease_until": None}


def _job_from(row: RowMapping) -> ProcessJob:
    return ProcessJob(study_uid=row["study_uid"], series_uid=row["series_uid"], version=int(row["version"]),
                      instances=tuple(json.loads(row["instances"])), priority=int(row["priority"]),
                      created_at=float(row["created_at"]))


def _send_row(ticket: SendTicket) -> dict[str, Any]:
    return {"name": ticket.name, "series_uid": ticket.series_uid, "version": ticket.version,
            "destination": ticket.destination, "files": json.dumps(list(ticket.files)),
            "state": ticket.state.value, "attempts": ticket.attempts,
            "next_attempt_at": ticket.next_attempt_at, "last_error": ticket.last_error,
            "last_status": ticket.last_status, "created_at": ticket.created_at, "lineage": ticket.lineage,
            "line": ticket.line, "updated_at": ticket.updated_at, "claimed_by": None, "lease_until": None}


def _send_from(row: RowMapping) -> SendTicket:
    return SendTicket(
        name=row["name"], series_uid=row["series_uid"], version=int(row["version"]),
        destination=row["destination"], files=tuple(json.loads(row["files"])),
        state=SendState(row["state"]), attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]), last_error=row["last_error"],
        last_status=None if row["last_status"] is None else int(row["last_status"]),
        created_at=float(row["created_at"]), lineage=row["lineage"], updated_at=float(row["updated_at"]))


def _arrival_from(row: RowMapping) -> Arrival:
    return Arrival(row["study_uid"], row["series_uid"], float(row["last_instance_at"]), bool(row["stat"]))


def _upsert(conn: Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """Insert ``values`` or, when a row with the same primary key exists, replace it: one
    statement (``INSERT ... ON CONFLICT DO UPDATE``) on both engines."""
    keys = [c.name for c in table.primary_key.columns]
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt: Any = insert(table).values(values)
    conn.execute(stmt.on_conflict_do_update(index_elements=keys,
                                            set_={k: v for k, v in values.items() if k not in keys}))


def _arrival_upsert(is_sqlite: bool) -> Any:
    """``JobStore.record_arrival``'s statement, its values bound at execution: insert the row or
    keep the later of the two times and whether either asked for STAT."""
    insert = sqlite_insert if is_sqlite else postgresql_insert
    latest = sa.func.max if is_sqlite else sa.func.greatest  # SQLite's 2-argument max
    stmt = insert(t.arrivals)
    return stmt.on_conflict_do_update(
        index_elements=[t.arrivals.c.study_uid, t.arrivals.c.series_uid],
        set_={"last_instance_at": latest(t.arrivals.c.last_instance_at, stmt.excluded.last_instance_at),
              "stat": sa.or_(t.arrivals.c.stat, stmt.excluded.stat)})


def _unclaimed(table: sa.Table, owner: str, now: float) -> sa.ColumnElement[bool]:
    """Rows nobody holds, ours, or whose holder's lease expired."""
    return sa.or_(table.c.claimed_by.is_(None), table.c.claimed_by == owner, table.c.lease_until < now)


class JobStore:
    """Reads and writes tickets in the state database (``reader.state``) as ``owner`` (the process's
    name: the holder of its claims and leases); a process-local lock makes :meth:`exclusive` hold
    off this store's writers."""

    def __init__(self, spool: Spool, on_finished: Callable[[SeriesStatus], None] | None = None, *,
                 database: Database | None = None, owner: str = "local") -> None:
        """``on_finished`` is told each outcome :meth:`finish_job` records (``reader.metrics``);
        ``database`` None: the data dir's own SQLite file, ``<data_dir>/state.db``. JSON state left
        by an earlier version in the data dir is imported first (``reader.state.legacy``)."""
        self.spool = spool
        self._own_database = database is None
        self.database = database if database is not None else Database.open(None, spool.root)
        import_json_state(self.database, spool.root)
        self.owner = owner
        self._lock = threading.RLock()
        self._on_finished = on_finished
        self._arrival_upsert = _arrival_upsert(self.database.is_sqlite)  # built once: every C-STORE runs it

    @classmethod
    def open(cls, spool: Spool, database_url: str | None) -> JobStore:
        """A store on ``database_url`` (``[cluster] database``; None: the data dir's SQLite file),
        which it closes with :meth:`close` (``reader status``, ``retry``, ``purge``, ``backfill``)."""
        store = cls(spool, database=Database.open(database_url, spool.root))
        store._own_database = True
        return store

    def close(self) -> None:
        """Close the database this store opened itself (not one it was given)."""
        if self._own_database:
            self.database.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store's lock: no job is queued and no ticket written meanwhile by this store
        (``reader.retention`` decides and deletes under it; the retention of a cluster runs in one
        process at a time, :meth:`hold_lease`)."""
        with self._lock:
            yield

    def _read(self, work: Callable[[Connection], T]) -> T:
        return self.database.run(work, write=False)

    def _write(self, work: Callable[[Connection], T]) -> T:
        with self._lock:
            return self.database.run(work)

    # --- series ----------------------------------------------------------------------------
    def series_state(self, series_uid: str) -> SeriesState | None:
        """The recorded state of a series, if it was ever processed or queued."""
        def work(conn: Connection) -> SeriesState | None:
            stmt = sa.select(t.series).where(t.series.c.series_uid == series_uid)
            row = conn.execute(stmt).mappings().first()
            return None if row is None else _series_from(row)
        return self._read(work)

    def series_states(self) -> dict[str, SeriesState]:
        """Every recorded series state by Series Instance UID (the status pages, ``reader status``,
        retention)."""
        def work(conn: Connection) -> dict[str, SeriesState]:
            rows = conn.execute(sa.select(t.series).order_by(t.series.c.series_uid)).mappings()
            return {row["series_uid"]: _series_from(row) for row in rows}
        return self._read(work)

    def record_series(self, state: SeriesState) -> None:
        """Durably record a series outcome."""
        stamped = replace(state, updated_at=time.time())
        self._write(lambda conn: _upsert(conn, t.series, _series_row(stamped)))

    def enqueue_if_changed(self, study_uid: str, series_uid: str, instances: tuple[str, ...],
                           priority: int = 0, models: Collection[Mapping[str, str]] | None = None
                           ) -> ProcessJob | None:
        """Queue processing unless these instances were all already processed or queued.

        A new instance after processing gives a new result version that supersedes the old one;
        re-sent identical instances change nothing (idempotent), nor does a re-sent part of a
        series whose instances retention deleted (``reader.retention``): nothing in it is new;
        except that with ``models`` (the ``model_record`` of each model loaded now) a series done
        by none of them is read again (a study moved back by ``reader backfill`` after a model
        update). One transaction: the series' row is locked (or, for a new series, inserted, a
        concurrent insert failing on its key and retried), so two processes never queue the same
        instances twice.
        """
        instances = tuple(sorted(instances))

        def work(conn: Connection) -> ProcessJob | None:
            row = conn.execute(sa.select(t.series).where(t.series.c.series_uid == series_uid)
                               .with_for_update()).mappings().first()
            state = None if row is None else _series_from(row)
            if state is not None and set(instances) <= set(state.instances) and not (
                    models is not None and state.status is SeriesStatus.DONE and state.model not in models):
                return None
            version = 1 if state is None else state.version + 1
            job = ProcessJob(study_uid, series_uid, version, instances, priority)
            queued = _series_row(SeriesState(study_uid, series_uid, version, instances, SeriesStatus.QUEUED,
                                             updated_at=time.time()))
            if state is None:
                conn.execute(t.series.insert().values(queued))
            else:
                conn.execute(t.series.update().where(t.series.c.series_uid == series_uid).values(queued))
            _upsert(conn, t.jobs, _job_row(job))
            return job
        return self._write(work)

    def study_result_version(self, key: str, series_uid: str, instances: tuple[str, ...],
                             at_least: int) -> int:
        """The result version of a study lineage ``key`` (``reader.study.study_result_key``) for
        reading ``series_uid`` with ``instances``: the recorded one when that series and those
        instances were read last by the same job version (a job run again after a crash), else a
        new one above it and at least ``at_least`` (the job's series version, so a study of one
        series keeps its series' versions; a series read again with the same instances, by a newer
        model, is a new job version). Durable before it returns; a version is minted once
        (``UNIQUE(lineage, version)``: of two processes minting at once, one inserts, the other
        runs again and finds the winner's read)."""
        instances = tuple(sorted(instances))

        def work(conn: Connection) -> int:
            last = conn.execute(sa.select(t.study_reads).where(t.study_reads.c.lineage == key)
                                .order_by(t.study_reads.c.version.desc()).limit(1)
                                .with_for_update()).mappings().first()
            if (last is not None and int(last["job_version"]) == at_least and last["series_uid"] == series_uid
                    and tuple(json.loads(last["instances"])) == instances):
                return int(last["version"])
            version = max(at_least, 1 if last is None else int(last["version"]) + 1)
            conn.execute(t.study_reads.insert().values(lineage=key, version=version, series_uid=series_uid,
                                                       instances=json.dumps(list(instances)),
                                                       job_version=at_least))
            return version
        return self._write(work)

    def earlier_results(self, lineage: str, version: int) -> list[tuple[str, int]]:
        """(series UID, version) of the results of ``lineage`` before ``version``, newest first: a
        study's lineage (:meth:`study_result_version`), or a series' own earlier versions."""
        def work(conn: Connection) -> list[tuple[str, int]]:
            rows = conn.execute(sa.select(t.study_reads.c.series_uid, t.study_reads.c.version)
                                .where(t.study_reads.c.lineage == lineage)
                                .order_by(t.study_reads.c.id.desc())).all()
            return [(str(r.series_uid), int(r.version)) for r in rows]
        reads: list[tuple[str, int]] = self._read(work)
        if not reads:
            return [(lineage, v) for v in range(version - 1, 0, -1)]
        return [(s, v) for s, v in reads if v < version]

    def lineages(self) -> dict[str, tuple[str, ...]]:
        """Every study lineage and the series its versions read (``reader.retention``)."""
        def work(conn: Connection) -> dict[str, tuple[str, ...]]:
            found: dict[str, list[str]] = {}
            for r in conn.execute(sa.select(t.study_reads.c.lineage, t.study_reads.c.series_uid)
                                  .order_by(t.study_reads.c.id)):
                found.setdefault(str(r.lineage), []).append(str(r.series_uid))
            return {k: tuple(v) for k, v in found.items()}
        return self._read(work)

    def delete_lineages(self, keys: Collection[str]) -> None:
        """Forget study lineages (``reader.retention``: none of their series is left, or purged)."""
        if keys:
            self._write(lambda conn: conn.execute(
                t.study_reads.delete().where(t.study_reads.c.lineage.in_(list(keys)))))

    def requeue_series(self, state: SeriesState) -> ProcessJob:
        """Queue a series again as its next version with the instances it had (e.g. a study's
        second choice, once its first choice was rejected); durable before it returns."""
        job = ProcessJob(state.study_uid, state.series_uid, state.version + 1, state.instances)

        def work(conn: Connection) -> ProcessJob:
            _upsert(conn, t.jobs, _job_row(job))
            _upsert(conn, t.series, _series_row(SeriesState(
                state.study_uid, state.series_uid, job.version, state.instances, SeriesStatus.QUEUED,
                updated_at=time.time())))
            return job
        return self._write(work)

    def delete_series_history(self, series_uid: str, sends: Collection[str] = ()) -> None:
        """Forget a series: its send tickets named in ``sends``, and its state (``reader.retention``)."""
        def work(conn: Connection) -> None:
            if sends:
                conn.execute(t.sends.delete().where(t.sends.c.name.in_(list(sends))))
            conn.execute(t.series.delete().where(t.series.c.series_uid == series_uid))
        self._write(work)

    # --- processing jobs -------------------------------------------------------------------
    def _select_jobs(self, where: Sequence[sa.ColumnElement[bool]], limit: int | None = None
                     ) -> list[ProcessJob]:
        def work(conn: Connection) -> list[ProcessJob]:
            rows = conn.execute(sa.select(t.jobs).where(*where)
                                .order_by(t.jobs.c.priority.desc(), t.jobs.c.created_at).limit(limit))
            return [_job_from(r) for r in rows.mappings()]
        return self._read(work)

    def queued_jobs(self) -> list[ProcessJob]:
        """Every queued job, claimed ones included, highest priority first, then oldest first
        (retention, ``reader status``, the pages)."""
        return self._select_jobs(())

    def pending_jobs(self, limit: int | None = None) -> list[ProcessJob]:
        """Queued jobs this store may work on, highest priority first, then oldest first: those
        leased by another owner whose lease has not expired are left out. ``limit``: only the
        first so many (a worker looks at the head of the queue, however long it is)."""
        return self._select_jobs((_unclaimed(t.jobs, self.owner, time.time()),), limit)

    def claim_job(self, job: ProcessJob, lease_s: float) -> bool:
        """Claim ``job`` for ``lease_s`` seconds: True when its row is still this version and
        unclaimed, its lease expired, or ours already (then the lease is extended). One
        conditional UPDATE: of two owners claiming at once, exactly one wins."""
        now = time.time()
        stmt = (t.jobs.update()
                .where(t.jobs.c.series_uid == job.series_uid, t.jobs.c.version == job.version,
                       _unclaimed(t.jobs, self.owner, now))
                .values(claimed_by=self.owner, lease_until=now + lease_s))
        return self._write(lambda conn: conn.execute(stmt).rowcount == 1)

    def renew_job_leases(self, series_uids: Collection[str], lease_s: float) -> None:
        """Extend this owner's leases on the jobs of ``series_uids`` to ``lease_s`` from now."""
        if series_uids:
            stmt = (t.jobs.update().where(t.jobs.c.series_uid.in_(list(series_uids)),
                                          t.jobs.c.claimed_by == self.owner)
                    .values(lease_until=time.time() + lease_s))
            self._write(lambda conn: conn.execute(stmt))

    def release_job(self, job: ProcessJob) -> None:
        """Drop this owner's claim on ``job`` (dropped without an outcome: it stays queued)."""
        stmt = (t.jobs.update().where(t.jobs.c.series_uid == job.series_uid, t.jobs.c.version == job.version,
                                      t.jobs.c.claimed_by == self.owner)
                .values(claimed_by=None, lease_until=None))
        self._write(lambda conn: conn.execute(stmt))

    def delete_job(self, series_uid: str) -> bool:
        """Drop a series' queued job whatever its version (``reader purge``); True when there was one."""
        stmt = t.jobs.delete().where(t.jobs.c.series_uid == series_uid)
        return self._write(lambda conn: conn.execute(stmt).rowcount > 0)

    def finish_job(self, job: ProcessJob, status: SeriesStatus, reason: str = "",
                   flag: dict[str, Any] | None = None, model: dict[str, str] | None = None, *,
                   timeline: dict[str, float] | None = None) -> None:
        """Record the outcome of a job and remove its ticket (unless a newer version replaced it);
        ``timeline``: the wall-clock times of its steps (:attr:`SeriesState.timeline`)."""
        steps = {"complete": job.created_at, **(timeline or {})}

        def work(conn: Connection) -> bool:
            version = conn.execute(sa.select(t.jobs.c.version).where(t.jobs.c.series_uid == job.series_uid)
                                   .with_for_update()).scalar()
            if version is None or int(version) != job.version:
                return False  # a newer version is queued; its own outcome will be recorded
            _upsert(conn, t.series, _series_row(SeriesState(
                job.study_uid, job.series_uid, job.version, job.instances, status, reason,
                updated_at=time.time(), flag=flag, model=model, timeline=steps)))
            conn.execute(t.jobs.delete().where(t.jobs.c.series_uid == job.series_uid))
            return True
        if self._write(work) and self._on_finished is not None:
            self._on_finished(status)

    def job_is_current(self, job: ProcessJob) -> bool:
        """False when a newer version of the series was queued after this job was read."""
        stmt = sa.select(t.jobs.c.version).where(t.jobs.c.series_uid == job.series_uid)
        version = self._read(lambda conn: conn.execute(stmt).scalar())
        return version is not None and int(version) == job.version

    # --- send tickets ----------------------------------------------------------------------
    def add_send(self, series_uid: str, version: int, destination: str, files: list[Path],
                 lineage: str = "") -> SendTicket:
        """Create (idempotently) the ticket for sending a result version to a destination,
        superseding pending tickets of older versions of the same lineage (the series, or the
        study it was read for) to the same place. One transaction; a concurrent creation of the
        same ticket fails on its key and the retry returns the winner's."""
        line = lineage or series_uid
        digest = hashlib.sha256(destination.encode()).hexdigest()[:12]
        name = f"{series_uid}-v{version}-{digest}"

        def work(conn: Connection) -> SendTicket:
            now = time.time()
            conn.execute(t.sends.update()
                         .where(t.sends.c.line == line, t.sends.c.destination == destination,
                                t.sends.c.version < version, t.sends.c.state == SendState.PENDING.value)
                         .values(state=SendState.SUPERSEDED.value, updated_at=now))
            existing = conn.execute(sa.select(t.sends).where(t.sends.c.name == name)).mappings().first()
            if existing is not None:
                return _send_from(existing)
            ticket = SendTicket(name, series_uid, version, destination, tuple(str(f) for f in files),
                                lineage=lineage, updated_at=now)
            conn.execute(t.sends.insert().values(_send_row(ticket)))
            return ticket
        return self._write(work)

    def send(self, name: str) -> SendTicket | None:
        """One send ticket by name, pending or settled."""
        def work(conn: Connection) -> SendTicket | None:
            row = conn.execute(sa.select(t.sends).where(t.sends.c.name == name)).mappings().first()
            return None if row is None else _send_from(row)
        return self._read(work)

    def _select_sends(self, where: Sequence[sa.ColumnElement[bool]]) -> list[SendTicket]:
        def work(conn: Connection) -> list[SendTicket]:
            rows = conn.execute(sa.select(t.sends).where(*where)
                                .order_by(t.sends.c.created_at, t.sends.c.name))
            return [_send_from(r) for r in rows.mappings()]
        return self._read(work)

    def sends(self) -> list[SendTicket]:
        """All send tickets, settled ones included, oldest first (``reader status``)."""
        return self._select_sends(())

    def series_sends(self, series_uid: str) -> list[SendTicket]:
        """The send tickets of one series' result versions, settled ones included, oldest first."""
        return self._select_sends((t.sends.c.series_uid == series_uid,))

    def pending_sends(self) -> list[SendTicket]:
        """Pending send tickets, oldest first; reads none of the settled ones (the state index),
        and leaves out those leased by another owner whose lease has not expired."""
        return self._select_sends((t.sends.c.state == SendState.PENDING.value,
                                   _unclaimed(t.sends, self.owner, time.time())))

    def claim_send(self, name: str, lease_s: float) -> SendTicket | None:
        """Lease a pending, due ticket not leased by another owner for ``lease_s`` seconds and
        return it; None when it is not (any more) to be attempted by us. :meth:`update_send`
        clears the claim."""
        now = time.time()

        def work(conn: Connection) -> SendTicket | None:
            claimed = conn.execute(
                t.sends.update().where(t.sends.c.name == name, t.sends.c.state == SendState.PENDING.value,
                                       t.sends.c.next_attempt_at <= now, _unclaimed(t.sends, self.owner, now))
                .values(claimed_by=self.owner, lease_until=now + lease_s)).rowcount
            if claimed != 1:
                return None
            row = conn.execute(sa.select(t.sends).where(t.sends.c.name == name)).mappings().one()
            return _send_from(row)
        return self._write(work)

    def update_send(self, ticket: SendTicket) -> None:
        """Durably record a send ticket's new state, and clear its claim.

        A ticket superseded or cancelled meanwhile (a newer result version was queued, or an
        operator cancelled it, while this one was being attempted) stays so unless the attempt
        delivered it: a stale copy must not put it back in the queue, or the older version could
        reach the PACS after the newer one.
        """
        def work(conn: Connection) -> None:
            row = conn.execute(sa.select(t.sends.c.state, t.sends.c.last_error)
                               .where(t.sends.c.name == ticket.name).with_for_update()).first()
            written = ticket
            if (row is not None and row.state in (SendState.SUPERSEDED.value, SendState.CANCELLED.value)
                    and ticket.state is not SendState.DONE):
                written = replace(ticket, state=SendState(row.state), last_error=row.last_error)
            _upsert(conn, t.sends, _send_row(replace(written, updated_at=time.time())))
        self._write(work)

    def _requeue(self, where: sa.ColumnElement[bool]) -> list[SendTicket]:
        def work(conn: Connection) -> list[SendTicket]:
            rows = conn.execute(sa.select(t.sends).where(where).order_by(t.sends.c.created_at)
                                .with_for_update()).mappings().all()
            fresh = [replace(_send_from(r), state=SendState.PENDING, attempts=0, next_attempt_at=0.0,
                             updated_at=time.time()) for r in rows]
            for ticket in fresh:
                _upsert(conn, t.sends, _send_row(ticket))
            return fresh
        return self._write(work)

    def requeue_failed(self) -> list[SendTicket]:
        """Put parked (failed) send tickets back in the queue, attempts reset; returns them."""
        return self._requeue(t.sends.c.state == SendState.FAILED.value)

    def requeue_send(self, name: str) -> SendTicket | None:
        """Put one parked (failed) or cancelled ticket back in the queue, attempts reset; None when
        there is no such ticket or it is pending, done or superseded."""
        requeued = self._requeue(sa.and_(t.sends.c.name == name, t.sends.c.state.in_(
            [SendState.FAILED.value, SendState.CANCELLED.value])))
        return requeued[0] if requeued else None

    def cancel_send(self, name: str, reason: str) -> SendTicket | None:
        """Cancel one pending or parked ticket, recording ``reason`` as its last error; None when
        there is no such ticket or it is already settled otherwise (done, superseded, cancelled)."""
        def work(conn: Connection) -> SendTicket | None:
            row = conn.execute(sa.select(t.sends).where(t.sends.c.name == name).with_for_update()
                               ).mappings().first()
            if row is None or row["state"] not in (SendState.PENDING.value, SendState.FAILED.value):
                return None
            cancelled = replace(_send_from(row), state=SendState.CANCELLED, last_error=reason,
                                updated_at=time.time())
            _upsert(conn, t.sends, _send_row(cancelled))
            return cancelled
        return self._write(work)

    def delete_sends(self, names: Collection[str]) -> None:
        """Forget send tickets, whatever their state (``reader purge``)."""
        if names:
            self._write(lambda conn: conn.execute(t.sends.delete().where(t.sends.c.name.in_(list(names)))))

    # --- arrivals (completion across receivers) ----------------------------------------------
    def record_arrival(self, study_uid: str, series_uid: str, at: float, stat: bool = False) -> None:
        """Note that an instance of the series was stored at ``at`` (wall clock): the row keeps
        the latest time and whether any instance asked for STAT. One upsert statement (INSERT ...
        ON CONFLICT DO UPDATE, in both engines), outside the store's lock: every C-STORE of a
        cluster's receiver calls this from its association's thread before answering."""
        values = {"study_uid": study_uid, "series_uid": series_uid, "last_instance_at": at, "stat": stat}
        self.database.run(lambda conn: conn.execute(self._arrival_upsert, values))

    def latest_arrival(self, study_uid: str) -> float | None:
        """The latest instance time recorded for any series of the study; None when none is."""
        stmt = (sa.select(sa.func.max(t.arrivals.c.last_instance_at))
                .where(t.arrivals.c.study_uid == study_uid))
        value = self._read(lambda conn: conn.execute(stmt).scalar())
        return None if value is None else float(value)

    def study_arrivals(self, study_uid: str) -> list[Arrival]:
        """The study's rows, by series: what every receiver recorded of it and not yet cleared."""
        stmt = (sa.select(t.arrivals).where(t.arrivals.c.study_uid == study_uid)
                .order_by(t.arrivals.c.series_uid))
        return self._read(
            lambda conn: [_arrival_from(r) for r in conn.execute(stmt).mappings()])

    def clear_arrivals(self, study_uid: str, not_after: float) -> list[Arrival]:
        """Delete and return the study's rows whose last instance is at or before ``not_after``
        (those a completing receiver has seen; a later one stays for the receiver that stored it)."""
        def work(conn: Connection) -> list[Arrival]:
            where = (t.arrivals.c.study_uid == study_uid, t.arrivals.c.last_instance_at <= not_after)
            rows = conn.execute(sa.select(t.arrivals).where(*where).order_by(t.arrivals.c.series_uid)
                                .with_for_update()).mappings().all()
            found = [_arrival_from(r) for r in rows]
            for a in found:
                conn.execute(t.arrivals.delete().where(
                    t.arrivals.c.study_uid == a.study_uid, t.arrivals.c.series_uid == a.series_uid,
                    t.arrivals.c.last_instance_at == a.last_instance_at))
            return found
        return self._write(work)

    def stale_arrivals(self, older_than: float) -> list[Arrival]:
        """Rows whose last instance is before ``older_than`` (a wall-clock time: now minus the idle
        timeout), by study: what a dead receiver left, for any receiver to adopt."""
        stmt = (sa.select(t.arrivals).where(t.arrivals.c.last_instance_at < older_than)
                .order_by(t.arrivals.c.study_uid, t.arrivals.c.series_uid))
        return self._read(
            lambda conn: [_arrival_from(r) for r in conn.execute(stmt).mappings()])

    # --- named leases and counts -------------------------------------------------------------
    def hold_lease(self, name: str, lease_s: float) -> bool:
        """Take or extend the named lease (e.g. "retention") for ``lease_s`` seconds: True when it
        was free, expired or ours; False while another owner holds it unexpired."""
        def work(conn: Connection) -> bool:
            now = time.time()
            row = conn.execute(sa.select(t.leases).where(t.leases.c.name == name).with_for_update()
                               ).mappings().first()
            if row is None:
                conn.execute(t.leases.insert().values(name=name, owner=self.owner, lease_until=now + lease_s))
                return True
            if row["owner"] != self.owner and float(row["lease_until"]) >= now:
                return False
            conn.execute(t.leases.update().where(t.leases.c.name == name)
                         .values(owner=self.owner, lease_until=now + lease_s))
            return True
        return self._write(work)

    def queue_counts(self) -> dict[str, int]:
        """``jobs``: queued jobs (claimed ones included); ``sends``: pending send tickets
        (``reader.node.Node.queue_depths``, the metrics)."""
        def work(conn: Connection) -> dict[str, int]:
            jobs = conn.execute(sa.select(sa.func.count()).select_from(t.jobs)).scalar() or 0
            sends = conn.execute(sa.select(sa.func.count()).select_from(t.sends)
                                 .where(t.sends.c.state == SendState.PENDING.value)).scalar() or 0
            return {"jobs": int(jobs), "sends": int(sends)}
        return self._read(work)
