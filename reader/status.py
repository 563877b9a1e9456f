"""What ``reader status`` shows: series by state, the last studies, pending and parked sends.

:func:`collect` reads the job store once into a :class:`StatusReport`; :meth:`StatusReport.as_json`
is the ``--json`` form (the keys of earlier versions kept) and :func:`render` the tables a person
reads. It reads the state database only through ``reader.jobs.JobStore``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reader.jobs import JobStore, SendState, SendTicket, SeriesState, SeriesStatus

__all__ = ["LAST_STUDIES", "StatusReport", "StudyLine", "collect", "render"]

LAST_STUDIES = 10  # studies listed, most recently updated first
_NO_TIME = "-"


@dataclass(frozen=True)
class StudyLine:
    """One study as the status table shows it: its series by state, newest result version, flag."""

    study_uid: str
    updated_at: float
    series: dict[str, int]
    version: int
    flag: str


@dataclass(frozen=True)
class StatusReport:
    """Everything ``reader status`` prints, read from the data dir at one moment."""

    series: dict[str, int]
    queued_jobs: int
    sends: dict[str, int]
    studies_total: int
    last_studies: tuple[StudyLine, ...]
    pending: tuple[SendTicket, ...]
    parked: tuple[SendTicket, ...]
    not_done: tuple[SeriesState, ...]

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` document (``series``, ``queued_jobs``, ``sends``, ``failed_sends`` and
        ``skipped_or_failed_series`` as before, plus ``studies`` and ``pending_sends``)."""
        return {
            "series": self.series,
            "queued_jobs": self.queued_jobs,
            "sends": self.sends,
            "studies_total": self.studies_total,
            "studies": [{"study_uid": s.study_uid, "updated_at": s.updated_at, "series": s.series,
                         "version": s.version, "flag": s.flag} for s in self.last_studies],
            "pending_sends": [{"ticket": t.name, "series_uid": t.series_uid, "version": t.version,
                               "destination": t.destination, "attempts": t.attempts,
                               "next_attempt_at": t.next_attempt_at, "error": t.last_error}
                              for t in self.pending],
            "failed_sends": [{"ticket": t.name, "series_uid": t.series_uid, "version": t.version,
                              "destination": t.destination, "attempts": t.attempts,
                              "status": t.last_status, "error": t.last_error} for t in self.parked],
            "skipped_or_failed_series": [{"series_uid": s.series_uid, "status": s.status.value,
                                          "reason": s.reason} for s in self.not_done],
        }


def _study_lines(series: Sequence[SeriesState]) -> list[StudyLine]:
    by_study: dict[str, list[SeriesState]] = {}
    for state in series:
        by_study.setdefault(state.study_uid, []).append(state)
    lines = []
    for study_uid, states in by_study.items():
        flags = {str(s.flag.get("state", "")) for s in states if s.flag}
        flag = "flagged" if "flagged" in flags else ("no flag" if flags else "")
        lines.append(StudyLine(study_uid, max(s.updated_at for s in states),
                               dict(Counter(s.status.value for s in states)),
                               max(s.version for s in states), flag))
    return sorted(lines, key=lambda s: (-s.updated_at, s.study_uid))


def collect(jobs: JobStore, last_studies: int = LAST_STUDIES) -> StatusReport:
    """Read the series states, queued jobs and send tickets of ``jobs``' data dir."""
    series = list(jobs.series_states().values())
    sends = jobs.sends()
    studies = _study_lines(series)
    return StatusReport(
        series=dict(Counter(s.status.value for s in series)),
        queued_jobs=jobs.queue_counts()["jobs"],
        sends=dict(Counter(t.state.value for t in sends)),
        studies_total=len(studies),
        last_studies=tuple(studies[:last_studies]),
        pending=tuple(t for t in sends if t.state is SendState.PENDING),
        parked=tuple(t for t in sends if t.state is SendState.FAILED),
        not_done=tuple(s for s in series if s.reason),
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) if epoch > 0 else _NO_TIME


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; the last column is not padded."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in cells]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


def render(report: StatusReport) -> str:
    """The tables of ``reader status`` (UTC times), ending with a newline."""
    out = ["Series by state"]
    states = [*[s.value for s in SeriesStatus], *sorted(set(report.series) - {s.value for s in SeriesStatus})]
    out += _table(["state", "series"], [[s, report.series.get(s, 0)] for s in states])
    out.append(f"Jobs queued for processing: {report.queued_jobs}")
    out.append(f"Sends: {_counts(report.sends)}")
    out.append("")
    shown = len(report.last_studies)
    out.append(f"Last studies ({shown} of {report.studies_total}, latest first)" if shown
               else "Studies: none")
    if shown:
        out += _table(["updated (UTC)", "study UID", "version", "flag", "series"],
                      [[_when(s.updated_at), s.study_uid, s.version, s.flag or "-", _counts(s.series)]
                       for s in report.last_studies])
    out.append("")
    out.append(f"Pending sends: {len(report.pending)}")
    if report.pending:
        out += _table(["ticket", "destination", "attempts", "next attempt (UTC)", "last error"],
                      [[t.name, t.destination, t.attempts, _when(t.next_attempt_at), t.last_error or "-"]
                       for t in report.pending])
    retry = " (`reader retry` re-queues them)" if report.parked else ""
    out.append(f"Parked sends: {len(report.parked)}{retry}")
    if report.parked:
        out += _table(["ticket", "destination", "attempts", "reason"],
                      [[t.name, t.destination, t.attempts, t.last_error or "-"] for t in report.parked])
    if report.not_done:
        out.append("")
        out.append(f"Series skipped or failed: {len(report.not_done)}")
        out += _table(["series UID", "state", "reason"],
                      [[s.series_uid, s.status.value, s.reason] for s in report.not_done])
    return "\n".join(out) + "\n"
