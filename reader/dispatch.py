"""Dispatch: deliver send tickets to their targets, with durable retries.

A ticket names its target by key: ``AE@HOST:PORT`` for a DICOM destination (one association per
attempt, ``reader.send.StoreSCU``), ``mllp://HOST:PORT`` for an HL7 listener
(``reader.notify.hl7``), an ``http(s)://`` URL for a webhook (``reader.notify.webhook``),
``stow:`` + a base URL for a DICOMweb service (STOW-RS, ``reader.dicomweb``); targets
register by key (:class:`Delivery`). Every kind raises the same typed errors, classified alike:
success -> done; transient failure -> retried with exponential backoff and jitter until
``max_attempts``, then parked; permanent failure (PS3.4 C-STORE failure statuses such as
0xA9xx/0xCxxx/0x0122, a rejected calling AE, an HTTP 4xx such as 401 or 409) -> parked at once with
the reason. Parked tickets
wait for ``reader retry``. Attempts and the next retry time are on disk, so restarts keep the schedule.
Only pending tickets are read on each pass (``JobStore.pending_sends``): settled ones are archived.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from reader.audit import AuditTrail
from reader.config import SendingConfig
from reader.dicomweb import StowDestination, store_instances
from reader.errors import PermanentSendError, SendError, TransientSendError
from reader.jobs import JobStore, SendState, SendTicket, backoff
from reader.metrics import SEND_PARKED, SEND_SENT, STAGE_SEND, NodeMetrics
from reader.notify.hl7 import MllpEndpoint, send_oru
from reader.notify.webhook import WebhookEndpoint, post_event
from reader.send import Destination, StoreSCU

__all__ = ["Delivery", "DicomDelivery", "Dispatcher", "MllpDelivery", "StowDelivery", "WebhookDelivery"]

log = structlog.get_logger(__name__)


class Delivery(Protocol):
    """One target of send tickets: delivers a ticket's files or raises a SendError."""

    def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
        """Deliver ``files``; returns fields for the ``result.sent`` event."""
        ...


@dataclass(frozen=True)
class DicomDelivery:
    """C-STORE of result objects to a DICOM destination (TLS settings included)."""

    scu: StoreSCU
    destination: Destination

    def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
        """Store every file on one association."""
        report = self.scu.send(self.destination, list(files))
        return {"destination_ae": self.destination.ae_title, "instances": len(report.sent),
                "warnings": len(report.warnings), "seconds": round(report.seconds, 3)}


@dataclass(frozen=True)
class StowDelivery:
    """STOW-RS of result objects to a DICOMweb service (credentials and TLS trust included)."""

    destination: StowDestination

    def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
        """Store every file in one STOW-RS request."""
        report = store_instances(self.destination, list(files))
        return {"instances": len(report.sent), "warnings": report.warnings,
                "http_status": report.http_status, "seconds": round(report.seconds, 3)}


@dataclass(frozen=True)
class MllpDelivery:
    """An ORU^R01, rendered at queue time, to an HL7 listener."""

    endpoint: MllpEndpoint

    def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
        """Send each rendered message and read its ACK."""
        acks = [send_oru(self.endpoint, Path(f).read_text(encoding="utf-8")) for f in files]
        return {"acks": acks}


@dataclass(frozen=True)
class WebhookDelivery:
    """A signed JSON event, rendered at queue time, to a URL."""

    endpoint: WebhookEndpoint

    def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
        """POST each rendered event."""
        return {"http_status": [post_event(self.endpoint, Path(f).read_bytes()) for f in files]}


class Dispatcher:
    """Sends due tickets; one instance is driven by one thread of the node."""

    def __init__(self, jobs: JobStore, config: SendingConfig, targets: Mapping[str, Delivery],
                 scu: StoreSCU, rng: random.Random | None = None, *, audit: AuditTrail | None = None,
                 metrics: NodeMetrics | None = None, lease_s: float = 60.0) -> None:
        """``targets`` maps ticket keys to configured targets; a DICOM key that is no longer
        configured is still sent, as parsed, with ``scu``; another unknown key is parked. DICOM
        objects delivered (C-STORE, STOW-RS) are audited in ``audit``; ``metrics`` counts the
        outcomes (a private set when not given). Each attempt leases its ticket first (processes of
        a cluster dispatch the same queue) for ``lease_s``, or four association timeouts if longer."""
        self._lease_s = max(lease_s, 4 * config.association_timeout.total_seconds())
        self._audit = audit
        self._jobs = jobs
        self._metrics = metrics or NodeMetrics()
        self._config = config
        self._targets = dict(targets)
        self._scu = scu
        self._rng = rng or random.Random()

    def _target(self, key: str) -> Delivery:
        target = self._targets.get(key)
        if target is not None:
            return target
        if "://" in key:
            raise PermanentSendError(f"{key} is no longer configured")
        try:
            return DicomDelivery(self._scu, Destination.parse(key))
        except ValueError as exc:
            raise PermanentSendError(f"unusable destination {key!r}: {exc}") from exc

    def due(self, now: float) -> list[SendTicket]:
        """Pending tickets whose next attempt is due."""
        return [t for t in self._jobs.pending_sends() if t.next_attempt_at <= now]

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next pending ticket is due, or None when nothing is pending."""
        times = [t.next_attempt_at for t in self._jobs.pending_sends()]
        return max(0.0, min(times) - now) if times else None

    def attempt(self, ticket: SendTicket) -> SendTicket:
        """Make one delivery attempt and durably record its outcome.

        The ticket is leased first, which reads it again: one superseded (or re-queued) since
        ``due`` listed it, or leased by another process of a cluster, is returned as it now stands,
        unsent. Recording the outcome ends the lease.
        """
        current = self._jobs.claim_send(ticket.name, self._lease_s)
        if current is None:
            return self._jobs.send(ticket.name) or ticket
        ticket = current
        attempts = ticket.attempts + 1
        bound = log.bind(ticket=ticket.name, series_uid=ticket.series_uid, destination=ticket.destination,
                         attempt=attempts)
        files = [Path(f) for f in ticket.files]
        target: Delivery | None = None
        started = time.perf_counter()
        try:
            if not all(f.is_file() for f in files):  # a parked ticket retried after retention or a purge
                raise PermanentSendError("result files no longer stored (retention or reader purge)")
            target = self._target(ticket.destination)
            sent = target.deliver(files)
        except PermanentSendError as exc:
            updated = replace(ticket, state=SendState.FAILED, attempts=attempts, last_error=str(exc),
                              last_status=exc.status)
            bound.error("send.parked", reason="permanent", detail=str(exc), status=exc.status)
        except (TransientSendError, SendError) as exc:
            status = exc.status
            if attempts >= self._config.max_attempts:
                updated = replace(ticket, state=SendState.FAILED, attempts=attempts,
                                  last_error=f"gave up after {attempts} attempts: {exc}", last_status=status)
                bound.error("send.parked", reason="attempts_exhausted", detail=str(exc), status=status)
            else:
                delay = backoff(attempts, self._config.retry_initial, self._config.retry_max, self._rng)
                updated = replace(ticket, attempts=attempts,
                                  next_attempt_at=time.time() + delay.total_seconds(),
                                  last_error=str(exc), last_status=status)
                bound.warning("send.retry_scheduled", detail=str(exc), status=status,
                              in_seconds=round(delay.total_seconds(), 2))
        else:
            updated = replace(ticket, state=SendState.DONE, attempts=attempts, last_error="",
                              last_status=None)
            bound.info("result.sent", **sent)
        self._metrics.stage_seconds(STAGE_SEND, time.perf_counter() - started)
        self._jobs.update_send(updated)
        if updated.state is SendState.PENDING:
            self._metrics.send_retry(ticket.destination)
        else:
            self._metrics.send_settled(ticket.destination,
                                       SEND_SENT if updated.state is SendState.DONE else SEND_PARKED)
        if updated.state is SendState.DONE and self._audit is not None \
                and isinstance(target, DicomDelivery | StowDelivery):
            self._audit.results_sent(ticket.destination, files)
        return updated
