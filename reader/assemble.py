"""Series completion, and the header-only summary of a complete series.

DICOM has no "series complete" message (PS3.4 Storage Service Class stores instances one by one),
so completion is inferred from the associations that carry a series:

- a series is complete ``grace`` after the last association that carried one of its instances was
  released or aborted, with no instance of it arriving meanwhile (the usual PACS/modality push);
- or ``idle_timeout`` after its last instance, for senders that keep associations open or spread
  a series over several;
- and only once every series of its study being tracked is complete too, so that a study whose
  series come over one association (or several in a row) is taken whole, and a route that reads
  a study (``reader.study``) chooses among all of its series.

A late instance of an already processed series simply starts the clock again; processing then
yields a new result version that supersedes the old one (``reader.jobs``).

In a cluster several receivers share the work, and one study may come over associations to two of
them. Each receiver tracks its own associations here and records every instance in the shared
state (``recorder``: ``JobStore.record_arrival``) before it is acknowledged; the node then lets the
receiver that received a study's latest instance complete it (``reader.node``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from reader.config import CompletionConfig
from reader.errors import InputRejected

__all__ = ["CompleteSeries", "CompletionTracker", "SeriesSummary", "summarize_series"]


@dataclass
class _Activity:
    study_uid: str
    last_event: float
    last_instance: float
    open_associations: set[int] = field(default_factory=set)
    stat: bool = False
    last_arrival: float = 0.0  # wall clock (time.time) of the last instance, as recorded in a cluster


@dataclass(frozen=True, order=True)
class CompleteSeries:
    """A series whose completion was just inferred; ``stat`` when a sender marked it urgent;
    ``waited_s`` from its last instance to now (the completion wait, ``reader.metrics``);
    ``last_arrival`` the wall-clock time of that instance (0 for a series resumed from disk)."""

    study_uid: str
    series_uid: str
    stat: bool = False
    waited_s: float = field(default=0.0, compare=False)
    last_arrival: float = field(default=0.0, compare=False)


class CompletionTracker:
    """Thread-safe record of series activity; association threads report, one monitor consumes."""

    def __init__(self, config: CompletionConfig, clock: Callable[[], float] = time.monotonic,
                 recorder: Callable[[str, str, float, bool], None] | None = None) -> None:
        """``recorder(study, series, wall time, stat)`` is called for every stored instance before
        it is tracked (a cluster's shared state); what it raises reaches the caller, which then
        refuses the instance."""
        self._recorder = recorder
        self._grace = config.grace.total_seconds()
        self._idle = config.idle_timeout.total_seconds()
        self._clock = clock
        self._series: dict[str, _Activity] = {}
        self._by_association: dict[int, set[str]] = {}
        self._changed = threading.Condition()

    def instance_stored(self, association_id: int, study_uid: str, series_uid: str,
                        stat: bool = False) -> None:
        """An instance of ``series_uid`` was stored on association ``association_id``; ``stat``
        when the C-STORE request had Priority HIGH (PS3.7 9.1.1.1)."""
        wall = time.time()
        if self._recorder is not None:
            self._recorder(study_uid, series_uid, wall, stat)
        now = self._clock()
        with self._changed:
            act = self._series.get(series_uid)
            if act is None:
                act = self._series[series_uid] = _Activity(study_uid, now, now)
                # Only a new series can bring the next deadline closer; another instance of a known
                # series only moves its own deadline later. Waking the completion thread on every
                # instance cost the receive path ~9 % of its GIL time (bench/README.md).
                self._changed.notify_all()
            act.last_event = act.last_instance = now
            act.last_arrival = wall
            act.stat = act.stat or stat
            act.open_associations.add(association_id)
            self._by_association.setdefault(association_id, set()).add(series_uid)

    def association_ended(self, association_id: int) -> None:
        """Association ``association_id`` was released, aborted or lost."""
        now = self._clock()
        with self._changed:
            for series_uid in self._by_association.pop(association_id, set()):
                act = self._series.get(series_uid)
                if act is not None:
                    act.open_associations.discard(association_id)
                    act.last_event = now
            self._changed.notify_all()

    def resume(self, study_uid: str, series_uid: str, stat: bool = False, last_arrival: float = 0.0) -> None:
        """Track a series found on disk at start-up as if its last association just ended (also a
        series a cluster's receiver looks at again later, ``reader.node``)."""
        now = self._clock()
        with self._changed:
            act = self._series.setdefault(series_uid, _Activity(study_uid, now, now))
            act.stat = act.stat or stat
            act.last_arrival = max(act.last_arrival, last_arrival)
            self._changed.notify_all()

    def tracks_study(self, study_uid: str) -> bool:
        """True while a series of ``study_uid`` is being tracked here."""
        with self._changed:
            return any(act.study_uid == study_uid for act in self._series.values())

    def pop_complete(self) -> list[CompleteSeries]:
        """Series complete now, with every tracked series of their study, STAT ones first; they stop
        being tracked."""
        now = self._clock()
        with self._changed:
            waiting = {act.study_uid for act in self._series.values() if self._deadline(act) > now}
            done = [uid for uid, act in self._series.items() if act.study_uid not in waiting]
            popped = [(uid, self._series.pop(uid)) for uid in done]
            return sorted((CompleteSeries(a.study_uid, uid, a.stat, now - a.last_instance, a.last_arrival)
                           for uid, a in popped),
                          key=lambda c: not c.stat)

    def wait(self, timeout: float) -> None:
        """Block until activity is reported, the next series may complete, or ``timeout`` passes."""
        with self._changed:
            latest: dict[str, float] = {}  # a study completes with its last series
            for act in self._series.values():
                latest[act.study_uid] = max(latest.get(act.study_uid, 0.0), self._deadline(act))
            until_next = min(latest.values(), default=float("inf")) - self._clock()
            if until_next > 0:
                self._changed.wait(min(timeout, until_next))

    def wake(self) -> None:
        """Wake a thread blocked in :meth:`wait` (used at shutdown)."""
        with self._changed:
            self._changed.notify_all()

    def tracked(self) -> int:
        """Number of series still collecting."""
        with self._changed:
            return len(self._series)

    def _deadline(self, act: _Activity) -> float:
        idle = act.last_instance + self._idle
        if act.open_associations:
            return idle
        return min(idle, act.last_event + self._grace)


@dataclass(frozen=True)
class SeriesSummary:
    """What routing reads of a series: header attributes of one instance plus the count.

    PS3.3 C.7.3.1 (General Series: Modality, Series Number, Series Description, Body Part
    Examined), C.12.1 (SOP Common: SOP Class UID), C.7.6.2 (Image Plane: Slice Thickness),
    C.8.2.1 (CT Image: Convolution Kernel, its first value).
    """

    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    series_description: str
    instance_count: int
    slice_thickness_mm: float | None
    accession_number_present: bool
    kernel: str = ""
    series_number: int | None = None


def summarize_series(study_uid: str, series_uid: str, files: Sequence[Path]) -> SeriesSummary:
    """Summarise a stored series from the header of its first file (pixel data is not read)."""
    if not files:
        raise InputRejected("empty_series", series_uid)
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputRejected("unreadable_instance", str(exc)) from exc
    thickness = ds.get("SliceThickness")
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    kernel = ds.get("ConvolutionKernel", "")
    if not isinstance(kernel, str):  # multi-valued (CS, VM 1-n): the first value names the kernel
        kernel = str(kernel[0]) if len(kernel) else ""
    number = ds.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return SeriesSummary(
        study_uid=study_uid,
        series_uid=series_uid,
        modality=str(ds.get("Modality", "")).upper(),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        body_part=str(ds.get("BodyPartExamined", "")).upper(),
        series_description=str(ds.get("SeriesDescription", "")),
        instance_count=len(files) if frames <= 1 else frames,
        slice_thickness_mm=thickness_mm,
        accession_number_present=bool(ds.get("AccessionNumber")),
        kernel=kernel.strip(),
        series_number=series_number,
    )
