"""One complete series through route -> volume -> inference -> encoding -> send tickets.

The work is split in three stages so that the node can run them on separate threads, one series
per stage at a time (``reader.node``): :meth:`Pipeline.prepare` (route, load the volume),
:meth:`Pipeline.infer` (the model) and :meth:`Pipeline.finish` (encode SEG/SR/KOS, write, render
notifications, queue send tickets, record the outcome). :meth:`Pipeline.process` runs them one
after another.

A route that reads studies (``read = "study"``, the default) reads one series per study: the one
its preference ranks first among the study's series it matches (``reader.study``); the job of any
other series is recorded as skipped, naming the series read. The study's results form one lineage
(:func:`reader.study.study_result_key`): a better series arriving later is read as the study's next
result version, whose SR names the previous one and whose sends supersede the older ones.

Every stage logs a timing event; the outcome is recorded durably with the job (``reader.jobs``).
Typed errors from the stages become a recorded status here: rejected input and unmatched routes
are *skipped* with the reason, model and encoder failures *failed* with the reason. Nothing a
stage does before :meth:`Pipeline.finish` records the outcome is durable except result files, so
a job interrupted anywhere is simply processed again.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import structlog

from reader.assemble import SeriesSummary, summarize_series
from reader.config import NodeConfig, Route
from reader.dicomweb import StowDestination
from reader.errors import EncodingError, InputRejected, ModelError
from reader.findings import AlgorithmIdentity, InferenceResult
from reader.flag import decide
from reader.inference import ModelPackage
from reader.jobs import JobStore, ProcessJob, SeriesStatus
from reader.notify.hl7 import build_oru, message_control_id
from reader.notify.summary import StudyReport
from reader.notify.webhook import event_json
from reader.results import encode_results
from reader.results.kos import encode_kos
from reader.results.seg import check_segmentable
from reader.routing import RouteMatch, Skip, route_series
from reader.send import Destination
from reader.spool import Spool
from reader.study import choose_series, describe_series, study_result_key
from reader.volume import Volume, load_volume

__all__ = [
    "STUDY_READ_FROM", "Inferred", "Pipeline", "Prepared", "destination_key", "model_record", "send_key",
]

log = structlog.get_logger(__name__)

STUDY_READ_FROM = "study read from "  # the reason a study's other series are skipped starts so


def model_record(algorithm: AlgorithmIdentity) -> dict[str, str]:
    """What a processed series records of the model that read it (``SeriesState.model``): its
    name, version and the SHA-256 of the graph that ran; ``reader backfill`` compares it with the
    models configured now to skip studies already read by the same model version."""
    return {"name": algorithm.name, "version": algorithm.version, "weights_sha256": algorithm.weights_sha256}


def destination_key(ae_title: str, host: str, port: int) -> str:
    """The ``AE@HOST:PORT`` form a send ticket names its destination by."""
    return f"{ae_title}@{host}:{port}"


def send_key(destination: Destination | StowDestination) -> str:
    """The key a send ticket names ``destination`` by: ``AE@HOST:PORT`` for C-STORE, ``stow:`` +
    the base URL for a DICOMweb service (``reader.dicomweb.StowDestination.key``)."""
    if isinstance(destination, StowDestination):
        return destination.key
    return destination_key(destination.ae_title, destination.host, destination.port)


@dataclass(frozen=True)
class Prepared:
    """A routed series with its volume loaded, waiting for the model (output of :meth:`Pipeline.prepare`).

    Times are ``time.perf_counter()`` readings of this process.
    """

    job: ProcessJob
    route: Route
    model: ModelPackage
    volume: Volume
    lineage: str  # whose result versions these are: the series UID, or a study's (study_result_key)
    result_version: int  # the version of that lineage these results are
    started_at: float  # prepare began
    routed_at: float  # routing done, volume loading began
    loaded_at: float  # volume loaded
    seconds_queued: float  # job queued (wall clock) -> prepare began


@dataclass(frozen=True)
class Inferred:
    """A series the model has run on, waiting for encoding (output of :meth:`Pipeline.infer`)."""

    prepared: Prepared
    result: InferenceResult
    inference_started_at: float
    inference_ended_at: float


@dataclass(frozen=True)
class Pipeline:
    """Processes jobs with models loaded once by the node."""

    config: NodeConfig
    spool: Spool
    jobs: JobStore
    models: Mapping[str, ModelPackage]

    def process(self, job: ProcessJob) -> SeriesStatus:
        """Run one job to its recorded outcome; never raises for a bad series or a model failure."""
        prepared = self.prepare(job)
        if isinstance(prepared, SeriesStatus):
            return prepared
        inferred = self.infer(prepared)
        if isinstance(inferred, SeriesStatus):
            return inferred
        return self.finish(inferred)

    def prepare(self, job: ProcessJob) -> Prepared | SeriesStatus:
        """Route the series and load its volume; a skipped or rejected series is recorded and its
        status returned instead."""
        bound = _bind(job)
        t0 = time.perf_counter()
        queued = max(0.0, time.time() - job.created_at)
        wanted = set(job.instances)
        files = [p for p in self.spool.series_instances(job.study_uid, job.series_uid) if p.stem in wanted]
        study_read = False
        try:
            summary = summarize_series(job.study_uid, job.series_uid, files)
            routed = route_series(self.config.routes, summary)
            if isinstance(routed, Skip):
                bound.info("series.skipped", reason=routed.reason)
                self.jobs.finish_job(job, SeriesStatus.SKIPPED, routed.reason)
                return SeriesStatus.SKIPPED
            route = routed.route
            lineage, result_version = job.series_uid, job.version
            if route.read == "study":
                chosen = self._study_choice(job, summary, route)
                if chosen.series_uid != job.series_uid:
                    reason = STUDY_READ_FROM + describe_series(chosen)
                    bound.info("series.skipped", reason=reason, chosen_series_uid=chosen.series_uid)
                    self.jobs.finish_job(job, SeriesStatus.SKIPPED, reason)
                    return SeriesStatus.SKIPPED
                study_read = True
                lineage = study_result_key(job.study_uid, route.name)
            model = self.models[route.model]
            bound.info("series.routed", route=route.name, model=model.manifest.model.name,
                       instances=len(files))
            t1 = time.perf_counter()
            volume = load_volume(files)
            if model.manifest.output.kind != "boxes":  # a detection model's result has no SEG
                check_segmentable(volume)
            if study_read:  # minted once the series is known readable: a rejection uses no version
                result_version = self.jobs.study_result_version(lineage, job.series_uid, job.instances,
                                                                at_least=job.version)
                bound.info("study.series_chosen", route=route.name, kernel=summary.kernel,
                           slice_thickness_mm=summary.slice_thickness_mm, result_version=result_version)
        except (InputRejected, ModelError, EncodingError) as exc:
            status = self._record_error(job, bound, exc)
            if study_read and isinstance(exc, InputRejected):
                self._requeue_passed_over(job, bound)
            return status
        return Prepared(job=job, route=route, model=model, volume=volume, lineage=lineage,
                        result_version=result_version, started_at=t0, routed_at=t1,
                        loaded_at=time.perf_counter(), seconds_queued=queued)

    def _study_choice(self, job: ProcessJob, summary: SeriesSummary, route: Route) -> SeriesSummary:
        """The series of ``job``'s study that ``route`` reads: ranked by its preference among the
        study's stored series it matches, leaving out those that failed or were rejected."""
        candidates = [summary]
        for series_uid in self.spool.study_series(job.study_uid):
            if series_uid == job.series_uid:
                continue
            state = self.jobs.series_state(series_uid)
            if state is not None and (state.status is SeriesStatus.FAILED or (
                    state.status is SeriesStatus.SKIPPED and not state.reason.startswith(STUDY_READ_FROM))):
                continue  # it cannot be read (or matches no route): not a choice
            files = self.spool.series_instances(job.study_uid, series_uid)
            try:
                other = summarize_series(job.study_uid, series_uid, files)
            except InputRejected:
                continue
            match = route_series(self.config.routes, other)
            if isinstance(match, RouteMatch) and match.route.name == route.name:
                candidates.append(other)
        return choose_series(route.prefer, candidates)

    def _requeue_passed_over(self, job: ProcessJob, bound: Any) -> None:
        """The series a study was to be read from was rejected: queue again the study's series that
        were skipped for it, so the study is read from its next choice."""
        passed_over = f"{STUDY_READ_FROM}series {job.series_uid} "
        for series_uid in self.spool.study_series(job.study_uid):
            state = self.jobs.series_state(series_uid)
            if (state is not None and state.status is SeriesStatus.SKIPPED
                    and state.reason.startswith(passed_over)):
                again = self.jobs.requeue_series(state)
                bound.info("study.series_requeued", requeued_series_uid=series_uid, version=again.version)

    def infer(self, prepared: Prepared) -> Inferred | SeriesStatus:
        """Run the model; a job superseded while it waited is dropped (its newer version is queued)."""
        job = prepared.job
        bound = _bind(job)
        if not self.jobs.job_is_current(job):
            bound.info("series.superseded", stage="inference")
            return SeriesStatus.DONE
        t2 = time.perf_counter()
        try:
            result = prepared.model.run(prepared.volume)
        except (InputRejected, ModelError, EncodingError) as exc:
            return self._record_error(job, bound, exc)
        return Inferred(prepared=prepared, result=result, inference_started_at=t2,
                        inference_ended_at=time.perf_counter())

    def finish(self, inferred: Inferred) -> SeriesStatus:
        """Encode SEG/SR (and KOS when flagged), write them and the rendered notifications, queue
        the send tickets and record the job done; encoder failures are recorded as failed."""
        prepared, result = inferred.prepared, inferred.result
        job, volume, route = prepared.job, prepared.volume, prepared.route
        series, lineage, version = job.series_uid, prepared.lineage, prepared.result_version
        bound = _bind(job)
        t3 = time.perf_counter()
        try:
            objects = encode_results(volume, result, result_version=version,
                                     previous_sr=self._previous_sr(lineage, version))
            flag = decide(route.flag, result.findings)
            kos = None
            if flag.flagged:
                kos = encode_kos(volume, result, seg=objects.seg, sr=objects.sr,
                                 result_version=version, decision=flag)
        except (InputRejected, ModelError, EncodingError) as exc:
            return self._record_error(job, bound, exc)
        t4 = time.perf_counter()
        encoded = [(kind, ds) for kind, ds in (("SEG", objects.seg), ("SR", objects.sr), ("KOS", kos))
                   if ds is not None]
        paths = [self._write_dataset(series, version, kind.lower(), ds) for kind, ds in encoded]
        first = volume.sources[0]  # load_volume kept its header: no second read of the file
        report = StudyReport.build(
            source=first.header or pydicom.dcmread(first.path, stop_before_pixels=True),
            series_instance_uid=job.series_uid, decision=flag, findings=result.findings,
            algorithm=result.algorithm, result_version=version, objects=encoded)
        notifications = self._render_notifications(series, version, report)
        t5 = time.perf_counter()
        if not self.jobs.job_is_current(job):
            bound.info("series.superseded", stage="finish")
            return SeriesStatus.DONE
        self._queue_sends(series, lineage, version, paths)
        for destination, path in notifications:
            self.jobs.add_send(series, version, destination, [path], lineage=lineage)
        wall = _wall_clock()
        self.jobs.finish_job(job, SeriesStatus.DONE, flag=flag.as_record(),
                             model=model_record(result.algorithm), timeline={
            "started": wall(prepared.started_at), "routed": wall(prepared.routed_at),
            "loaded": wall(prepared.loaded_at), "inference_started": wall(inferred.inference_started_at),
            "inferred": wall(inferred.inference_ended_at), "encoded": wall(t5)})
        waiting = (inferred.inference_started_at - prepared.loaded_at) + (t3 - inferred.inference_ended_at)
        bound.info("series.processed", findings=len(result.findings), flag=flag.state.value,
                   route=route.name, provider=result.provider, result_version=version, **_seconds(
                       route=prepared.routed_at - prepared.started_at,
                       volume=prepared.loaded_at - prepared.routed_at,
                       inference=inferred.inference_ended_at - inferred.inference_started_at,
                       encode=t4 - t3, write=t5 - t4, waiting=waiting, queued=prepared.seconds_queued,
                       total=time.perf_counter() - prepared.started_at))
        return SeriesStatus.DONE

    def _record_error(self, job: ProcessJob, bound: Any,
                      exc: InputRejected | ModelError | EncodingError) -> SeriesStatus:
        """Record a typed stage error durably: rejected input is skipped, the rest failed."""
        if isinstance(exc, InputRejected):
            bound.warning("series.rejected", reason=exc.reason, detail=exc.detail)
            self.jobs.finish_job(job, SeriesStatus.SKIPPED, f"{exc.reason}: {exc.detail}")
            return SeriesStatus.SKIPPED
        bound.error("series.failed", error=type(exc).__name__, detail=str(exc))
        self.jobs.finish_job(job, SeriesStatus.FAILED, f"{type(exc).__name__}: {exc}")
        return SeriesStatus.FAILED

    def _write_dataset(self, series_uid: str, version: int, kind: str, ds: pydicom.Dataset) -> Path:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return self.spool.write_result(series_uid, version, kind, buffer.getvalue())

    def _render_notifications(self, series_uid: str, version: int,
                              report: StudyReport) -> list[tuple[str, Path]]:
        """Render each HL7 message and the webhook event once, durably, so every retry sends the
        same bytes; returns (ticket destination key, file) pairs. Negative studies go only to
        targets that want them (``send_negative``)."""
        worklist = self.config.worklist
        out: list[tuple[str, Path]] = []
        for hl7 in worklist.hl7:
            if report.flagged or hl7.send_negative:
                endpoint = hl7.endpoint.key
                message = build_oru(report, sending_app=worklist.sending_application,
                                    sending_facility=worklist.sending_facility,
                                    receiving_app=hl7.receiving_application,
                                    receiving_facility=hl7.receiving_facility,
                                    control_id=message_control_id(series_uid, version, endpoint))
                name = "hl7-" + hashlib.sha256(endpoint.encode()).hexdigest()[:12]
                out.append((endpoint, self.spool.write_result(series_uid, version, name,
                                                              message.encode("utf-8"), suffix=".hl7")))
        hooks = [w for w in worklist.webhooks if report.flagged or w.send_negative]
        if hooks:
            path = self.spool.write_result(series_uid, version, "webhook", event_json(report),
                                           suffix=".json")
            out.extend((w.endpoint.key, path) for w in hooks)
        return out

    def _previous_sr(self, lineage: str, version: int) -> pydicom.Dataset | None:
        """The SR of the latest earlier result version of the lineage, which this one supersedes
        (for a study read, possibly of another of the study's series)."""
        for series_uid, earlier in self.jobs.earlier_results(lineage, version):
            path = self.spool.result_path(series_uid, earlier, "sr")
            if path.is_file():
                return pydicom.dcmread(path, stop_before_pixels=True)
        return None

    def _queue_sends(self, series_uid: str, lineage: str, version: int, paths: list[Path]) -> None:
        if not self.config.destinations:
            log.info("result.kept", series_uid=series_uid, version=version,
                     folder=str(paths[0].parent) if paths else "")
            return
        for dest in self.config.destinations:
            ticket = self.jobs.add_send(series_uid, version, send_key(dest), paths, lineage=lineage)
            log.info("result.queued", series_uid=series_uid, ticket=ticket.name,
                     destination=ticket.destination)


def _bind(job: ProcessJob) -> Any:
    return log.bind(study_uid=job.study_uid, series_uid=job.series_uid, version=job.version)


def _wall_clock() -> Callable[[float], float]:
    """Maps a ``time.perf_counter()`` reading taken earlier in this process to wall-clock time."""
    offset = time.time() - time.perf_counter()
    return lambda counter: round(counter + offset, 3)


def _seconds(**spans: float) -> dict[str, float]:
    """``seconds_<stage>`` fields of the ``series.processed`` event, rounded to the millisecond.

    ``total`` runs from the start of routing to the end, hand-off waits (``waiting``) included;
    ``queued`` from the job being queued to the start of routing.
    """
    return {f"seconds_{name}": round(value, 3) for name, value in spans.items()}
