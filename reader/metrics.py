"""Prometheus metrics of one node, served at ``/metrics`` by its HTTP server (``reader.web``).

Every metric is defined here, in a registry of the node's own (several nodes may share a process,
as in the tests); the rest of the node reports events through the small methods of
:class:`NodeMetrics`, which only bump counters in memory (no I/O, safe in an association's
thread). What is a state rather than an event (queue depths, free disk) is read when Prometheus
scrapes (:meth:`NodeMetrics.watch`).

=============================================  =========  =========================================
metric                                         labels     what
=============================================  =========  =========================================
``reader_instances_received_total``            protocol,  instances stored (C-STORE ``dimse`` or
                                               calling_ae ``stow-rs``; calling AE title, or the
                                                          STOW-RS caller's name)
``reader_received_bytes_total``                protocol,  their encoded bytes
                                               calling_ae
``reader_instances_refused_total``             reason     instances answered with a failure
``reader_associations_accepted_total``         calling_ae associations accepted
``reader_associations_rejected_total``         reason     A-ASSOCIATE-RJ sent (allow-list verdict,
                                                          or pynetdicom's own reasons)
``reader_series_completed_total``                         series whose completion was inferred
``reader_series_processed_total``                         series read, results written
``reader_series_skipped_total``                           series no route reads, or rejected input
``reader_series_failed_total``                            series whose model or encoder failed
``reader_stage_seconds``                       stage      histogram: ``completion_wait`` (last
                                                          instance -> complete), ``load``,
                                                          ``inference``, ``encoding``, ``send``
``reader_queue_depth``                         stage      series per stage now: ``collecting``,
                                                          ``queued``, ``loading``, ``ready``,
                                                          ``inferring``, ``handed``, ``finishing``;
                                                          send tickets ``sending``
``reader_sends_total``                         target,    settled deliveries: ``sent``, ``parked``
                                               outcome
``reader_send_retries_total``                  target     failed attempts scheduled again
``reader_disk_free_bytes``                                free space of the data dir's filesystem
``reader_disk_min_free_bytes``                            the watermark below which stores refuse
``reader_model_info``                          model,     1 per loaded model
                                               name, ...  (name, version, weights_sha256,
                                                          provider, precision)
=============================================  =========  =========================================

No label carries patient or study data: AE titles, caller names, target keys (``AE@HOST:PORT``,
URLs without query), reasons and stage names only. Calling AE titles are bounded
(:data:`MAX_CALLING_AES`; later ones count as ``_other``), as the port may be open to any AE.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from reader.jobs import SeriesStatus

__all__ = ["MAX_CALLING_AES", "OTHER", "PROTOCOL_DIMSE", "PROTOCOL_STOW", "STAGES", "NodeMetrics"]

PROTOCOL_DIMSE = "dimse"
PROTOCOL_STOW = "stow-rs"
STAGE_COMPLETION = "completion_wait"
STAGE_LOAD = "load"
STAGE_INFERENCE = "inference"
STAGE_ENCODING = "encoding"
STAGE_SEND = "send"
STAGES = (STAGE_COMPLETION, STAGE_LOAD, STAGE_INFERENCE, STAGE_ENCODING, STAGE_SEND)
SEND_SENT = "sent"
SEND_PARKED = "parked"
MAX_CALLING_AES = 64  # distinct calling_ae label values; more would let any caller grow the scrape
OTHER = "_other"
# seconds: milliseconds of encoding up to minutes of CPU inference on a large series
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))

# A-ASSOCIATE-RJ (PS3.8 Table 9-21): (source, diagnostic) -> reason label
_RJ_REASONS = {
    (0x01, 0x02): "application_context_not_supported",
    (0x01, 0x03): "calling_ae_not_recognized",
    (0x01, 0x07): "called_ae_not_recognized",
    (0x02, 0x01): "acse_no_reason",
    (0x02, 0x02): "protocol_version_not_supported",
    (0x03, 0x01): "temporary_congestion",
    (0x03, 0x02): "too_many_associations",
}


def rejection_reason(source: int | None, diagnostic: int | None) -> str:
    """The ``reason`` label of an A-ASSOCIATE-RJ from its Result Source and Reason/Diag."""
    return _RJ_REASONS.get((source or 0, diagnostic or 0), f"source_{source}_diagnostic_{diagnostic}")


class _StateCollector(Collector):
    """Queue depths and free disk, read at scrape time."""

    def __init__(self, depths: Callable[[], Mapping[str, int]], data_dir: Path, min_free_bytes: int) -> None:
        self._depths = depths
        self._data_dir = data_dir
        self._min_free = min_free_bytes

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("reader_queue_depth", "Series (or send tickets) in each stage now.",
                                  labels=["stage"])
        for stage, count in self._depths().items():
            depth.add_metric([stage], count)
        yield depth
        try:
            free = shutil.disk_usage(self._data_dir).free
        except OSError:  # the data dir is gone: /readyz says so; no sample rather than a false one
            pass
        else:
            yield GaugeMetricFamily("reader_disk_free_bytes", "Free bytes on the data dir's filesystem.",
                                    value=free)
        yield GaugeMetricFamily("reader_disk_min_free_bytes",
                                "Free-space watermark below which instances are refused.",
                                value=self._min_free)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing at registration: collect() reads the node, not ready yet


class NodeMetrics:
    """The metrics of one node, in a registry of its own (:attr:`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._instances = Counter("reader_instances_received", "Instances stored.",
                                  ["protocol", "calling_ae"], registry=r)
        self._bytes = Counter("reader_received_bytes", "Encoded bytes of the instances stored.",
                              ["protocol", "calling_ae"], registry=r)
        self._refused = Counter("reader_instances_refused", "Instances answered with a failure status.",
                                ["reason"], registry=r)
        self._accepted = Counter("reader_associations_accepted", "Associations accepted.",
                                 ["calling_ae"], registry=r)
        self._rejected = Counter("reader_associations_rejected", "Associations rejected (A-ASSOCIATE-RJ).",
                                 ["reason"], registry=r)
        self._completed = Counter("reader_series_completed", "Series whose completion was inferred.",
                                  registry=r)
        self._processed = Counter("reader_series_processed", "Series read, results written.", registry=r)
        self._skipped = Counter("reader_series_skipped", "Series skipped (no route, rejected input).",
                                registry=r)
        self._failed = Counter("reader_series_failed", "Series failed (model or encoder).", registry=r)
        self._stage = Histogram("reader_stage_seconds", "Seconds one series (or one send) spent in a stage.",
                                ["stage"], buckets=_BUCKETS, registry=r)
        self._sends = Counter("reader_sends", "Send tickets settled, by target and outcome.",
                              ["target", "outcome"], registry=r)
        self._retries = Counter("reader_send_retries", "Failed send attempts scheduled again.",
                                ["target"], registry=r)
        self._model = Info("reader_model", "Models loaded (1 per model).", ["model"], registry=r)
        for stage in STAGES:  # every stage shows from the start, at zero
            self._stage.labels(stage)
        self._lock = threading.Lock()
        self._ae_labels: set[str] = set()
        self._received: dict[tuple[str, str], tuple[Counter, Counter]] = {}  # label children, cached

    # --- receiving (association threads, STOW-RS requests) ----------------------------------------
    def _ae(self, calling_ae: str) -> str:
        ae = calling_ae.strip()
        if ae in self._ae_labels:
            return ae
        with self._lock:
            if len(self._ae_labels) < MAX_CALLING_AES:
                self._ae_labels.add(ae)
                return ae
        return OTHER

    def instance_received(self, protocol: str, calling_ae: str, size: int) -> None:
        """One instance stored, ``size`` encoded bytes."""
        key = (protocol, calling_ae)
        children = self._received.get(key)
        if children is None:
            ae = self._ae(calling_ae)
            children = self._received.setdefault(key, (self._instances.labels(protocol, ae),
                                                       self._bytes.labels(protocol, ae)))
        children[0].inc()
        children[1].inc(size)

    def instance_refused(self, reason: str) -> None:
        """One instance answered with a failure status (``out_of_resources``, a rejection reason)."""
        self._refused.labels(reason).inc()

    def association_accepted(self, calling_ae: str) -> None:
        """An association was accepted."""
        self._accepted.labels(self._ae(calling_ae)).inc()

    def association_rejected(self, reason: str) -> None:
        """An A-ASSOCIATE-RJ was sent."""
        self._rejected.labels(reason).inc()

    # --- processing -------------------------------------------------------------------------------
    def series_completed(self, waited_s: float) -> None:
        """A series was found complete ``waited_s`` after its last instance."""
        self._completed.inc()
        self._stage.labels(STAGE_COMPLETION).observe(waited_s)

    def series_finished(self, status: SeriesStatus) -> None:
        """A series' outcome was recorded (``reader.jobs.JobStore.finish_job``): done (processed),
        skipped or failed."""
        counter = {SeriesStatus.DONE: self._processed, SeriesStatus.SKIPPED: self._skipped,
                   SeriesStatus.FAILED: self._failed}.get(status)
        if counter is not None:
            counter.inc()

    def stage_seconds(self, stage: str, seconds: float) -> None:
        """One series (or send attempt) spent ``seconds`` in ``stage`` (one of :data:`STAGES`)."""
        self._stage.labels(stage).observe(seconds)

    # --- sending ----------------------------------------------------------------------------------
    def send_settled(self, target: str, outcome: str) -> None:
        """A send ticket was delivered (``sent``) or parked (``parked``)."""
        self._sends.labels(target, outcome).inc()

    def send_retry(self, target: str) -> None:
        """A send attempt failed and was scheduled again."""
        self._retries.labels(target).inc()

    # --- state --------------------------------------------------------------------------------------
    def model_loaded(self, key: str, *, name: str, version: str, weights_sha256: str, provider: str,
                     precision: str) -> None:
        """A model is loaded under the configuration key ``key``."""
        self._model.labels(key).info({"name": name, "version": version, "weights_sha256": weights_sha256,
                                      "provider": provider, "precision": precision})

    def watch(self, depths: Callable[[], Mapping[str, int]], data_dir: Path, min_free_bytes: int) -> None:
        """Read ``depths()`` (stage -> count) and the data dir's free space at every scrape."""
        self.registry.register(_StateCollector(depths, data_dir, min_free_bytes))

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape body in the format ``accept`` asks for (Prometheus text, or OpenMetrics), and
        its media type. Reads the watched state: call it off the event loop."""
        encoder, media_type = choose_encoder(accept)
        return encoder(self.registry), media_type
