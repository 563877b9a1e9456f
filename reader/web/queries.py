"""Every question the status pages ask of the node's state, answered from the job store and the
data dir (read-only).

The pages (``reader.web.pages``) read state only through this module, and this module reads the
state database (``reader.state``, shared by the processes of a cluster) only through
``reader.jobs.JobStore``. What it reads:

- series states (``JobStore.series_states``, ``reader.jobs.SeriesState``): each series' outcome,
  result version, flag and the wall-clock times of its last processing's steps (``timeline``);
- queued jobs (``JobStore.queued_jobs``, claimed ones included) and send tickets
  (``JobStore.sends``; ``updated_at`` of a done ticket is when it was delivered);
- ``incoming/<study>/<series>/``: received instances (a file's mtime is when it was stored);
- ``results/<series>/v<N>/``: the encoded SEG, SR and KOS; the SR holds the findings (TID 1500).

Study attributes (accession number, date, patient name and ID) come from the header of a stored
instance, or of the SR once the instances are gone. Patient name and ID are returned as read:
masking them for a visitor who has not signed in is the pages' job (``reader.web.pages``).
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from reader.jobs import JobStore, SendState, SendTicket, SeriesState, SeriesStatus
from reader.spool import Spool, check_uid

__all__ = [
    "RECEIVING",
    "STEPS",
    "Finding",
    "Overview",
    "ResultObject",
    "SeriesView",
    "StageLatency",
    "StudyView",
    "find_result",
    "findings",
    "instance_file",
    "overview",
    "result_objects",
    "sends",
    "series_views",
    "studies",
    "study",
    "study_in_flight",
]

RECEIVING = "receiving"  # a series with instances stored and no recorded state yet
STEPS = ("received", "complete", "routed", "inferred", "encoded", "sent")
RESULT_KINDS = ("seg", "sr", "kos")
_HOUR_S = 3600.0
_HEADER_TAGS = ["PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription",
                "Modality", "SeriesDescription", "SeriesNumber"]
_MEASUREMENT_GROUP = "125007"
_TRACKING_ID = "112039"
_FINDING = "121071"
_FINDING_SITE = "363698007"


@dataclass(frozen=True)
class Header:
    """What the pages show of a series' DICOM header."""

    patient_name: str = ""
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""
    study_description: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: str = ""


@dataclass(frozen=True)
class ResultObject:
    """One encoded result file of a result version, and what became of its sends."""

    kind: str  # "seg", "sr" or "kos"
    sop_instance_uid: str
    sends: tuple[SendTicket, ...]


@dataclass(frozen=True)
class SeriesView:
    """A series as the pages show it."""

    study_uid: str
    series_uid: str
    status: str  # a SeriesStatus value or RECEIVING
    reason: str
    version: int
    instances: int
    flag: str  # "flagged", "reviewed_no_flag" or ""
    steps: tuple[tuple[str, float | None], ...]  # STEPS with their times (None: not reached)
    send_state: str  # "", "pending", "parked", "sent", "cancelled" (the current version's sends)
    header: Header
    versions: tuple[int, ...]  # result versions with files on disk, newest first


@dataclass(frozen=True)
class StudyView:
    """A study: its series and what the pages show of it."""

    study_uid: str
    header: Header
    series: tuple[SeriesView, ...]

    @property
    def state(self) -> str:
        """The study's least advanced state among its series (failed and flagged stand out)."""
        states = {s.status for s in self.series}
        for state in (SeriesStatus.FAILED.value, RECEIVING, SeriesStatus.QUEUED.value):
            if state in states:
                return state
        return SeriesStatus.DONE.value if SeriesStatus.DONE.value in states else SeriesStatus.SKIPPED.value

    @property
    def flagged(self) -> bool:
        """True when a series' current result flags the study."""
        return any(s.flag == "flagged" for s in self.series)

    @property
    def last_activity(self) -> float:
        """The latest step time of any of its series."""
        return max((t for s in self.series for _, t in s.steps if t is not None), default=0.0)


@dataclass(frozen=True)
class Finding:
    """One TID 1500 measurement group of an SR."""

    number: int
    tracking_id: str
    finding_type: str
    site: str
    measurements: tuple[tuple[str, str], ...]  # (name, "value unit")
    image_sop_uid: str  # the key image its outline is drawn on ("" when none)
    outline: tuple[tuple[float, float], ...]  # SCOORD points (column, row)


@dataclass(frozen=True)
class StageLatency:
    """p50 and p95 of one stage over the last hour, in seconds, from ``count`` series."""

    stage: str
    count: int
    p50_s: float | None
    p95_s: float | None


@dataclass(frozen=True)
class Overview:
    """What the overview page shows."""

    counts: Mapping[str, int]  # received, complete, processed, flagged, failed, skipped (series)
    last_hour: Mapping[str, int]  # the same, for steps reached in the last hour
    queue: Mapping[str, int]  # stage -> series (or send tickets) waiting or in it
    latency: tuple[StageLatency, ...]
    latency_missing: str  # what data the latency lacks ("" when every stage has some)
    disk_free_bytes: int
    disk_total_bytes: int
    disk_watermark_bytes: int
    in_flight: bool = False
    send_states: Mapping[str, int] = field(default_factory=dict)


# --- headers ----------------------------------------------------------------------------------
_headers: dict[tuple[str, float], Header] = {}
_HEADER_CACHE = 4096


def _header_of(path: Path) -> Header | None:
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return None
    cached = _headers.get(key)
    if cached is not None:
        return cached
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    header = Header(*(str(ds.get(tag, "") or "") for tag in _HEADER_TAGS))
    if len(_headers) >= _HEADER_CACHE:
        _headers.clear()
    _headers[key] = header
    return header


def _series_header(spool: Spool, study_uid: str, series_uid: str, versions: Sequence[int]) -> Header:
    files = spool.series_instances(study_uid, series_uid)
    candidates = [*files[:1], *(spool.result_path(series_uid, v, "sr") for v in versions)]
    for path in candidates:
        if (header := _header_of(path)) is not None:
            return header
    return Header()


# --- series and studies -----------------------------------------------------------------------
def _versions(spool: Spool, series_uid: str) -> tuple[int, ...]:
    folder = spool.root / "results" / series_uid
    if not folder.is_dir():
        return ()
    found = [int(p.name[1:]) for p in folder.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
    return tuple(sorted(found, reverse=True))


def _received(spool: Spool, study_uid: str, series_uid: str) -> tuple[int, float | None, float | None]:
    """Instances stored, and the first and last store times."""
    times = []
    for path in spool.series_instances(study_uid, series_uid):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return len(times), (min(times) if times else None), (max(times) if times else None)


def _send_state(tickets: Sequence[SendTicket]) -> tuple[str, float | None]:
    """What the sends of one result version amount to, and when the last was delivered."""
    states = {t.state for t in tickets}
    if not tickets:
        return "", None
    if SendState.PENDING in states:
        return "pending", None
    if SendState.FAILED in states:
        return "parked", None
    if states == {SendState.CANCELLED}:
        return "cancelled", None
    done = [t.updated_at or t.created_at for t in tickets if t.state is SendState.DONE]
    return ("sent", max(done)) if done else ("superseded", None)


def _series_view(spool: Spool, study_uid: str, series_uid: str, state: SeriesState | None, *,
                 queued_at: float | None, tickets: Sequence[SendTicket]) -> SeriesView:
    count, first, _last = _received(spool, study_uid, series_uid)
    versions = _versions(spool, series_uid)
    timeline = dict(state.timeline or {}) if state is not None else {}
    if queued_at is not None and state is not None and state.status is SeriesStatus.QUEUED:
        timeline = {"complete": queued_at}
    current = [t for t in tickets if state is not None and t.version == state.version]
    send_state, sent_at = _send_state(current)
    steps = (("received", first), ("complete", timeline.get("complete")), ("routed", timeline.get("routed")),
             ("inferred", timeline.get("inferred")), ("encoded", timeline.get("encoded")), ("sent", sent_at))
    flag = str((state.flag or {}).get("state", "")) if state is not None else ""
    return SeriesView(
        study_uid=study_uid, series_uid=series_uid,
        status=state.status.value if state is not None else RECEIVING,
        reason=state.reason if state is not None else "", version=state.version if state is not None else 0,
        instances=len(state.instances) if state is not None and not count else count,
        flag=flag, steps=steps, send_state=send_state,
        header=_series_header(spool, study_uid, series_uid, versions), versions=versions)


def series_views(jobs: JobStore) -> list[SeriesView]:
    """Every series the node knows (received or recorded)."""
    states = jobs.series_states()
    queued = {j.series_uid: j.created_at for j in jobs.queued_jobs()}
    by_series: dict[str, list[SendTicket]] = {}
    for ticket in jobs.sends():
        by_series.setdefault(ticket.series_uid, []).append(ticket)
    known = {(s.study_uid, s.series_uid) for s in states.values()}
    known.update(jobs.spool.stored_series())
    return [_series_view(jobs.spool, study, series, states.get(series), queued_at=queued.get(series),
                         tickets=by_series.get(series, ()))
            for study, series in sorted(known)]


def _group(views: Iterable[SeriesView]) -> list[StudyView]:
    grouped: dict[str, list[SeriesView]] = {}
    for view in views:
        grouped.setdefault(view.study_uid, []).append(view)
    out = []
    for study_uid, series in grouped.items():
        header = next((s.header for s in series if s.header != Header()), Header())
        out.append(StudyView(study_uid, header, tuple(series)))
    return sorted(out, key=lambda s: s.last_activity, reverse=True)


def studies(jobs: JobStore, *, accession: str = "", date: str = "", state: str = "",
            limit: int = 100) -> list[StudyView]:
    """Studies, most recently active first, filtered by accession number (substring, any case),
    study date (``YYYY-MM-DD`` or ``YYYYMMDD``) and state (a study state, or ``flagged``)."""
    wanted_date = date.replace("-", "").strip()
    out = []
    for view in _group(series_views(jobs)):
        if accession and accession.strip().lower() not in view.header.accession.lower():
            continue
        if wanted_date and view.header.study_date != wanted_date:
            continue
        if state and not (view.flagged if state == "flagged" else view.state == state):
            continue
        out.append(view)
    return out[:limit]


def study(jobs: JobStore, study_uid: str) -> StudyView | None:
    """One study by its UID, or None."""
    uid = check_uid(study_uid, "Study Instance UID")
    states = [s for s in jobs.series_states().values() if s.study_uid == uid]
    series = {s.series_uid for s in states} | set(jobs.spool.study_series(uid))
    if not series:
        return None
    by_uid = {s.series_uid: s for s in states}
    queued = {j.series_uid: j.created_at for j in jobs.queued_jobs() if j.study_uid == uid}
    tickets = [t for t in jobs.sends() if t.series_uid in series]
    views = [_series_view(jobs.spool, uid, s, by_uid.get(s), queued_at=queued.get(s),
                          tickets=[t for t in tickets if t.series_uid == s]) for s in sorted(series)]
    return _group(views)[0]


# --- results ----------------------------------------------------------------------------------
def find_result(spool: Spool, series_uid: str, version: int, kind: str) -> Path | None:
    """The file of one result object, or None."""
    if kind not in RESULT_KINDS or version < 1:
        return None
    path = spool.result_path(check_uid(series_uid, "Series Instance UID"), version, kind)
    return path if path.is_file() else None


def result_objects(jobs: JobStore, series_uid: str, version: int) -> list[ResultObject]:
    """The result objects of one result version, each with the tickets that carry it."""
    tickets = [t for t in jobs.sends() if t.series_uid == series_uid and t.version == version]
    out = []
    for kind in RESULT_KINDS:
        path = find_result(jobs.spool, series_uid, version, kind)
        if path is None:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        out.append(ResultObject(kind, str(ds.SOPInstanceUID),
                                tuple(t for t in tickets if str(path) in t.files)))
    return out


def _code(item: Dataset, attribute: str) -> str:
    seq = item.get(attribute)
    return str(seq[0].CodeValue) if seq else ""


def _meaning(item: Dataset, attribute: str) -> str:
    seq = item.get(attribute)
    return str(seq[0].CodeMeaning) if seq else ""


def _walk(items: Iterable[Dataset]) -> Iterable[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _finding(group: Dataset, number: int) -> Finding:
    children = list(group.get("ContentSequence", []))
    tracking = finding_type = site = ""
    measurements: list[tuple[str, str]] = []
    for item in children:
        concept = _code(item, "ConceptNameCodeSequence")
        if concept == _TRACKING_ID and item.ValueType == "TEXT":
            tracking = str(item.TextValue)
        elif concept == _FINDING:
            finding_type = _meaning(item, "ConceptCodeSequence")
        elif concept == _FINDING_SITE:
            site = _meaning(item, "ConceptCodeSequence")
        elif item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
            value = item.MeasuredValueSequence[0]
            unit = _code(value, "MeasurementUnitsCodeSequence")
            measurements.append((_meaning(item, "ConceptNameCodeSequence"),
                                 f"{value.NumericValue} {'' if unit == '1' else unit}".strip()))
    scoord = next((i for i in _walk(children) if i.ValueType == "SCOORD"), None)
    image_uid, outline = "", tuple[tuple[float, float], ...]()
    if scoord is not None:
        data = [float(v) for v in scoord.GraphicData]
        outline = tuple(zip(data[0::2], data[1::2], strict=True))
        image = next((i for i in scoord.get("ContentSequence", []) if i.ValueType == "IMAGE"), None)
        if image is not None:
            image_uid = str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return Finding(number, tracking, finding_type, site, tuple(measurements), image_uid, outline)


def findings(spool: Spool, series_uid: str, version: int) -> list[Finding]:
    """The findings of one result version, read from its SR (empty when it has none)."""
    path = find_result(spool, series_uid, version, "sr")
    if path is None:
        return []
    ds = pydicom.dcmread(path)
    groups = [i for i in _walk(ds.get("ContentSequence", []))
              if i.ValueType == "CONTAINER" and _code(i, "ConceptNameCodeSequence") == _MEASUREMENT_GROUP]
    return [_finding(g, n) for n, g in enumerate(groups, 1)]


def instance_file(spool: Spool, study_uid: str, series_uid: str, sop_uid: str) -> Path | None:
    """A stored instance, or None when it is not (or no longer) stored."""
    path = spool.instance_path(check_uid(study_uid, "Study Instance UID"),
                               check_uid(series_uid, "Series Instance UID"),
                               check_uid(sop_uid, "SOP Instance UID"))
    return path if path.is_file() else None


# --- sends ------------------------------------------------------------------------------------
def sends(jobs: JobStore, *, settled: int = 20
          ) -> tuple[list[SendTicket], list[SendTicket], list[SendTicket]]:
    """Pending tickets, parked ones, and the last ``settled`` others (done, cancelled...)."""
    every = jobs.sends()
    pending = [t for t in every if t.state is SendState.PENDING]
    parked = [t for t in every if t.state is SendState.FAILED]
    others = sorted((t for t in every if t.state not in (SendState.PENDING, SendState.FAILED)),
                    key=lambda t: t.updated_at or t.created_at, reverse=True)
    return pending, parked, others[:settled]


# --- overview ---------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


_STAGES: tuple[tuple[str, str, str], ...] = (
    ("completion wait", "last_received", "complete"),
    ("queued", "complete", "started"),
    ("route", "started", "routed"),
    ("load", "routed", "loaded"),
    ("inference", "inference_started", "inferred"),
    ("encode", "inferred", "encoded"),
    ("send", "encoded", "sent"),
    ("total", "last_received", "sent"),
)


def overview(jobs: JobStore, stages: Callable[[], Mapping[str, Sequence[str]]] | None = None,
             now: float | None = None) -> Overview:
    """Counts, the queue by stage, latency of the last hour, and the disk."""
    now = time.time() if now is None else now
    since = now - _HOUR_S
    spool = jobs.spool
    states = jobs.series_states()
    stored = list(spool.stored_series())
    tickets = jobs.sends()
    counts, last_hour = _counts(states, since)
    counts["received"] = len({s for _, s in stored} | set(states))
    for study_uid, series_uid in stored:  # a folder's mtime moves with each instance stored in it
        with contextlib.suppress(OSError):
            last_hour["received"] += spool.series_dir(study_uid, series_uid).stat().st_mtime >= since
    latency = _latency(spool, states, tickets, since)
    lacking = [s.stage for s in latency if not s.count]
    missing = ""
    if lacking:
        missing = ("no series finished this step in the last hour (or its times were not recorded: "
                   "series processed before this version of the node, instances already deleted): "
                   + ", ".join(lacking))
    queued_jobs = jobs.queue_counts()["jobs"]  # claimed ones included
    board = {k: len(v) for k, v in (stages() if stages is not None else {}).items()}
    on_board = sum(board.values())
    send_states = Counter(t.state.value for t in tickets)
    queue = {RECEIVING: len([1 for _, s in stored if s not in states]),
             "queued": max(0, queued_jobs - on_board), **board,
             "sends pending": send_states.get(SendState.PENDING.value, 0),
             "sends parked": send_states.get(SendState.FAILED.value, 0)}
    usage = shutil.disk_usage(spool.root)
    in_flight = bool(queue[RECEIVING] or queued_jobs or queue["sends pending"])
    return Overview(counts={k: counts.get(k, 0) for k in ("received", "complete", "processed", "flagged",
                                                         "failed", "skipped")},
                    last_hour={k: last_hour.get(k, 0) for k in ("received", "complete", "processed",
                                                               "flagged", "failed")},
                    queue=queue, latency=latency, latency_missing=missing, disk_free_bytes=usage.free,
                    disk_total_bytes=usage.total, disk_watermark_bytes=spool.min_free_bytes,
                    in_flight=in_flight, send_states=dict(send_states))


def _counts(states: Mapping[str, SeriesState], since: float) -> tuple[Counter[str], Counter[str]]:
    """Series by outcome, in all and in the last hour."""
    counts = Counter(complete=len(states))
    last_hour: Counter[str] = Counter()
    for state in states.values():
        if state.status is SeriesStatus.DONE:
            counts["processed"] += 1
            flagged = (state.flag or {}).get("state") == "flagged"
            counts["flagged"] += flagged
            if state.updated_at >= since:
                last_hour["processed"] += 1
                last_hour["flagged"] += flagged
        elif state.status is SeriesStatus.FAILED:
            counts["failed"] += 1
            last_hour["failed"] += state.updated_at >= since
        elif state.status is SeriesStatus.SKIPPED:
            counts["skipped"] += 1
        if (state.timeline or {}).get("complete", 0.0) >= since:
            last_hour["complete"] += 1
    return counts, last_hour


def _latency(spool: Spool, states: Mapping[str, SeriesState], tickets: Sequence[SendTicket],
             since: float) -> tuple[StageLatency, ...]:
    """p50/p95 of each stage over the series whose results were written in the last hour."""
    spans: dict[str, list[float]] = {name: [] for name, _, _ in _STAGES}
    sent_at: dict[tuple[str, int], float] = {}
    for t in tickets:
        if t.state is SendState.DONE:
            key = (t.series_uid, t.version)
            sent_at[key] = max(sent_at.get(key, 0.0), t.updated_at or t.created_at)
    for state in states.values():
        timeline = state.timeline or {}
        if timeline.get("encoded", 0.0) < since:
            continue
        times = dict(timeline)
        if (state.series_uid, state.version) in sent_at:
            times["sent"] = sent_at[(state.series_uid, state.version)]
        _, _, last = _received(spool, state.study_uid, state.series_uid)
        if last is not None:
            times["last_received"] = last
        for name, start, end in _STAGES:
            if start in times and end in times:
                spans[name].append(max(0.0, times[end] - times[start]))
    return tuple(StageLatency(name, len(v), _percentile(sorted(v), 50) if v else None,
                              _percentile(sorted(v), 95) if v else None) for name, v in spans.items())


def study_in_flight(view: StudyView | None) -> bool:
    """True while any series of the study is received, queued or has sends pending."""
    return view is not None and any(s.status in (RECEIVING, SeriesStatus.QUEUED.value)
                                    or s.send_state == "pending" for s in view.series)
