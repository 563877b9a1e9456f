"""The running node: a listener and five workers handing over through durable tickets and, between
the processing stages, bounded in-memory hand-offs.

    StorageSCP --(instances on disk + tracker)--> completion --(ProcessJob on disk)--> loader
    --(ready: a prepared volume)--> inference --(handed: a model result)--> finishing
    --(results on disk + SendTicket)--> dispatch --> destinations

The three processing workers run the stages of ``reader.pipeline.Pipeline`` one series each, so
the next series is routed and decoded while the model runs, and the previous one is encoded and
written beside the next inference; receiving and sending go on all along. Each hand-off holds one
item (:class:`StageBoard`), so memory stays bounded: at most one decoded volume waits for the
model, two only while a higher-priority (STAT) series overtakes one that was already decoded (set
aside, it runs next). The inference worker always takes the highest-priority work: it waits for a
STAT series being decoded rather than start routine work already decoded.

A sixth worker, retention (``reader.retention``), deletes at start and every
``retention.sweep_minutes`` what is delivered and past its retention, and, under disk pressure, the
longest-settled data first; the node holds the data dir's lock (``node.lock``) while it runs.

All state needed to resume lives in the spool: a job's ticket is deleted only once its outcome is
recorded (``reader.jobs.JobStore.finish_job``), so :meth:`Node.start` after a crash picks up
collecting series, queued jobs (whichever stage held them) and pending sends. :meth:`Node.stop`
stops accepting, lets the load, the inference and the encoding in progress end (the decoded volumes
still waiting are dropped: their jobs stay queued on disk), and returns.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import IO, TypeVar

import pydicom
import structlog

from reader.assemble import CompleteSeries, CompletionTracker
from reader.associations import AssociationLog
from reader.audit import AuditTrail
from reader.config import Device, NodeConfig, Role
from reader.dicomweb import StowDestination
from reader.dispatch import Delivery, DicomDelivery, Dispatcher, MllpDelivery, StowDelivery, WebhookDelivery
from reader.errors import DatabaseUnavailable, StorageError
from reader.holds import StudyHold
from reader.inference import ModelPackage
from reader.jobs import JobStore, ProcessJob, SeriesStatus
from reader.metrics import STAGE_ENCODING, STAGE_INFERENCE, STAGE_LOAD, NodeMetrics
from reader.pipeline import Inferred, Pipeline, Prepared, model_record, send_key
from reader.results import load_standard_tables
from reader.retention import Retention
from reader.scp import StorageSCP
from reader.send import StoreSCU
from reader.spool import Spool
from reader.state import Database
from reader.web import PagesContext, Readiness, WebContext, WebServer, build_app

__all__ = ["PRIORITY_ROUTINE", "PRIORITY_STAT", "Node", "StageBoard", "load_models", "run_guarded"]

log = structlog.get_logger(__name__)

PRIORITY_ROUTINE = 0
PRIORITY_STAT = 1  # processed before routine work already queued (reader.jobs orders by priority)

_IDLE_POLL_S = 5.0  # the loader re-reads the queue at least this often (a single node)
_LISTED_JOBS = 16  # the loader looks at the best this many queued jobs each time
_ADOPT_EVERY_S = 5.0  # how often a cluster's receiver looks for studies a dead receiver left
_T = TypeVar("_T")


def load_models(config: NodeConfig, device: Device | None = None) -> dict[str, ModelPackage]:
    """Load every model a route refers to, once; raises ModelError (ManifestError) on a bad package.

    ``device`` (``reader serve --device``) replaces the configured providers: ``cpu`` the CPU
    provider only, ``cuda:N`` CUDA on GPU N then the CPU; None: ``[inference] providers``.
    """
    names = sorted({r.model for r in config.routes})
    providers = config.inference.providers if device is None else device.providers
    options = None if device is None else device.provider_options
    return {
        name: ModelPackage.load(config.model(name).path, providers=providers,
                                fp16=config.inference.fp16, provider_options=options)
        for name in names
    }


def _targets(config: NodeConfig, scu: StoreSCU) -> dict[str, Delivery]:
    """Every configured send target by the key its tickets carry."""
    targets: dict[str, Delivery] = {
        send_key(d): StowDelivery(d) if isinstance(d, StowDestination) else DicomDelivery(scu, d)
        for d in config.destinations}
    targets.update({h.endpoint.key: MllpDelivery(h.endpoint) for h in config.worklist.hl7})
    targets.update({w.endpoint.key: WebhookDelivery(w.endpoint) for w in config.worklist.webhooks})
    return targets


def _rank(job: ProcessJob) -> tuple[int, float]:
    """Queue order: highest priority first, then oldest first (as ``JobStore.pending_jobs``)."""
    return -job.priority, job.created_at


def _key(job: ProcessJob) -> tuple[str, int]:
    return job.series_uid, job.version


def run_guarded(name: str, loop: Callable[[], None], stopping: threading.Event,
                backoff_s: float = 1.0) -> None:
    """Run the worker loop ``loop`` until it returns or ``stopping`` is set. What ends it by an
    error is logged and the loop starts again after ``backoff_s``: a storage or database error as
    ``worker.storage_error`` (disk trouble, the state database out of reach), any other as
    ``worker.crashed`` with its traceback. A worker thread never ends silently while the process
    keeps answering as if it worked."""
    while not stopping.is_set():
        try:
            loop()
            return
        except StorageError as exc:
            log.error("worker.storage_error", worker=name, detail=str(exc))
        except Exception:
            log.exception("worker.crashed", worker=name)
        stopping.wait(backoff_s)


class StageBoard:
    """Which job each processing stage holds, and the bounded hand-offs between the stages.

    One condition variable guards it all; every change wakes every waiting worker. The queue of
    jobs itself stays on disk: the board only knows the jobs the loader listed and the completion
    worker submitted (``queued``), and which of them a stage has claimed.

    - ``loading``: the job the loader is routing and decoding;
    - ``ready``: prepared volumes waiting for the model; one, or two while a higher-priority job
      overtakes (the loader may then decode it although one already waits);
    - ``inferring``: the job the model runs on;
    - ``handed``: one model result waiting for the finishing worker (capacity 1);
    - ``finishing``: the job being encoded and written.
    """

    def __init__(self, on_release: Callable[[ProcessJob], None] | None = None) -> None:
        """``on_release`` is told, outside the board's lock, of every job a stage lets go of (its
        outcome recorded, or dropped): the node then gives up its claim on the job."""
        self._on_release = on_release
        self._cond = threading.Condition()
        self._closed = False
        self._version = 0  # bumped on every change, so a waiter never misses one
        self._queued: dict[str, ProcessJob] = {}  # series UID -> newest queued version
        self._claimed: set[tuple[str, int]] = set()
        self._loading: ProcessJob | None = None
        self._ready: list[Prepared] = []
        self._inferring: ProcessJob | None = None
        self._handed: Inferred | None = None
        self._finishing: ProcessJob | None = None

    # --- the queue -------------------------------------------------------------------------
    def add_queued(self, jobs: Iterable[ProcessJob]) -> None:
        """Make queued jobs known (a listing of the queue on disk, or a job just queued); a newer
        version of a series replaces the older one."""
        with self._cond:
            changed = False
            for job in jobs:
                known = self._queued.get(job.series_uid)
                if known is None or job.version > known.version:
                    self._queued[job.series_uid] = job
                    changed = True
            if changed:
                self._changed()

    def version(self) -> int:
        """A counter that moves on every change; pass it to :meth:`wait_change`."""
        with self._cond:
            return self._version

    def wait_change(self, seen: int, timeout: float) -> None:
        """Wait until something changed since :meth:`version` returned ``seen``, or ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._closed, timeout)

    def close(self) -> None:
        """Stop handing out work: waiting volumes are dropped (their jobs stay queued on disk);
        the finishing worker still receives what the model is running on."""
        with self._cond:
            self._closed = True
            dropped = [item.job for item in self._ready]
            for job in dropped:
                self._claimed.discard(_key(job))
            self._ready.clear()
            self._changed()
        for job in dropped:
            self._released(job)

    # --- loader ----------------------------------------------------------------------------
    def claim_load(self) -> ProcessJob | None:
        """The next job to decode, claimed, or None when there is none or no room for it: room is
        an empty ``ready``, or one routine volume waiting and this job of a higher priority."""
        with self._cond:
            if self._closed or self._loading is not None:
                return None
            free = [j for j in self._queued.values() if _key(j) not in self._claimed]
            if not free:
                return None
            job = min(free, key=_rank)
            if self._ready and not (len(self._ready) == 1 and job.priority > self._ready[0].job.priority):
                return None
            self._claimed.add(_key(job))
            self._loading = job
            self._changed()
            return job

    def put_ready(self, prepared: Prepared) -> None:
        """Hand a decoded volume to the inference worker (dropped if the board was closed)."""
        with self._cond:
            self._loading = None
            closed = self._closed
            if closed:
                self._claimed.discard(_key(prepared.job))
            else:
                self._ready.append(prepared)
            self._changed()
        if closed:
            self._released(prepared.job)

    # --- inference -------------------------------------------------------------------------
    def take_ready(self) -> Prepared | None:
        """The highest-priority decoded volume once no higher-priority job is about to be decoded;
        None once closed."""
        with self._cond:
            while not self._closed:
                if self._ready:
                    best = min(self._ready, key=lambda p: _rank(p.job))
                    if not self._higher_coming(best.job):
                        self._ready.remove(best)
                        self._inferring = best.job
                        self._changed()
                        return best
                self._cond.wait()
            return None

    def _higher_coming(self, job: ProcessJob) -> bool:
        """A job of higher priority is being decoded, or is queued and the loader has room for it."""
        if self._loading is not None and self._loading.priority > job.priority:
            return True
        return len(self._ready) < 2 and any(
            j.priority > job.priority for j in self._queued.values() if _key(j) not in self._claimed)

    def put_handed(self, inferred: Inferred) -> None:
        """Hand a model result to the finishing worker; waits while the one slot is taken."""
        with self._cond:
            self._cond.wait_for(lambda: self._handed is None)
            self._handed = inferred
            self._inferring = None
            self._changed()

    # --- finishing -------------------------------------------------------------------------
    def take_handed(self) -> Inferred | None:
        """The next model result; None once closed and nothing is left in inference."""
        with self._cond:
            self._cond.wait_for(lambda: self._handed is not None
                                or (self._closed and self._inferring is None))
            inferred, self._handed = self._handed, None
            if inferred is not None:
                self._finishing = inferred.prepared.job
                self._changed()
            return inferred

    # --- any stage -------------------------------------------------------------------------
    def release(self, job: ProcessJob) -> None:
        """A stage is done with ``job``: its outcome is recorded, it was dropped, or it failed
        unrecorded (then it stays queued on disk and the loader finds it again)."""
        with self._cond:
            self._claimed.discard(_key(job))
            known = self._queued.get(job.series_uid)
            if known is not None and known.version <= job.version:
                del self._queued[job.series_uid]
            for stage in ("_loading", "_inferring", "_finishing"):
                if getattr(self, stage) == job:
                    setattr(self, stage, None)
            self._changed()
        self._released(job)

    def _released(self, job: ProcessJob) -> None:
        if self._on_release is not None:
            self._on_release(job)

    def snapshot(self) -> dict[str, list[str]]:
        """Series UIDs per stage (``loading``, ``ready``, ``inferring``, ``handed``, ``finishing``)."""
        with self._cond:
            return {
                "loading": [self._loading.series_uid] if self._loading else [],
                "ready": [p.job.series_uid for p in self._ready],
                "inferring": [self._inferring.series_uid] if self._inferring else [],
                "handed": [self._handed.prepared.job.series_uid] if self._handed else [],
                "finishing": [self._finishing.series_uid] if self._finishing else [],
            }

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()


class Node:
    """The second-reader node; construct, :meth:`start`, later :meth:`stop`."""

    def __init__(self, config: NodeConfig, models: Mapping[str, ModelPackage], *, role: Role = Role.ALL,
                 name: str | None = None) -> None:
        """``role``: what this process does (``reader serve --role``, module docstring); ``name``
        the process's name in a cluster (default ``<host>-<role>``, then ``-2``, ``-3``... while
        another running process of this storage holds it)."""
        self.config = config
        self.role = role
        # a database other processes may share: arrivals are recorded, claims compete (reader.state)
        self.shared = config.cluster.database is not None
        self.clustered = self.shared or role is not Role.ALL
        self.receives = role in (Role.ALL, Role.RECEIVER)
        self.processes = role in (Role.ALL, Role.WORKER)
        self._process_lock: IO[bytes] | None = None
        self.name = name or f"{socket.gethostname()}-{role.value}"
        if self.clustered:  # its own staging folder on the shared storage, cleaned at its start only
            self.name, self._process_lock = Spool(config.data_dir, min_free_bytes=0).claim_process(self.name)
        self.spool = Spool(config.data_dir, min_free_bytes=config.min_free_disk_bytes,
                           process=self.name if self.clustered else "")
        self.metrics = NodeMetrics()
        self.database = Database.open(config.cluster.database, self.spool.root)
        self.jobs = JobStore(self.spool, on_finished=self.metrics.series_finished, database=self.database,
                             owner=self.name)
        self.tracker = CompletionTracker(config.completion,
                                         recorder=self.jobs.record_arrival if self.shared else None)
        self.associations = AssociationLog()
        self.audit = (AuditTrail(config.audit, config.data_dir, config.ae_title,
                                 process=self.name if self.clustered else "")
                      if config.audit.enabled else None)
        self.scp = StorageSCP(config, self.spool, self.tracker, self.associations, self.audit,
                              metrics=self.metrics)
        self.pipeline = Pipeline(config, self.spool, self.jobs, models)
        self._lease_s = config.cluster.lease.total_seconds()
        self._claimed: dict[str, ProcessJob] = {}  # series UID -> the job this process holds a lease on
        self._claimed_lock = threading.Lock()
        self.board = StageBoard(on_release=self._let_go)
        scu = StoreSCU(config.ae_title, acse_timeout=config.sending.association_timeout,
                       dimse_timeout=config.dimse_timeout, network_timeout=config.network_timeout,
                       max_pdu=config.max_pdu_bytes)
        self.dispatcher = Dispatcher(self.jobs, config.sending, _targets(config, scu), scu, audit=self.audit,
                                     metrics=self.metrics, lease_s=self._lease_s)
        for key, model in models.items():
            self.metrics.model_loaded(key, name=model.algorithm.name, version=model.algorithm.version,
                                      weights_sha256=model.algorithm.weights_sha256,
                                      provider=model.provider, precision=model.precision)
        self.metrics.watch(self.queue_depths, config.data_dir, config.min_free_disk_bytes)
        self.retention = Retention(self.spool, self.jobs, config.retention, audit=self.audit)
        self._node_lock: IO[bytes] | None = None
        self._stopping = threading.Event()
        self._sends = threading.Event()
        self._threads: list[threading.Thread] = []
        self.web: WebServer | None = None
        if config.web is not None:
            readiness = Readiness(self.spool, (r.model for r in config.routes) if self.processes else (),
                                  models, (lambda: self.scp.listening) if self.receives else (lambda: True),
                                  database=self.jobs.queue_counts if self.shared else None)
            pages = PagesContext(config, self.jobs, models, self.associations, stages=self.board.snapshot,
                                 wake_sends=self._sends.set, audit=self.audit)
            self.web = WebServer(config.web, build_app(WebContext(
                self.spool, self.tracker, readiness, config.security.web_callers,
                config.web.max_request_bytes, pages, self.audit, self.metrics, receives=self.receives)))

    def start(self) -> None:
        """Resume durable work, then open the port and start the workers (those of its role)."""
        if not self.clustered:
            self._node_lock = self.spool.lock_node()  # one node per data dir; ``reader purge`` asks it
        load_standard_tables()  # highdicom's tables now, not inside the first series' latency and peak
        if self.audit is not None:
            self.audit.start()
        if self.receives and self.config.retention.enabled and self._retention_turn():
            self.retention.resume()  # interrupted deletions first: a half-deleted series is not new work
        self._resume()
        loops: list[tuple[str, Callable[[], None]]] = [("dispatch", self._dispatch_loop)]
        if self.receives:
            loops.append(("completion", self._completion_loop))
            if self.config.retention.enabled:
                loops.append(("retention", self._retention_loop))
        if self.processes:
            loops += [("loader", self._loader_loop), ("inference", self._inference_loop),
                      ("finishing", self._finishing_loop), ("leases", self._lease_loop)]
        for name, target in loops:
            t = threading.Thread(target=self._guard(name, target), name=f"reader-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.receives:
            self.scp.start()
        if self.web is not None:
            self.web.start()
        log.info("node.started", ae_title=self.config.ae_title, role=self.role.value, process=self.name,
                 port=self.scp.port if self.receives else None,
                 web_port=self.web.port if self.web is not None else None,
                 data_dir=str(self.config.data_dir), database=self.database.name,
                 destinations=len(self.config.destinations))
        if self.audit is not None:
            self.audit.application_started()

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful stop: no new associations; the load, inference, encoding and send in progress
        end, volumes still waiting are dropped (their jobs stay queued); then return."""
        log.info("node.stopping")
        if self.web is not None:
            self.web.stop()
        if self.receives:
            self.scp.stop()
        self._stopping.set()
        self.board.close()
        self._sends.set()
        self.tracker.wake()
        for t in self._threads:
            t.join(timeout)
        self._let_go_all()
        if self.audit is not None:
            self.audit.application_stopped()
            self.audit.stop()
        self.database.close()
        for held in (self._node_lock, self._process_lock):
            if held is not None:
                held.close()
        self._node_lock = self._process_lock = None
        log.info("node.stopped", collecting=self.tracker.tracked())

    def queue_depths(self) -> dict[str, int]:
        """Series in each stage now (``collecting`` until complete, ``queued`` for a stage), and the
        send tickets not yet settled (``sending``); read at each scrape of ``/metrics``."""
        stages = {name: len(uids) for name, uids in self.board.snapshot().items()}
        counts = self.jobs.queue_counts()
        return {"collecting": self.tracker.tracked(),
                "queued": max(0, counts["jobs"] - sum(stages.values())), **stages, "sending": counts["sends"]}

    def _resume(self) -> None:
        partial = self.spool.remove_partial_writes()
        if not self.clustered:  # a cluster's unfinished studies are in its arrivals (reader.jobs)
            for study_uid, series_uid in self.spool.stored_series():
                state = self.jobs.series_state(series_uid)
                stored = tuple(sorted(p.stem for p in self.spool.series_instances(study_uid, series_uid)))
                if state is None or not set(stored) <= set(state.instances):  # fewer: retention deleted them
                    self.tracker.resume(study_uid, series_uid)
        log.info("node.resumed", collecting=self.tracker.tracked(), queued=self.jobs.queue_counts()["jobs"],
                 partial_writes_removed=partial)

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        return partial(run_guarded, name, loop, self._stopping)

    def _completion_loop(self) -> None:
        adopt_at = 0.0
        while not self._stopping.is_set():
            self.tracker.wait(timeout=1.0)
            popped = self.tracker.pop_complete()
            complete, settled = popped, dict[str, float]()
            try:
                if self.shared:
                    complete, settled = self._settle_across_receivers(popped)
                    if time.monotonic() >= adopt_at:
                        adopt_at = time.monotonic() + _ADOPT_EVERY_S
                        adopted, left = self._adopt_left_studies()
                        complete += adopted
                        settled.update(left)
                self._queue_complete(complete)
            except StorageError:  # the state is out of reach: track them again, queue them later
                for c in popped:
                    self.tracker.resume(c.study_uid, c.series_uid, c.stat, c.last_arrival)
                raise
            for series in complete:  # a study deferred to another receiver is not complete here
                self.metrics.series_completed(series.waited_s)
            for study_uid, seen in settled.items():  # queued: the arrivals seen are done with
                self.jobs.clear_arrivals(study_uid, not_after=seen)

    def _queue_complete(self, complete: list[CompleteSeries]) -> None:
        """Queue the complete series (those of a held study once it is whole)."""
        released: set[str] = set()
        for study_uid, series_uid, stat, held in self._release_held(complete):
            files = self.spool.series_instances(study_uid, series_uid)
            urgent = not held and (stat or self._stat_by_rule(files))  # a backfill is never STAT
            priority = PRIORITY_STAT if urgent else PRIORITY_ROUTINE
            job = self.jobs.enqueue_if_changed(study_uid, series_uid, tuple(p.stem for p in files),
                                               priority=priority,
                                               models=self._model_records() if held else None)
            log.info("series.complete", study_uid=study_uid, series_uid=series_uid,
                     instances=len(files), queued=job is not None, priority=priority,
                     version=job.version if job else None)
            if job is not None and self.processes:
                self.board.add_queued([job])
            if held:
                released.add(study_uid)
        for study_uid in sorted(released):  # every listed series queued, or read already
            StudyHold.delete(self.spool, study_uid)

    def _settle_across_receivers(self, complete: list[CompleteSeries]
                                 ) -> tuple[list[CompleteSeries], dict[str, float]]:
        """Of the studies this receiver found complete, those it completes for the cluster: no
        other receiver recorded a later instance of them (that one completes the study when its
        own associations end; unless its last instance is older than the idle timeout, then it is
        presumed gone). A study completed here takes every series the arrivals list for it, also
        those other receivers received. Returns the series to queue, and per study the latest
        arrival seen (its arrivals are cleared up to that once queued)."""
        by_study: dict[str, list[CompleteSeries]] = {}
        for c in complete:
            by_study.setdefault(c.study_uid, []).append(c)
        idle = self.config.completion.idle_timeout.total_seconds()
        out: list[CompleteSeries] = []
        settled: dict[str, float] = {}
        now = time.time()
        for study_uid, items in by_study.items():
            local_last = max(c.last_arrival for c in items)
            rows = self.jobs.study_arrivals(study_uid)
            latest = max((r.last_instance_at for r in rows), default=0.0)
            if latest > local_last + 0.001 and latest > now - idle:
                for c in items:  # look again after the grace: done by then, or the other one is gone
                    self.tracker.resume(study_uid, c.series_uid, c.stat, c.last_arrival)
                log.info("study.deferred", study_uid=study_uid, series=len(items),
                         later_by_s=round(latest - local_last, 3))
                continue
            listed = {c.series_uid: c for c in items}
            for r in rows:
                known = listed.get(r.series_uid)
                listed[r.series_uid] = CompleteSeries(
                    study_uid, r.series_uid, r.stat or (known is not None and known.stat),
                    now - r.last_instance_at, r.last_instance_at)
            out += sorted(listed.values(), key=lambda c: not c.stat)
            settled[study_uid] = max(latest, local_last)
        return out, settled

    def _adopt_left_studies(self) -> tuple[list[CompleteSeries], dict[str, float]]:
        """Studies whose last recorded instance is older than the idle timeout and the grace and
        that no association here is still carrying: their receiver died or lost its association
        mid-study. Any receiver completes them (enqueueing is idempotent, so two doing it at once
        queue each series once)."""
        limit = (self.config.completion.idle_timeout + self.config.completion.grace).total_seconds()
        now = time.time()
        out: list[CompleteSeries] = []
        settled: dict[str, float] = {}
        quiet: dict[str, bool] = {}  # a study some receiver still gets instances of is not left
        for row in self.jobs.stale_arrivals(older_than=now - limit):
            if row.study_uid not in quiet:
                latest = self.jobs.latest_arrival(row.study_uid)
                quiet[row.study_uid] = (not self.tracker.tracks_study(row.study_uid)
                                        and latest is not None and latest < now - limit)
            if not quiet[row.study_uid]:
                continue
            out.append(CompleteSeries(row.study_uid, row.series_uid, row.stat, now - row.last_instance_at,
                                      row.last_instance_at))
            settled[row.study_uid] = max(settled.get(row.study_uid, 0.0), row.last_instance_at)
        for study_uid in settled:
            log.info("study.adopted", study_uid=study_uid,
                     series=sum(1 for c in out if c.study_uid == study_uid))
        return out, settled

    def _model_records(self) -> list[dict[str, str]]:
        """What a series read now records of its model, for each model loaded (``model_record``)."""
        return [model_record(m.algorithm) for m in self.pipeline.models.values()]

    def _release_held(self, complete: list[CompleteSeries]) -> list[tuple[str, str, bool, bool]]:
        """(study, series, stat, held) of the complete series to queue now. Those of a study under
        a hold (``reader.holds``) wait until every instance it lists is stored; then all of the
        study's listed series go at once, ``held`` (read again if an older model read them), and
        the caller ends the hold once they are queued."""
        out: list[tuple[str, str, bool, bool]] = []
        seen: set[str] = set()
        now = time.time()
        for item in complete:
            hold = StudyHold.read(self.spool, item.study_uid, now)
            if hold is None:
                batch = [(item, False)]
            elif missing := hold.missing(self.spool):
                log.info("study.held", study_uid=item.study_uid, series_uid=item.series_uid,
                         missing_instances=sum(len(m) for m in missing.values()))
                continue
            else:
                listed = [CompleteSeries(item.study_uid, s) for s in sorted(hold.series)]
                batch = [(item, True), *((c, True) for c in listed)]
            for c, held in batch:
                if c.series_uid not in seen and self.spool.series_instances(c.study_uid, c.series_uid):
                    seen.add(c.series_uid)
                    out.append((c.study_uid, c.series_uid, c.stat, held))
        return out

    def _stat_by_rule(self, files: list[Path]) -> bool:
        """True when the series' accession number has a configured STAT prefix (e.g. "ED")."""
        prefixes = self.config.worklist.stat_accession_prefixes
        if not prefixes or not files:
            return False
        header = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["AccessionNumber"])
        return str(header.get("AccessionNumber", "")).startswith(prefixes)

    # --- processing: three stages, one series each ------------------------------------------
    def _loader_loop(self) -> None:
        """Route and decode the highest-priority queued job whenever there is room for it."""
        poll = self.config.cluster.poll_interval.total_seconds() if self.clustered else _IDLE_POLL_S
        while not self._stopping.is_set():
            seen = self.board.version()
            self.board.add_queued(self.jobs.pending_jobs(limit=_LISTED_JOBS))
            job = self.board.claim_load()
            if job is None:
                self.board.wait_change(seen, poll)
                continue
            try:  # finished, superseded or taken by another worker since it was listed?
                claimed = self.jobs.claim_job(job, self._lease_s)
            except BaseException:
                self.board.release(job)
                raise
            if not claimed:
                self.board.release(job)
                continue
            with self._claimed_lock:
                self._claimed[job.series_uid] = job
            self._hand_on(job, "prepare", partial(self.pipeline.prepare, job), Prepared, self._put_ready)

    def _let_go(self, job: ProcessJob) -> None:
        """The board let go of ``job``: give up the lease (a no-op once its outcome is recorded; a
        job dropped unfinished is free for any worker at once)."""
        with self._claimed_lock:
            if self._claimed.get(job.series_uid) != job:
                return
            del self._claimed[job.series_uid]
        try:
            self.jobs.release_job(job)
        except StorageError as exc:  # the database is out of reach: the lease runs out by itself
            log.error("worker.storage_error", worker="leases", detail=str(exc))

    def _let_go_all(self) -> None:
        """At stop: give up the leases of the jobs still held (their volumes were dropped)."""
        with self._claimed_lock:
            held = list(self._claimed.values())
        for job in held:
            self._let_go(job)

    def _lease_loop(self) -> None:
        """Renew the leases of the jobs this process holds, three times per lease."""
        while not self._stopping.wait(self._lease_s / 3):
            with self._claimed_lock:
                held = list(self._claimed)
            if held:
                self.jobs.renew_job_leases(held, self._lease_s)

    def _retention_turn(self) -> bool:
        """Whether this process deletes now: always on a single node; in a cluster, the receiver
        holding the ``retention`` lease (one at a time)."""
        interval = self.config.retention.sweep_interval.total_seconds()
        return not self.shared or self.jobs.hold_lease("retention", max(self._lease_s, 2 * interval))

    def _put_ready(self, prepared: Prepared) -> None:
        self.metrics.stage_seconds(STAGE_LOAD, prepared.loaded_at - prepared.started_at)
        self.board.put_ready(prepared)

    def _put_handed(self, inferred: Inferred) -> None:
        seconds = inferred.inference_ended_at - inferred.inference_started_at
        self.metrics.stage_seconds(STAGE_INFERENCE, seconds)
        self.board.put_handed(inferred)

    def _inference_loop(self) -> None:
        """Run the model on the best decoded volume as soon as the previous run ends."""
        while (prepared := self.board.take_ready()) is not None:
            self._hand_on(prepared.job, "inference", partial(self.pipeline.infer, prepared), Inferred,
                          self._put_handed)

    def _finishing_loop(self) -> None:
        """Encode, write and queue the sends of each model result, beside the next inference."""
        while (inferred := self.board.take_handed()) is not None:
            job = inferred.prepared.job
            started = time.perf_counter()
            try:
                status = self._stage(job, "finish", partial(self.pipeline.finish, inferred))
            finally:
                self.board.release(job)
            if status is SeriesStatus.DONE:
                self.metrics.stage_seconds(STAGE_ENCODING, time.perf_counter() - started)
                self._sends.set()

    def _hand_on(self, job: ProcessJob, stage: str, work: Callable[[], _T | SeriesStatus],
                 kind: type[_T], hand: Callable[[_T], None]) -> None:
        """Run one stage of ``job`` and hand its product to the next stage; an outcome recorded
        instead (skipped, failed, superseded), or an exception, releases the job from the board."""
        try:
            product = self._stage(job, stage, work)
        except BaseException:
            self.board.release(job)
            raise
        if isinstance(product, kind):
            hand(product)
        else:
            self.board.release(job)

    def _stage(self, job: ProcessJob, stage: str, work: Callable[[], _T]) -> _T | SeriesStatus:
        """Run one stage of one job; an unexpected error fails that series (recorded), not the worker.
        A state database out of reach fails nothing: the job stays queued (and claimed by this
        process, which takes it again) and the worker backs off until the database is back."""
        try:
            return work()
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.exception("series.failed", series_uid=job.series_uid, stage=stage, error=type(exc).__name__)
            self.jobs.finish_job(job, SeriesStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return SeriesStatus.FAILED

    def _retention_loop(self) -> None:
        """Sweep at start and then every ``retention.sweep_minutes``."""
        interval = self.config.retention.sweep_interval.total_seconds()
        while not self._stopping.is_set():
            try:
                if self._retention_turn():
                    self.retention.sweep()
            except OSError as exc:  # e.g. a folder removed by ``reader purge`` meanwhile: next sweep
                log.error("retention.failed", error=type(exc).__name__, detail=str(exc))
            self._stopping.wait(interval)

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._sends.clear()
            for ticket in self.dispatcher.due(time.time()):
                if self._stopping.is_set():
                    return
                self.dispatcher.attempt(ticket)
            wait = self.dispatcher.next_due_in(time.time())
            self._sends.wait(timeout=min(wait, 5.0) if wait is not None else 5.0)
