"""The last associations the listener saw, in memory, for the status page (``reader.web``).

A bounded ring (the newest :data:`RECENT` associations since the node started; nothing on disk, no
patient data): who called (AE title, address), whether the association was accepted or rejected
and why, how many instances it stored and which it refused, with the reason. ``reader.scp`` records
into it from the association threads; the page reads :meth:`AssociationLog.recent`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

__all__ = ["RECENT", "AssociationLog", "AssociationRecord"]

RECENT = 200  # associations kept


@dataclass
class AssociationRecord:
    """One association: its caller, outcome and what it stored (mutable while it lasts)."""

    calling_ae: str
    address: str
    started_at: float = field(default_factory=time.time)
    rejected: str = ""  # why the association itself was rejected ("" when accepted)
    instances: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # instance refusals by reason
    ended_at: float | None = None


class AssociationLog:
    """Thread-safe ring of :class:`AssociationRecord`, keyed by the association's ``id()``."""

    def __init__(self, size: int = RECENT) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._records: OrderedDict[int, AssociationRecord] = OrderedDict()

    def opened(self, key: int, calling_ae: str, address: str, rejected: str = "") -> None:
        """An association was accepted (``rejected`` empty) or rejected with that reason."""
        with self._lock:
            self._records[key] = AssociationRecord(calling_ae.strip(), address, rejected=rejected)
            self._records.move_to_end(key)
            while len(self._records) > self._size:
                self._records.popitem(last=False)
            if rejected:
                self._records[key].ended_at = time.time()

    def stored(self, key: int) -> None:
        """One instance of association ``key`` was stored."""
        with self._lock:
            if (record := self._records.get(key)) is not None:
                record.instances += 1

    def refused(self, key: int, reason: str) -> None:
        """One instance of association ``key`` was refused, for ``reason`` (a reason name)."""
        with self._lock:
            if (record := self._records.get(key)) is not None:
                record.refused[reason] += 1

    def ended(self, key: int) -> None:
        """Association ``key`` was released, aborted or its connection closed."""
        with self._lock:
            if (record := self._records.get(key)) is not None and record.ended_at is None:
                record.ended_at = time.time()

    def recent(self) -> list[AssociationRecord]:
        """Copies of the records, newest first."""
        with self._lock:
            return [AssociationRecord(r.calling_ae, r.address, r.started_at, r.rejected, r.instances,
                                      Counter(r.refused), r.ended_at)
                    for r in reversed(self._records.values())]
