"""Dispatch: deliver send tickets to their destinations, with durable retries.

Each attempt is one association (``reader.send.StoreSCU``). The outcome is classified:
success -> done; transient failure -> retried with exponential backoff and jitter until
``max_attempts``, then parked; permanent failure (PS3.4 C-STORE failure statuses such as
0xA9xx/0xCxxx/0x0122, or a rejected calling AE) -> parked at once with the reason. Parked tickets
wait for ``reader retry``. Attempts and the next retry time are on disk, so restarts keep the schedule.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import structlog

from reader.config import SendingConfig
from reader.errors import PermanentSendError, SendError, TransientSendError
from reader.jobs import JobStore, SendState, SendTicket, backoff
from reader.send import Destination, StoreSCU

__all__ = ["Dispatcher"]

log = structlog.get_logger(__name__)


class Dispatcher:
    """Sends due tickets; one instance is driven by one thread of the node."""

    def __init__(self, jobs: JobStore, scu: StoreSCU, config: SendingConfig,
                 rng: random.Random | None = None,
                 destinations: Mapping[str, Destination] | None = None) -> None:
        """``destinations`` maps a ticket's ``AE@HOST:PORT`` to the configured destination, which
        carries its TLS settings; a ticket naming no configured destination is sent as parsed."""
        self._jobs = jobs
        self._scu = scu
        self._config = config
        self._rng = rng or random.Random()
        self._destinations = dict(destinations or {})

    def due(self, now: float) -> list[SendTicket]:
        """Pending tickets whose next attempt is due."""
        return [t for t in self._jobs.sends() if t.state is SendState.PENDING and t.next_attempt_at <= now]

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next pending ticket is due, or None when nothing is pending."""
        times = [t.next_attempt_at for t in self._jobs.sends() if t.state is SendState.PENDING]
        return max(0.0, min(times) - now) if times else None

    def attempt(self, ticket: SendTicket) -> SendTicket:
        """Make one delivery attempt and durably record its outcome.

        The ticket is read again first: one superseded (or re-queued) since ``due`` listed it is
        returned as it now stands, unsent.
        """
        current = self._jobs.send(ticket.name)
        if current is None or current.state is not SendState.PENDING:
            return current or ticket
        ticket = current
        attempts = ticket.attempts + 1
        bound = log.bind(ticket=ticket.name, series_uid=ticket.series_uid, destination=ticket.destination,
                         attempt=attempts)
        try:
            destination = self._destinations.get(ticket.destination) or Destination.parse(ticket.destination)
            report = self._scu.send(destination, [Path(f) for f in ticket.files])
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
            bound.info("result.sent", instances=len(report.sent), warnings=len(report.warnings),
                       seconds=round(report.seconds, 3))
        self._jobs.update_send(updated)
        return updated
