"""Durable work tickets: what each stage owes the next, kept in the spool as JSON.

- :class:`SeriesState`: which instances of a series were last processed, as which result version.
- :class:`ProcessJob`: a complete series waiting for route -> volume -> infer -> encode.
- a study's result lineage (``state/studies/``, :meth:`JobStore.study_result_version`): which series
  and instances each result version of a study read (``reader.study``) came from;
- :class:`SendTicket`: result files owed to one destination, with attempts and the next retry;
  pending ones in ``state/sends/``, settled ones (done, superseded, parked) moved to
  ``state/sends-archive/`` so that the dispatcher's frequent passes read only pending work.

A ticket is written before the work it describes starts and updated after it ends, so a restart
finds every piece of unfinished work. Later stages (worklist flags, HL7, webhooks) add ticket kinds
of the same shape.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from reader.spool import Spool

__all__ = ["JobStore", "ProcessJob", "SendState", "SendTicket", "SeriesState", "SeriesStatus", "backoff"]


_SENDS = "sends"  # state/sends/: pending send tickets
_ARCHIVE = "sends-archive"  # state/sends-archive/: settled ones (done, superseded, parked)


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


def backoff(attempts: int, initial: timedelta, maximum: timedelta, rng: random.Random) -> timedelta:
    """Exponential backoff with full jitter: uniform in [initial/2, min(max, initial * 2^(n-1))]."""
    ceiling = min(maximum.total_seconds(), initial.total_seconds() * 2 ** max(0, attempts - 1))
    low = min(initial.total_seconds() / 2, ceiling)
    return timedelta(seconds=rng.uniform(low, ceiling))


def _dump(obj: Any) -> dict[str, Any]:
    data = asdict(obj)
    for k, v in data.items():
        if isinstance(v, tuple):
            data[k] = list(v)
        elif isinstance(v, enum.Enum):
            data[k] = v.value
    return data


class JobStore:
    """Reads and writes tickets in a :class:`Spool`; one lock makes read-modify-write safe."""

    def __init__(self, spool: Spool, on_finished: Callable[[SeriesStatus], None] | None = None) -> None:
        """``on_finished`` is told each outcome :meth:`finish_job` records (``reader.metrics``)."""
        self.spool = spool
        self._lock = threading.Lock()
        self._on_finished = on_finished

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store's lock: no job is queued and no ticket written meanwhile (``reader.retention``
        decides and deletes under it). Call no other locking method of the store inside."""
        with self._lock:
            yield

    # --- series ----------------------------------------------------------------------------
    def series_state(self, series_uid: str) -> SeriesState | None:
        """The recorded state of a series, if it was ever processed or queued."""
        raw = self.spool.read_state("series", series_uid)
        if raw is None:
            return None
        return SeriesState(
            study_uid=raw["study_uid"], series_uid=raw["series_uid"], version=int(raw["version"]),
            instances=tuple(raw["instances"]), status=SeriesStatus(raw["status"]),
            reason=raw.get("reason", ""), updated_at=float(raw.get("updated_at", 0.0)),
            flag=raw.get("flag"), model=raw.get("model"), timeline=raw.get("timeline"),
        )

    def series_states(self) -> dict[str, SeriesState]:
        """Every recorded series state by Series Instance UID (the status pages, ``reader status``,
        retention)."""
        return {n: s for n in self.spool.list_state("series") if (s := self.series_state(n)) is not None}

    def record_series(self, state: SeriesState) -> None:
        """Durably record a series outcome."""
        self.spool.write_state("series", state.series_uid, _dump(replace(state, updated_at=time.time())))

    def enqueue_if_changed(self, study_uid: str, series_uid: str, instances: tuple[str, ...],
                           priority: int = 0, models: Collection[Mapping[str, str]] | None = None
                           ) -> ProcessJob | None:
        """Queue processing unless these instances were all already processed or queued.

        A new instance after processing gives a new result version that supersedes the old one;
        re-sent identical instances change nothing (idempotent), nor does a re-sent part of a
        series whose instances retention deleted (``reader.retention``): nothing in it is new;
        except that with ``models`` (the ``model_record`` of each model loaded now) a series done
        by none of them is read again (a study moved back by ``reader backfill`` after a model
        update).
        """
        with self._lock:
            instances = tuple(sorted(instances))
            state = self.series_state(series_uid)
            if state is not None and set(instances) <= set(state.instances) and not (
                    models is not None and state.status is SeriesStatus.DONE and state.model not in models):
                return None
            version = 1 if state is None else state.version + 1
            job = ProcessJob(study_uid, series_uid, version, instances, priority)
            self.spool.write_state("jobs", series_uid, _dump(job))
            self.record_series(SeriesState(study_uid, series_uid, version, instances, SeriesStatus.QUEUED))
            return job

    def study_result_version(self, key: str, series_uid: str, instances: tuple[str, ...],
                             at_least: int) -> int:
        """The result version of a study lineage ``key`` (``reader.study.study_result_key``) for
        reading ``series_uid`` with ``instances``: the recorded one when that series and those
        instances were read last by the same job version (a job run again after a crash), else a
        new one above it and at least ``at_least`` (the job's series version, so a study of one
        series keeps its series' versions; a series read again with the same instances, by a newer
        model, is a new job version). Durable before it returns."""
        with self._lock:
            instances = tuple(sorted(instances))
            raw = self.spool.read_state("studies", key)
            reads: list[dict[str, Any]] = [] if raw is None else raw["reads"]
            last = reads[-1] if reads else None
            same_job = last is not None and int(last.get("job_version", at_least)) == at_least
            if (last is not None and same_job and last["series_uid"] == series_uid
                    and tuple(last["instances"]) == instances):
                return int(last["version"])
            version = max(at_least, 1 if last is None else int(last["version"]) + 1)
            reads.append({"series_uid": series_uid, "instances": list(instances), "version": version,
                          "job_version": at_least})
            self.spool.write_state("studies", key, {"reads": reads})
            return version

    def earlier_results(self, lineage: str, version: int) -> list[tuple[str, int]]:
        """(series UID, version) of the results of ``lineage`` before ``version``, newest first: a
        study's lineage (:meth:`study_result_version`), or a series' own earlier versions."""
        raw = self.spool.read_state("studies", lineage)
        if raw is None:
            return [(lineage, v) for v in range(version - 1, 0, -1)]
        return [(str(r["series_uid"]), int(r["version"])) for r in reversed(raw["reads"])
                if int(r["version"]) < version]

    def requeue_series(self, state: SeriesState) -> ProcessJob:
        """Queue a series again as its next version with the instances it had (e.g. a study's
        second choice, once its first choice was rejected); durable before it returns."""
        with self._lock:
            job = ProcessJob(state.study_uid, state.series_uid, state.version + 1, state.instances)
            self.spool.write_state("jobs", state.series_uid, _dump(job))
            self.record_series(SeriesState(state.study_uid, state.series_uid, job.version, state.instances,
                                           SeriesStatus.QUEUED))
            return job

    # --- processing jobs -------------------------------------------------------------------
    def pending_jobs(self) -> list[ProcessJob]:
        """Queued jobs, highest priority first, then oldest first."""
        jobs = []
        for name in self.spool.list_state("jobs"):
            raw = self.spool.read_state("jobs", name)
            if raw is not None:
                raw["instances"] = tuple(raw["instances"])
                jobs.append(ProcessJob(**raw))
        return sorted(jobs, key=lambda j: (-j.priority, j.created_at))

    def finish_job(self, job: ProcessJob, status: SeriesStatus, reason: str = "",
                   flag: dict[str, Any] | None = None, model: dict[str, str] | None = None, *,
                   timeline: dict[str, float] | None = None) -> None:
        """Record the outcome of a job and remove its ticket (unless a newer version replaced it);
        ``timeline``: the wall-clock times of its steps (:attr:`SeriesState.timeline`)."""
        with self._lock:
            if not self.job_is_current(job):
                return  # a newer version is queued; its own outcome will be recorded
            steps = {"complete": job.created_at, **(timeline or {})}
            self.record_series(SeriesState(job.study_uid, job.series_uid, job.version, job.instances,
                                           status, reason, flag=flag, model=model, timeline=steps))
            self.spool.delete_state("jobs", job.series_uid)
        if self._on_finished is not None:
            self._on_finished(status)

    def job_is_current(self, job: ProcessJob) -> bool:
        """False when a newer version of the series was queued after this job was read."""
        raw = self.spool.read_state("jobs", job.series_uid)
        return raw is not None and int(raw["version"]) == job.version

    # --- send tickets ----------------------------------------------------------------------
    # Pending tickets live in state/sends/; settled ones (done, superseded, parked) move to
    # state/sends-archive/, so the dispatcher, which lists pending work every few seconds, never
    # re-reads the years of tickets already settled. A move is: the new state written in
    # state/sends/ (durable, atomic), a copy written in the archive, the original deleted; the
    # reverse (``requeue_failed``) writes state/sends/ first and then deletes the archived copy.
    # Where a crash leaves both copies, the one in state/sends/ is the truth.
    def add_send(self, series_uid: str, version: int, destination: str, files: list[Path],
                 lineage: str = "") -> SendTicket:
        """Create (idempotently) the ticket for sending a result version to a destination,
        superseding pending tickets of older versions of the same lineage (the series, or the
        study it was read for) to the same place."""
        line = lineage or series_uid
        with self._lock:
            for old in self._active():
                if (old.line == line and old.destination == destination
                        and old.version < version and old.state is SendState.PENDING):
                    self._write_send(replace(old, state=SendState.SUPERSEDED))
            digest = hashlib.sha256(destination.encode()).hexdigest()[:12]
            name = f"{series_uid}-v{version}-{digest}"
            existing = self.send(name)
            if existing is not None:
                return existing
            ticket = SendTicket(name, series_uid, version, destination, tuple(str(f) for f in files),
                                lineage=lineage)
            self._write_send(ticket)
            return ticket

    def send(self, name: str) -> SendTicket | None:
        """One send ticket by name, pending or settled."""
        return self._read_send(_SENDS, name) or self._read_send(_ARCHIVE, name)

    def sends(self) -> list[SendTicket]:
        """All send tickets, settled ones included, oldest first (``reader status``)."""
        active = {t.name: t for t in self._active()}  # listed first: a ticket moving is never missed
        archived = [t for n in self.spool.list_state(_ARCHIVE)
                    if n not in active and (t := self._read_send(_ARCHIVE, n)) is not None]
        return sorted([*active.values(), *archived], key=lambda t: t.created_at)

    def pending_sends(self) -> list[SendTicket]:
        """Pending send tickets, oldest first; reads none of the settled ones. A settled ticket
        still among the pending ones (a crash mid-move, or a data dir from before the archive)
        is moved to the archive on the way."""
        pending = []
        for ticket in self._active():
            if ticket.state is SendState.PENDING:
                pending.append(ticket)
            else:
                with self._lock:
                    current = self._read_send(_SENDS, ticket.name)
                    if current is not None and current.state is not SendState.PENDING:
                        self._archive(current)
        return sorted(pending, key=lambda t: t.created_at)

    def update_send(self, ticket: SendTicket) -> None:
        """Durably record a send ticket's new state.

        A ticket superseded or cancelled meanwhile (a newer result version was queued, or an
        operator cancelled it, while this one was being attempted) stays so unless the attempt
        delivered it: a stale copy must not put it back in the queue, or the older version could
        reach the PACS after the newer one.
        """
        with self._lock:
            current = self.send(ticket.name)
            if (current is not None and current.state in (SendState.SUPERSEDED, SendState.CANCELLED)
                    and ticket.state is not SendState.DONE):
                ticket = replace(ticket, state=current.state, last_error=current.last_error)
            self._write_send(ticket)

    def requeue_failed(self) -> list[SendTicket]:
        """Put parked (failed) send tickets back in the queue, attempts reset; returns them."""
        with self._lock:
            requeued = []
            for t in self.sends():
                if t.state is SendState.FAILED:
                    fresh = replace(t, state=SendState.PENDING, attempts=0, next_attempt_at=0.0)
                    self._write_send(fresh)
                    requeued.append(fresh)
            return requeued

    def requeue_send(self, name: str) -> SendTicket | None:
        """Put one parked (failed) or cancelled ticket back in the queue, attempts reset; None when
        there is no such ticket or it is pending, done or superseded."""
        with self._lock:
            ticket = self.send(name)
            if ticket is None or ticket.state not in (SendState.FAILED, SendState.CANCELLED):
                return None
            fresh = replace(ticket, state=SendState.PENDING, attempts=0, next_attempt_at=0.0)
            self._write_send(fresh)
            return fresh

    def cancel_send(self, name: str, reason: str) -> SendTicket | None:
        """Cancel one pending or parked ticket, recording ``reason`` as its last error; None when
        there is no such ticket or it is already settled otherwise (done, superseded, cancelled)."""
        with self._lock:
            ticket = self.send(name)
            if ticket is None or ticket.state not in (SendState.PENDING, SendState.FAILED):
                return None
            cancelled = replace(ticket, state=SendState.CANCELLED, last_error=reason)
            self._write_send(cancelled)
            return cancelled

    def _active(self) -> list[SendTicket]:
        return [t for n in self.spool.list_state(_SENDS) if (t := self._read_send(_SENDS, n)) is not None]

    def _read_send(self, kind: str, name: str) -> SendTicket | None:
        raw = self.spool.read_state(kind, name)
        if raw is None:
            return None
        raw["files"] = tuple(raw["files"])
        raw["state"] = SendState(raw["state"])
        return SendTicket(**raw)

    def _write_send(self, ticket: SendTicket) -> None:
        """Write the ticket's state where the dispatcher looks; a settled one then moves to the
        archive, a pending one leaves it."""
        ticket = replace(ticket, updated_at=time.time())
        self.spool.write_state(_SENDS, ticket.name, _dump(ticket))
        if ticket.state is SendState.PENDING:
            self.spool.delete_state(_ARCHIVE, ticket.name)
        else:
            self._archive(ticket)

    def _archive(self, ticket: SendTicket) -> None:
        self.spool.write_state(_ARCHIVE, ticket.name, _dump(ticket))
        self.spool.delete_state(_SENDS, ticket.name)
