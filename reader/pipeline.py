"""One complete series through route -> volume -> inference -> encoding -> send tickets.

Every stage logs a timing event; the outcome is recorded durably with the job (``reader.jobs``).
Typed errors from the stages become a recorded status here: rejected input and unmatched routes
are *skipped* with the reason, model and encoder failures *failed* with the reason.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog

from reader.assemble import summarize_series
from reader.config import NodeConfig
from reader.errors import EncodingError, InputRejected, ModelError
from reader.flag import decide
from reader.inference import ModelPackage
from reader.jobs import JobStore, ProcessJob, SeriesStatus
from reader.notify.hl7 import build_oru, message_control_id
from reader.notify.summary import StudyReport
from reader.notify.webhook import event_json
from reader.results import encode_results
from reader.results.kos import encode_kos
from reader.routing import Skip, route_series
from reader.spool import Spool
from reader.volume import load_volume

__all__ = ["Pipeline", "destination_key"]

log = structlog.get_logger(__name__)


def destination_key(ae_title: str, host: str, port: int) -> str:
    """The ``AE@HOST:PORT`` form a send ticket names its destination by."""
    return f"{ae_title}@{host}:{port}"


@dataclass(frozen=True)
class Pipeline:
    """Processes jobs with models loaded once by the node."""

    config: NodeConfig
    spool: Spool
    jobs: JobStore
    models: Mapping[str, ModelPackage]

    def process(self, job: ProcessJob) -> SeriesStatus:
        """Run one job to its recorded outcome; never raises for a bad series or a model failure."""
        bound = log.bind(study_uid=job.study_uid, series_uid=job.series_uid, version=job.version)
        t0 = time.perf_counter()
        wanted = set(job.instances)
        files = [p for p in self.spool.series_instances(job.study_uid, job.series_uid) if p.stem in wanted]
        try:
            summary = summarize_series(job.study_uid, job.series_uid, files)
            routed = route_series(self.config.routes, summary)
            if isinstance(routed, Skip):
                bound.info("series.skipped", reason=routed.reason)
                self.jobs.finish_job(job, SeriesStatus.SKIPPED, routed.reason)
                return SeriesStatus.SKIPPED
            route = routed.route
            model = self.models[route.model]
            bound.info("series.routed", route=route.name, model=model.manifest.model.name,
                       instances=len(files))
            t1 = time.perf_counter()
            volume = load_volume(files)
            t2 = time.perf_counter()
            result = model.run(volume)
            t3 = time.perf_counter()
            objects = encode_results(volume, result, result_version=job.version,
                                     previous_sr=self._previous_sr(job))
            flag = decide(route.flag, result.findings)
            kos = None
            if flag.flagged:
                kos = encode_kos(volume, result, seg=objects.seg, sr=objects.sr,
                                 result_version=job.version, decision=flag)
            t4 = time.perf_counter()
        except InputRejected as exc:
            bound.warning("series.rejected", reason=exc.reason, detail=exc.detail)
            self.jobs.finish_job(job, SeriesStatus.SKIPPED, f"{exc.reason}: {exc.detail}")
            return SeriesStatus.SKIPPED
        except (ModelError, EncodingError) as exc:
            bound.error("series.failed", error=type(exc).__name__, detail=str(exc))
            self.jobs.finish_job(job, SeriesStatus.FAILED, f"{type(exc).__name__}: {exc}")
            return SeriesStatus.FAILED
        encoded = [(kind, ds) for kind, ds in (("SEG", objects.seg), ("SR", objects.sr), ("KOS", kos))
                   if ds is not None]
        paths = [self._write_dataset(job, kind.lower(), ds) for kind, ds in encoded]
        report = StudyReport.build(
            source=pydicom.dcmread(volume.sources[0].path, stop_before_pixels=True),
            series_instance_uid=job.series_uid, decision=flag, findings=result.findings,
            algorithm=result.algorithm, result_version=job.version, objects=encoded)
        notifications = self._render_notifications(job, report)
        t5 = time.perf_counter()
        if not self.jobs.job_is_current(job):
            bound.info("series.superseded")
            return SeriesStatus.DONE
        self._queue_sends(job, paths)
        for key, path in notifications:
            self.jobs.add_send(job.series_uid, job.version, key, [path])
        self.jobs.finish_job(job, SeriesStatus.DONE, flag=flag.as_record())
        bound.info("series.processed", findings=len(result.findings), flag=flag.state.value,
                   route=route.name, provider=result.provider,
                   seconds_route=round(t1 - t0, 3), seconds_volume=round(t2 - t1, 3),
                   seconds_inference=round(t3 - t2, 3), seconds_encode=round(t4 - t3, 3),
                   seconds_write=round(t5 - t4, 3), seconds_total=round(time.perf_counter() - t0, 3))
        return SeriesStatus.DONE

    def _write_dataset(self, job: ProcessJob, kind: str, ds: pydicom.Dataset) -> Path:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return self.spool.write_result(job.series_uid, job.version, kind, buffer.getvalue())

    def _render_notifications(self, job: ProcessJob, report: StudyReport) -> list[tuple[str, Path]]:
        """Render each HL7 message and the webhook event once, durably, so every retry sends the
        same bytes; returns (ticket destination key, file) pairs. Negative studies go only to
        targets that want them (``send_negative``)."""
        worklist = self.config.worklist
        out: list[tuple[str, Path]] = []
        for hl7 in worklist.hl7:
            if report.flagged or hl7.send_negative:
                key = hl7.endpoint.key
                message = build_oru(report, sending_app=worklist.sending_application,
                                    sending_facility=worklist.sending_facility,
                                    receiving_app=hl7.receiving_application,
                                    receiving_facility=hl7.receiving_facility,
                                    control_id=message_control_id(job.series_uid, job.version, key))
                name = "hl7-" + hashlib.sha256(key.encode()).hexdigest()[:12]
                out.append((key, self.spool.write_result(job.series_uid, job.version, name,
                                                         message.encode("utf-8"), suffix=".hl7")))
        hooks = [w for w in worklist.webhooks if report.flagged or w.send_negative]
        if hooks:
            path = self.spool.write_result(job.series_uid, job.version, "webhook", event_json(report),
                                           suffix=".json")
            out.extend((w.endpoint.key, path) for w in hooks)
        return out

    def _previous_sr(self, job: ProcessJob) -> pydicom.Dataset | None:
        """The SR of the latest earlier result version of the series, which this one supersedes."""
        for version in range(job.version - 1, 0, -1):
            path = self.spool.result_path(job.series_uid, version, "sr")
            if path.is_file():
                return pydicom.dcmread(path, stop_before_pixels=True)
        return None

    def _queue_sends(self, job: ProcessJob, paths: list[Path]) -> None:
        if not self.config.destinations:
            log.info("result.kept", series_uid=job.series_uid, version=job.version,
                     folder=str(paths[0].parent) if paths else "")
            return
        for dest in self.config.destinations:
            ticket = self.jobs.add_send(job.series_uid, job.version,
                                        destination_key(dest.ae_title, dest.host, dest.port), paths)
            log.info("result.queued", series_uid=job.series_uid, ticket=ticket.name,
                     destination=ticket.destination)
