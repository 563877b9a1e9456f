"""The running node: listener plus three workers handing over through durable tickets.

    StorageSCP --(instances on disk + tracker)--> completion monitor --(ProcessJob)--> processing
    worker --(results on disk + SendTicket)--> dispatcher --> destinations

Each worker is one thread that sleeps on an event until there is work; all state it needs to
resume lives in the spool, so :meth:`Node.start` after a crash picks up collecting series,
queued jobs and pending sends. :meth:`Node.stop` stops accepting, lets the job and the send in
progress finish (everything else is already durable), and returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pydicom
import structlog

from reader.assemble import CompletionTracker
from reader.config import NodeConfig
from reader.dispatch import Delivery, DicomDelivery, Dispatcher, MllpDelivery, WebhookDelivery
from reader.errors import StorageError
from reader.inference import ModelPackage
from reader.jobs import JobStore, SeriesStatus
from reader.pipeline import Pipeline, destination_key
from reader.scp import StorageSCP
from reader.send import StoreSCU
from reader.spool import Spool

__all__ = ["Node", "load_models"]

log = structlog.get_logger(__name__)

PRIORITY_ROUTINE = 0
PRIORITY_STAT = 1  # processed before routine work already queued (reader.jobs orders by priority)


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
        destination_key(d.ae_title, d.host, d.port): DicomDelivery(scu, d) for d in config.destinations}
    targets.update({h.endpoint.key: MllpDelivery(h.endpoint) for h in config.worklist.hl7})
    targets.update({w.endpoint.key: WebhookDelivery(w.endpoint) for w in config.worklist.webhooks})
    return targets


class Node:
    """The second-reader node; construct, :meth:`start`, later :meth:`stop`."""

    def __init__(self, config: NodeConfig, models: Mapping[str, ModelPackage]) -> None:
        self.config = config
        self.spool = Spool(config.data_dir, min_free_bytes=config.min_free_disk_bytes)
        self.jobs = JobStore(self.spool)
        self.tracker = CompletionTracker(config.completion)
        self.scp = StorageSCP(config, self.spool, self.tracker)
        self.pipeline = Pipeline(config, self.spool, self.jobs, models)
        scu = StoreSCU(config.ae_title, acse_timeout=config.sending.association_timeout,
                       dimse_timeout=config.dimse_timeout, network_timeout=config.network_timeout,
                       max_pdu=config.max_pdu_bytes)
        self.dispatcher = Dispatcher(self.jobs, config.sending, _targets(config, scu), scu)
        self._stopping = threading.Event()
        self._work = threading.Event()
        self._sends = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Resume durable work, then open the port and start the workers."""
        self._resume()
        for name, target in (("completion", self._completion_loop), ("processing", self._processing_loop),
                             ("dispatch", self._dispatch_loop)):
            t = threading.Thread(target=self._guard(name, target), name=f"reader-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.scp.start()
        log.info("node.started", ae_title=self.config.ae_title, port=self.scp.port,
                 data_dir=str(self.config.data_dir), destinations=len(self.config.destinations))

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful stop: no new associations, finish the job and send in progress, return."""
        log.info("node.stopping")
        self.scp.stop()
        self._stopping.set()
        self._work.set()
        self._sends.set()
        self.tracker.wake()
        for t in self._threads:
            t.join(timeout)
        log.info("node.stopped", collecting=self.tracker.tracked())

    def _resume(self) -> None:
        partial = self.spool.remove_partial_writes()
        for study_uid, series_uid in self.spool.stored_series():
            state = self.jobs.series_state(series_uid)
            stored = tuple(sorted(p.stem for p in self.spool.series_instances(study_uid, series_uid)))
            if state is None or state.instances != stored:
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
            for study_uid, series_uid, stat in self.tracker.pop_complete():
                files = self.spool.series_instances(study_uid, series_uid)
                priority = PRIORITY_STAT if stat or self._stat_by_rule(files) else PRIORITY_ROUTINE
                job = self.jobs.enqueue_if_changed(study_uid, series_uid, tuple(p.stem for p in files),
                                                   priority=priority)
                log.info("series.complete", study_uid=study_uid, series_uid=series_uid,
                         instances=len(files), queued=job is not None, priority=priority,
                         version=job.version if job else None)
                if job is not None:
                    self._work.set()

    def _stat_by_rule(self, files: list[Path]) -> bool:
        """True when the series' accession number has a configured STAT prefix (e.g. "ED")."""
        prefixes = self.config.worklist.stat_accession_prefixes
        if not prefixes or not files:
            return False
        header = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["AccessionNumber"])
        return str(header.get("AccessionNumber", "")).startswith(prefixes)

    def _processing_loop(self) -> None:
        while not self._stopping.is_set():
            self._work.clear()
            pending = self.jobs.pending_jobs()
            if not pending:
                self._work.wait(timeout=5.0)
                continue
            job = pending[0]
            try:
                status = self.pipeline.process(job)
            except Exception as exc:
                log.exception("series.failed", series_uid=job.series_uid, error=type(exc).__name__)
                self.jobs.finish_job(job, SeriesStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
                continue
            if status is SeriesStatus.DONE:
                self._sends.set()

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._sends.clear()
            for ticket in self.dispatcher.due(time.time()):
                if self._stopping.is_set():
                    return
                self.dispatcher.attempt(ticket)
            wait = self.dispatcher.next_due_in(time.time())
            self._sends.wait(timeout=min(wait, 5.0) if wait is not None else 5.0)
