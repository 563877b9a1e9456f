"""Retention: delete what the node has finished with, never what it still needs.

What goes, and when (``[retention]``, :class:`reader.config.RetentionConfig`; ``None`` keeps):

- a series' received instances (``incoming/<study>/<series>/``), ``instances`` after the series
  settled: its last processing recorded (done, skipped or failed) and every send of its results
  delivered or parked;
- a result version's files (``results/<series>/v<N>/``), ``results`` after its sends settled;
- a series' settled state (its ``SeriesState``, its settled send tickets, and its study's lineage
  once none of the lineage's series is left: rows of the state database, read and written through
  ``reader.jobs.JobStore``), ``history`` after its last change, once its instances and results are gone;
- under disk pressure (free space below ``node.min_free_disk_mb`` + ``disk_margin_mb``), instances
  and results that may go whatever their age, the longest settled first, until free space is back
  above that line.

Never deleted, whatever the age or the pressure:

- the instances of a series not yet processed with exactly what is stored (collecting, queued,
  being processed), or whose results still have a pending send; and every series of a study with a
  queued job, since a study read whose chosen series is rejected reads the series passed over
  (``JobStore.requeue_series``), or held by a backfill waiting for its instances (``reader.holds``);
- result files with a pending send, and the results of a study with a queued job (the next
  version's SR names the previous one);
- the state of anything still stored, queued or pending.

Every deletion of a study's instances, by a sweep or a purge, is audited (``reader.audit``: A.5.3.6
DICOM Study Deleted, by the node or by the account that ran ``reader purge``); a purge's marker
holds the patient's ID and name for that message until the purge completes.

A crash never leaves a state that loses or re-sends anything: deleting instances, results or a whole
study (:meth:`Retention.purge_study`) first writes a durable marker, ``state/purging/<name>.json``,
naming what goes; then the files go (their folders fsynced); then the marker. The node completes the
markers it finds at start (:meth:`Retention.resume`) before it looks for unfinished series, so a
series half deleted is never mistaken for one half received. State goes after the files it points
to, a series' state last, so an interrupted history sweep leaves state the next sweep takes again.
Deciding and deleting instances happen under the job store's lock: no job is queued in between.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import structlog

from reader.audit import AuditTrail, PatientObject
from reader.config import RetentionConfig
from reader.faults import crash_point
from reader.holds import HOLDS
from reader.jobs import JobStore, SendState, SendTicket, SeriesState, SeriesStatus
from reader.spool import Spool, check_uid

__all__ = ["PurgeReport", "Retention", "StudyActivity", "SweepCounts", "record_purge"]

log = structlog.get_logger(__name__)

_MARKERS = "purging"  # state/purging/: deletions under way


@dataclass
class SweepCounts:
    """What one sweep deleted (the fields of the ``retention.swept`` event)."""

    series: int = 0  # series whose received instances were deleted
    instances: int = 0  # instance files deleted
    results: int = 0  # result versions deleted
    history: int = 0  # series states deleted, with their settled send tickets
    pressure: int = 0  # of the series and result versions, those deleted for disk pressure
    completed: int = 0  # interrupted deletions (markers) completed
    freed_bytes: int = 0


@dataclass(frozen=True)
class StudyActivity:
    """What of a study the node still works on (``reader purge`` refuses or cancels it)."""

    series: tuple[str, ...]
    queued_jobs: tuple[str, ...]  # series UIDs
    pending_sends: tuple[SendTicket, ...]
    collecting: tuple[str, ...]  # series with received instances not yet queued

    @property
    def in_flight(self) -> bool:
        """True while anything of the study is queued, pending or being received."""
        return bool(self.queued_jobs or self.pending_sends or self.collecting)

    @property
    def known(self) -> bool:
        """True when anything of the study is stored."""
        return bool(self.series)


@dataclass(frozen=True)
class PurgeReport:
    """What :meth:`Retention.purge_study` removed."""

    study_uid: str
    series: tuple[str, ...]
    instances: int
    results: int  # result versions
    jobs_dropped: int
    cancelled_sends: tuple[dict[str, str], ...]  # ticket name and destination of each pending send
    reason: str
    resumed: bool  # completed after an interruption


def record_purge(report: PurgeReport) -> None:
    """Every completed purge passes here: the ``study.purged`` event (the audit message is
    :meth:`Retention._audit_deleted`'s)."""
    log.info("study.purged", study_uid=report.study_uid, series=len(report.series),
             instances=report.instances, results=report.results, jobs_dropped=report.jobs_dropped,
             cancelled_sends=len(report.cancelled_sends),
             cancelled_destinations=sorted({c["destination"] for c in report.cancelled_sends}),
             reason=report.reason, resumed=report.resumed)


@dataclass
class _View:
    """One reading of the state a sweep decides on."""

    states: dict[str, SeriesState]
    job_series: set[str]
    job_studies: set[str]  # studies with a queued job, or held by a backfill (``reader.holds``)
    tickets: dict[str, list[SendTicket]] = field(default_factory=dict)

    def pending(self, series_uid: str, version: int | None = None) -> bool:
        return any(t.state is SendState.PENDING and (version is None or t.version == version)
                   for t in self.tickets.get(series_uid, []))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Retention:
    """Sweeps a data dir (:meth:`sweep`), completes interrupted deletions (:meth:`resume`) and
    purges studies (:meth:`purge_study`). ``free_bytes`` reads the free space of the data dir's
    filesystem (a test passes its own); ``clock`` is wall-clock time."""

    def __init__(self, spool: Spool, jobs: JobStore, config: RetentionConfig, *,
                 free_bytes: Callable[[], int] | None = None, clock: Callable[[], float] = time.time,
                 on_purged: Callable[[PurgeReport], None] = record_purge,
                 audit: AuditTrail | None = None, user: str | None = None) -> None:
        self.spool = spool
        self.jobs = jobs
        self.config = config
        self._free = free_bytes or (lambda: shutil.disk_usage(spool.root).free)
        self._clock = clock
        self._on_purged = on_purged
        self._audit = audit
        self._user = user  # who purges (``reader purge``: the account running it); None: the node

    def _patient(self, study_uid: str) -> dict[str, str]:
        """Patient ID and name of a study, from one of its stored instances, for its audit message
        (A.5.3.6 names the patient); empty when none is left or auditing is off."""
        if self._audit is None:
            return {}
        for series_uid in self.spool.study_series(study_uid):
            for path in self.spool.series_instances(study_uid, series_uid)[:1]:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["PatientID", "PatientName"])
                except (OSError, pydicom.errors.InvalidDicomError):
                    continue
                return {"patient_id": str(ds.get("PatientID", "")),
                        "patient_name": str(ds.get("PatientName", ""))}
        return {}

    def _audit_deleted(self, study_uid: str, patient: dict[str, str], user: str | None) -> None:
        """A.5.3.6 DICOM Study Deleted for ``study_uid``: by ``user``, or by the node (retention)."""
        if self._audit is not None:
            self._audit.study_deleted(study_uid, PatientObject(patient.get("patient_id", ""),
                                                               patient.get("patient_name", "")), user=user)

    # --- reading ----------------------------------------------------------------------------
    def _view(self, *, tickets: bool = True) -> _View:
        states = self.jobs.series_states()
        jobs = self.jobs.queued_jobs()
        job_series = {j.series_uid for j in jobs}
        job_studies = {j.study_uid for j in jobs}
        job_studies |= {s.study_uid for s in states.values() if s.status is SeriesStatus.QUEUED}
        job_studies |= set(self.spool.list_state(HOLDS))
        view = _View(states, job_series, job_studies)
        if tickets:
            for t in self.jobs.sends():
                view.tickets.setdefault(t.series_uid, []).append(t)
        return view

    def _ticket_time(self, ticket: SendTicket) -> float:
        """When a ticket last changed (settled, for a settled one)."""
        return max(ticket.updated_at, ticket.created_at)

    def _instances_since(self, view: _View, study_uid: str, series_uid: str,
                         stored: list[Path]) -> float | None:
        """When a series' stored instances stopped being needed; None while they are needed."""
        state = view.states.get(series_uid)
        if (state is None or state.status is SeriesStatus.QUEUED or series_uid in view.job_series
                or study_uid in view.job_studies or view.pending(series_uid)):
            return None
        if not {p.stem for p in stored} <= set(state.instances):
            return None  # instances received since its processing: not yet read
        times = [state.updated_at, *(_mtime(p) for p in stored)]
        times += [self._ticket_time(t) for t in view.tickets.get(series_uid, [])]
        return max(times)

    def _results_since(self, view: _View, series_uid: str, version: int, folder: Path) -> float | None:
        """When a result version stopped being needed; None while it is needed."""
        state = view.states.get(series_uid)
        if series_uid in view.job_series or view.pending(series_uid, version):
            return None
        if state is not None and (state.status is SeriesStatus.QUEUED or state.study_uid in view.job_studies):
            return None
        times = [_mtime(folder), *(_mtime(p) for p in folder.iterdir())]
        times += [self._ticket_time(t) for t in view.tickets.get(series_uid, []) if t.version == version]
        return max(times)

    def _result_versions(self) -> Iterator[tuple[str, int, Path]]:
        for series in sorted((self.spool.root / "results").iterdir()):
            if series.is_dir():
                for folder in sorted(series.iterdir()):
                    if folder.is_dir() and folder.name.startswith("v") and folder.name[1:].isdigit():
                        yield series.name, int(folder.name[1:]), folder

    def _old(self, since: float | None, keep: Any) -> bool:
        return since is not None and keep is not None and self._clock() - since >= keep.total_seconds()

    # --- the sweep --------------------------------------------------------------------------
    def sweep(self) -> SweepCounts:
        """Delete what is past its retention, then, under disk pressure, the longest-settled data
        that may go; logs ``retention.swept``."""
        started = time.perf_counter()
        counts = SweepCounts()
        view = self._view()
        for study_uid, series_uid in list(self.spool.stored_series()):
            stored = self.spool.series_instances(study_uid, series_uid)
            if self._old(self._instances_since(view, study_uid, series_uid, stored), self.config.instances):
                self._delete_instances(study_uid, series_uid, counts)
        for series_uid, version, folder in list(self._result_versions()):
            if self._old(self._results_since(view, series_uid, version, folder), self.config.results):
                self._delete_results(series_uid, version, counts)
        self._sweep_history(counts)
        self._relieve_pressure(counts)
        log.info("retention.swept", seconds=round(time.perf_counter() - started, 3),
                 **{k: v for k, v in vars(counts).items()})
        return counts

    def _relieve_pressure(self, counts: SweepCounts) -> None:
        """While free space is under the watermark plus the margin, delete the instances and
        results that may go (whatever their age), the longest settled first."""
        line = self.spool.min_free_bytes + self.config.disk_margin_bytes
        if self._free() >= line:
            return
        view = self._view()
        candidates: list[tuple[float, Callable[[], bool]]] = []
        for study_uid, series_uid in self.spool.stored_series():
            stored = self.spool.series_instances(study_uid, series_uid)
            since = self._instances_since(view, study_uid, series_uid, stored)
            if since is not None:
                candidates.append((since, partial(self._delete_instances, study_uid, series_uid, counts)))
        for series_uid, version, folder in self._result_versions():
            since = self._results_since(view, series_uid, version, folder)
            if since is not None:
                candidates.append((since, partial(self._delete_results, series_uid, version, counts)))
        candidates.sort(key=lambda c: c[0])
        for _since, delete in candidates:
            if self._free() >= line:
                return
            if delete():
                counts.pressure += 1
        if self._free() < line:
            log.warning("retention.pressure_unrelieved", free_bytes=self._free(), line_bytes=line)

    # --- instances --------------------------------------------------------------------------
    def _fresh_view(self, series_uid: str, study_uid: str | None) -> _View:
        """The state of one series (and of its study's stored series) as it is now, read under
        the lock just before deleting: the queue of jobs, the states, the series' own tickets."""
        names = {series_uid, *(self.spool.study_series(study_uid) if study_uid else [])}
        states = {n: s for n in names if (s := self.jobs.series_state(n)) is not None}
        jobs = self.jobs.queued_jobs()
        job_studies = {j.study_uid for j in jobs}
        job_studies |= {s.study_uid for s in states.values() if s.status is SeriesStatus.QUEUED}
        job_studies |= set(self.spool.list_state(HOLDS))
        tickets = self.jobs.series_sends(series_uid)
        return _View(states, {j.series_uid for j in jobs}, job_studies, {series_uid: tickets})

    def _delete_instances(self, study_uid: str, series_uid: str, counts: SweepCounts) -> bool:
        """Delete a series' received instances, deciding again under the job store's lock."""
        with self.jobs.exclusive():
            view = self._fresh_view(series_uid, study_uid)
            stored = self.spool.series_instances(study_uid, series_uid)
            if not stored or self._instances_since(view, study_uid, series_uid, stored) is None:
                return False
            patient = self._patient(study_uid)
            name = f"instances-{series_uid}"
            self.spool.write_state(_MARKERS, name, {"kind": "instances", "study_uid": study_uid,
                                                    "series_uid": series_uid,
                                                    "instances": [p.stem for p in stored]})
            crash_point("retention.after_mark")
            self._finish_instances(name, study_uid, series_uid, [p.stem for p in stored], counts)
        self._audit_deleted(study_uid, patient, None)
        counts.series += 1
        return True

    def _finish_instances(self, marker: str, study_uid: str, series_uid: str, sops: Iterable[str],
                          counts: SweepCounts) -> None:
        folder = self.spool.series_dir(study_uid, series_uid)
        for i, sop in enumerate(sops):
            size = self.spool.remove_file(self.spool.instance_path(study_uid, series_uid, sop))
            counts.instances += 1 if size else 0
            counts.freed_bytes += size
            if i == 0:
                crash_point("retention.mid_delete")
        self.spool.sync_folder(folder)
        self.spool.prune_empty(folder, self.spool.root / "incoming")
        crash_point("retention.before_unmark")
        self.spool.delete_state(_MARKERS, marker)

    # --- results ----------------------------------------------------------------------------
    def _delete_results(self, series_uid: str, version: int, counts: SweepCounts) -> bool:
        """Delete a result version's files, deciding again under the job store's lock."""
        with self.jobs.exclusive():
            folder = self.spool.root / "results" / series_uid / f"v{version}"
            if not folder.is_dir() or self._results_since(self._fresh_view(series_uid, None), series_uid,
                                                          version, folder) is None:
                return False
            name = f"results-{series_uid}-v{version}"
            self.spool.write_state(_MARKERS, name, {"kind": "results", "series_uid": series_uid,
                                                    "version": version})
            self._finish_results(name, series_uid, version, counts)
        counts.results += 1
        return True

    def _finish_results(self, marker: str, series_uid: str, version: int, counts: SweepCounts) -> None:
        self._remove_folder(self.spool.root / "results" / series_uid / f"v{version}", counts)
        self.spool.delete_state(_MARKERS, marker)

    def _remove_folder(self, folder: Path, counts: SweepCounts) -> None:
        """Delete a result version's files, then the folder and its empty parents."""
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                counts.freed_bytes += self.spool.remove_file(path)
            self.spool.sync_folder(folder)
            self.spool.prune_empty(folder, self.spool.root / "results")

    # --- history ----------------------------------------------------------------------------
    def _sweep_history(self, counts: SweepCounts) -> None:
        """Delete the settled state of series whose instances and results are gone: their settled
        tickets first, the series' state last; then lineages none of whose series is left."""
        keep = self.config.history
        if keep is not None:
            view = self._view()
            for series_uid, state in sorted(view.states.items()):
                tickets = view.tickets.get(series_uid, [])
                if (state.status is SeriesStatus.QUEUED or series_uid in view.job_series
                        or state.study_uid in view.job_studies or view.pending(series_uid)
                        or self.spool.series_dir(state.study_uid, series_uid).exists()
                        or (self.spool.root / "results" / series_uid).exists()):
                    continue
                since = max([state.updated_at, *(self._ticket_time(t) for t in tickets)])
                if self._clock() - since < keep.total_seconds():
                    continue
                self.jobs.delete_series_history(series_uid, [t.name for t in tickets])
                counts.history += 1
        self._drop_orphan_lineages()

    def _drop_orphan_lineages(self) -> None:
        states = self.jobs.series_states()
        self.jobs.delete_lineages([key for key, read in self.jobs.lineages().items()
                                   if all(s not in states for s in read)])

    # --- interrupted deletions --------------------------------------------------------------
    def resume(self) -> int:
        """Complete the deletions a crash interrupted (every marker in ``state/purging/``); the
        node calls it at start, before anything else reads the data dir. Returns how many."""
        counts = SweepCounts()
        for name in self.spool.list_state(_MARKERS):
            raw = self.spool.read_state(_MARKERS, name)
            if raw is None:
                continue
            kind = raw.get("kind")
            if kind == "instances":
                self._finish_instances(name, str(raw["study_uid"]), str(raw["series_uid"]),
                                       [str(s) for s in raw["instances"]], counts)
            elif kind == "results":
                self._finish_results(name, str(raw["series_uid"]), int(raw["version"]), counts)
            elif kind == "study":
                self._purge(str(raw["study_uid"]), raw, resumed=True)
            counts.completed += 1
        if counts.completed:
            log.info("retention.resumed", completed=counts.completed, instances=counts.instances)
        return counts.completed

    # --- a whole study ----------------------------------------------------------------------
    def study_activity(self, study_uid: str) -> StudyActivity:
        """What of ``study_uid`` is stored, and what of it is still in flight."""
        view = self._view()
        stored = set(self.spool.study_series(study_uid))
        series = stored | {s for s, st in view.states.items() if st.study_uid == study_uid}
        series |= {j.series_uid for j in self.jobs.queued_jobs() if j.study_uid == study_uid}
        collecting = []
        for series_uid in sorted(stored):
            state = view.states.get(series_uid)
            sops = {p.stem for p in self.spool.series_instances(study_uid, series_uid)}
            if state is None or not sops <= set(state.instances):
                collecting.append(series_uid)
        return StudyActivity(
            series=tuple(sorted(series)),
            queued_jobs=tuple(sorted(series & view.job_series)),
            pending_sends=tuple(t for s in sorted(series) for t in view.tickets.get(s, [])
                                if t.state is SendState.PENDING),
            collecting=tuple(collecting))

    def purge_study(self, study_uid: str, reason: str) -> PurgeReport:
        """Remove ``study_uid`` everywhere: queued jobs, pending sends (cancelled, named in the
        report), received instances, results, settled tickets, lineages and series state. The
        caller decides whether the study may go (:meth:`study_activity`). Raises InputRejected for
        an invalid UID."""
        study_uid = check_uid(study_uid, "Study Instance UID")
        activity = self.study_activity(study_uid)
        earlier = self.spool.read_state(_MARKERS, f"study-{study_uid}")  # an interrupted purge
        cancelled = [] if earlier is None else list(earlier["cancelled"])
        cancelled += [{"ticket": t.name, "destination": t.destination} for t in activity.pending_sends
                      if t.name not in {c["ticket"] for c in cancelled}]
        series = sorted(set(activity.series) | set([] if earlier is None else earlier["series"]))
        patient = earlier.get("patient", {}) if earlier is not None else {}
        marker = {"kind": "study", "study_uid": study_uid, "series": series, "reason": reason,
                  "cancelled": cancelled, "user": self._user, "patient": patient or self._patient(study_uid)}
        self.spool.write_state(_MARKERS, f"study-{study_uid}", marker)
        crash_point("purge.after_mark")
        return self._purge(study_uid, marker, resumed=earlier is not None)

    def _purge(self, study_uid: str, marker: dict[str, Any], *, resumed: bool) -> PurgeReport:
        """Carry out (or complete) a study purge described by its ``marker``; idempotent."""
        series = sorted(set(self.study_activity(study_uid).series) | {str(s) for s in marker["series"]})
        counts = SweepCounts()
        jobs = 0
        for series_uid in series:  # nothing more is processed or sent
            jobs += self.jobs.delete_job(series_uid)
        tickets = [t for t in self.jobs.sends() if t.series_uid in set(series)]
        self.jobs.delete_sends([t.name for t in tickets if t.state is SendState.PENDING])
        first = True
        for series_uid in series:
            folder = self.spool.series_dir(study_uid, series_uid)
            for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
                size = self.spool.remove_file(path)
                counts.instances += 1 if size else 0
                if first:
                    crash_point("purge.mid_delete")
                    first = False
            self.spool.sync_folder(folder)
            self.spool.prune_empty(folder, self.spool.root / "incoming")
            results = self.spool.root / "results" / series_uid
            for version in sorted(results.iterdir()) if results.is_dir() else []:
                self._remove_folder(version, counts)
                counts.results += 1
        self.jobs.delete_sends([t.name for t in tickets])
        self.jobs.delete_lineages([key for key in self.jobs.lineages() if key.startswith(study_uid + "-")])
        self.spool.delete_state(HOLDS, study_uid)
        for series_uid in series:
            self.jobs.delete_series_history(series_uid)
        report = PurgeReport(study_uid=study_uid, series=tuple(series), instances=counts.instances,
                             results=counts.results, jobs_dropped=jobs,
                             cancelled_sends=tuple({"ticket": str(c["ticket"]),
                                                    "destination": str(c["destination"])}
                                                   for c in marker.get("cancelled", [])),
                             reason=str(marker.get("reason", "")), resumed=resumed)
        self._audit_deleted(study_uid, marker.get("patient") or {}, marker.get("user"))
        self.spool.delete_state(_MARKERS, f"study-{study_uid}")
        self._on_purged(report)
        return report

