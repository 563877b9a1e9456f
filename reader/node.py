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
from reader.config import NodeConfig
from reader.dicomweb import StowDestination
from reader.dispatch import Delivery, DicomDelivery, Dispatcher, MllpDelivery, StowDelivery, WebhookDelivery
from reader.errors import StorageError
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
from reader.web import PagesContext, Readiness, WebContext, WebServer, build_app

__all__ = ["PRIORITY_ROUTINE", "PRIORITY_STAT", "Node", "StageBoard", "load_models"]

log = structlog.get_logger(__name__)

PRIORITY_ROUTINE = 0
PRIORITY_STAT = 1  # processed before routine work already queued (reader.jobs orders by priority)

_IDLE_POLL_S = 5.0  # the loader re-reads the queue on disk at least this often
_T = TypeVar("_T")


def load_models(config: NodeConfig) -> dict[str, ModelPackage]:
    """Load every model a route refers to, once; raises ModelError (ManifestError) on a bad package."""
    names = sorted({r.model for r in config.routes})
    return {
        name: ModelPackage.load(config.model(name).path, providers=config.inference.providers,
                                fp16=config.inference.fp16)
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

    def __init__(self) -> None:
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
            for item in self._ready:
                self._claimed.discard(_key(item.job))
            self._ready.clear()
            self._changed()

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
            if self._closed:
                self._claimed.discard(_key(prepared.job))
            else:
                self._ready.append(prepared)
            self._changed()

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

    def __init__(self, config: NodeConfig, models: Mapping[str, ModelPackage]) -> None:
        self.config = config
        self.spool = Spool(config.data_dir, min_free_bytes=config.min_free_disk_bytes)
        self.metrics = NodeMetrics()
        self.jobs = JobStore(self.spool, on_finished=self.metrics.series_finished)
        self.tracker = CompletionTracker(config.completion)
        self.associations = AssociationLog()
        self.audit = (AuditTrail(config.audit, config.data_dir, config.ae_title) if config.audit.enabled
                      else None)
        self.scp = StorageSCP(config, self.spool, self.tracker, self.associations, self.audit,
                              metrics=self.metrics)
        self.pipeline = Pipeline(config, self.spool, self.jobs, models)
        self.board = StageBoard()
        scu = StoreSCU(config.ae_title, acse_timeout=config.sending.association_timeout,
                       dimse_timeout=config.dimse_timeout, network_timeout=config.network_timeout,
                       max_pdu=config.max_pdu_bytes)
        self.dispatcher = Dispatcher(self.jobs, config.sending, _targets(config, scu), scu, audit=self.audit,
                                     metrics=self.metrics)
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
            readiness = Readiness(self.spool, (r.model for r in config.routes), models,
                                  lambda: self.scp.listening)
            pages = PagesContext(config, self.jobs, models, self.associations, stages=self.board.snapshot,
                                 wake_sends=self._sends.set, audit=self.audit)
            self.web = WebServer(config.web, build_app(WebContext(
                self.spool, self.tracker, readiness, config.security.web_callers,
                config.web.max_request_bytes, pages, self.audit, self.metrics)))

    def start(self) -> None:
        """Resume durable work, then open the port and start the workers."""
        self._node_lock = self.spool.lock_node()  # one node per data dir; ``reader purge`` asks it
        load_standard_tables()  # highdicom's tables now, not inside the first series' latency and peak
        if self.audit is not None:
            self.audit.start()
        self.retention.resume()  # interrupted deletions first: a half-deleted series is not new work
        self._resume()
        loops = [("completion", self._completion_loop), ("loader", self._loader_loop),
                 ("inference", self._inference_loop), ("finishing", self._finishing_loop),
                 ("dispatch", self._dispatch_loop)]
        if self.config.retention.enabled:
            loops.append(("retention", self._retention_loop))
        for name, target in loops:
            t = threading.Thread(target=self._guard(name, target), name=f"reader-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.scp.start()
        if self.web is not None:
            self.web.start()
        log.info("node.started", ae_title=self.config.ae_title, port=self.scp.port,
                 web_port=self.web.port if self.web is not None else None,
                 data_dir=str(self.config.data_dir), destinations=len(self.config.destinations))
        if self.audit is not None:
            self.audit.application_started()

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful stop: no new associations; the load, inference, encoding and send in progress
        end, volumes still waiting are dropped (their jobs stay queued); then return."""
        log.info("node.stopping")
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        self._stopping.set()
        self.board.close()
        self._sends.set()
        self.tracker.wake()
        for t in self._threads:
            t.join(timeout)
        if self.audit is not None:
            self.audit.application_stopped()
            self.audit.stop()
        if self._node_lock is not None:
            self._node_lock.close()
            self._node_lock = None
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
        for study_uid, series_uid in self.spool.stored_series():
            state = self.jobs.series_state(series_uid)
            stored = tuple(sorted(p.stem for p in self.spool.series_instances(study_uid, series_uid)))
            if state is None or not set(stored) <= set(state.instances):  # fewer: retention deleted them
                self.tracker.resume(study_uid, series_uid)
        pending = self.jobs.pending_jobs()
        log.info("node.resumed", collecting=self.tracker.tracked(), queued=len(pending),
                 partial_writes_removed=partial)

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stopping.is_set():
                try:
                    loop()
                    return
                except StorageError as exc:  # disk trouble: log, back off, carry on
                    log.error("worker.storage_error", worker=name, detail=str(exc))
                    self._stopping.wait(1.0)
        return run

    def _completion_loop(self) -> None:
        while not self._stopping.is_set():
            self.tracker.wait(timeout=1.0)
            released: set[str] = set()
            complete = self.tracker.pop_complete()
            for series in complete:
                self.metrics.series_completed(series.waited_s)
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
                if job is not None:
                    self.board.add_queued([job])
                if held:
                    released.add(study_uid)
            for study_uid in sorted(released):  # every listed series queued, or read already
                StudyHold.delete(self.spool, study_uid)

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
        while not self._stopping.is_set():
            seen = self.board.version()
            self.board.add_queued(self.jobs.pending_jobs())
            job = self.board.claim_load()
            if job is None:
                self.board.wait_change(seen, _IDLE_POLL_S)
                continue
            try:
                current = self.jobs.job_is_current(job)  # finished or superseded since it was listed?
            except BaseException:
                self.board.release(job)
                raise
            if not current:
                self.board.release(job)
                continue
            self._hand_on(job, "prepare", partial(self.pipeline.prepare, job), Prepared, self._put_ready)

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
        """Run one stage of one job; an unexpected error fails that series (recorded), not the worker."""
        try:
            return work()
        except Exception as exc:
            log.exception("series.failed", series_uid=job.series_uid, stage=stage, error=type(exc).__name__)
            self.jobs.finish_job(job, SeriesStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return SeriesStatus.FAILED

    def _retention_loop(self) -> None:
        """Sweep at start and then every ``retention.sweep_minutes``."""
        interval = self.config.retention.sweep_interval.total_seconds()
        while not self._stopping.is_set():
            try:
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
