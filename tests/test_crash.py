"""Fault injection: SIGKILL a real ``reader serve`` at many moments, restart it, lose nothing.

A modality (DCMTK ``storescu -v``, whose output says which files were acknowledged with Success)
sends synthetic CT studies to a real ``reader serve`` subprocess that delivers SR and SEG to a real
Orthanc. Round after round the node is killed with SIGKILL at a chosen moment: on a log event of
receiving, completion, routing, volume loading, inference, encoding, queueing or sending, or after a
seeded random delay, and restarted on the same data dir and port. A modality whose association
broke re-sends the whole study, as modalities do. After each kill every acknowledged instance must
be on disk; at the end the PACS must hold exactly one current SR and SEG per study (see
:func:`test_sigkill_at_many_moments_loses_and_duplicates_nothing`).

Retention (``reader.retention``) and ``reader purge`` are killed at their own moments, named crash
points the process reaches itself (``reader.faults``, ``READER_CRASH_AT``): a deletion of one file
is over long before a kill from outside could land. After a restart nothing needed is lost, the
interrupted deletion is completed, and nothing is processed or sent again
(:func:`test_sigkill_inside_a_retention_sweep_resends_nothing`,
:func:`test_sigkill_inside_reader_purge_is_completed_and_sends_nothing`).

A machine reboot differs from SIGKILL only in losing the page cache; the spool fsyncs every file
and its folder before answering Success or moving on (``reader.spool.atomic_write``), which a
process-level test cannot observe.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from reader.faults import CRASH_ENV
from reader.jobs import JobStore, SendState, SeriesStatus
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import Orthanc, free_port, require_tool, wait_until
from tests.reliability import (
    Sender,
    Study,
    assert_acknowledged_on_disk,
    log_events,
    pacs_results,
    reader_purge,
    refused_port,
    retention_config,
    serve_config,
    store_responses,
    write_fixture_model,
    write_study,
)

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("READER_CRASH_SEED", "20240611"))
TRIGGER_DEADLINE_S = 60.0
FINAL_DEADLINE_S = 180.0
_TRIGGER_POLL_S = 0.005


@dataclass(frozen=True)
class Moment:
    """Where to kill in one round: after the ``count``-th ``trigger`` event of this run (or, with no
    trigger, after the round's traffic started), plus a uniform random ``delay_s``."""

    label: str
    trigger: str | None
    count: int = 1
    delay_s: tuple[float, float] = (0.0, 0.0)
    send: tuple[str, ...] = ()  # files (keys of the scenario's parts) the modality sends this round


MOMENTS = (
    Moment("receive: 5th instance stored", "instance.stored", 5, send=("A",)),
    Moment("receive: random delay", None, delay_s=(0.02, 0.2)),
    Moment("completion: job queued", "series.complete"),
    Moment("routing", "series.routed"),
    Moment("volume loaded", "volume.loaded"),
    Moment("inference done", "inference.done"),
    Moment("results encoded", "results.encoded"),
    Moment("send ticket queued", "result.queued"),
    Moment("association to the PACS", "send.association"),
    Moment("first object sent", "result.sent"),
    Moment("new study: inside processing", "series.routed", delay_s=(0.05, 0.6), send=("B",)),
    Moment("resumed job: random delay", None, delay_s=(0.0, 1.0)),
    Moment("late instance: new version in processing", "series.complete", delay_s=(0.1, 0.6),
           send=("A-late",)),
    Moment("third study: 12th instance stored", "instance.stored", 12, send=("C",)),
    Moment("mid-send", "send.association", delay_s=(0.0, 0.05)),
    Moment("random 1", None, delay_s=(0.0, 1.5)),
    Moment("random 2", None, delay_s=(0.0, 1.5)),
    Moment("random 3", None, delay_s=(0.0, 1.5)),
)


@dataclass
class Modality:
    """What the modality has sent and what it still owes (files not acknowledged with Success)."""

    parts: dict[str, list[Path]]
    studies: dict[str, Study]
    released: dict[str, list[Path]] = field(default_factory=dict)  # study key -> files handed out
    acked: set[Path] = field(default_factory=set)

    def study_of(self, part: str) -> str:
        return part.split("-", maxsplit=1)[0]

    def owed(self) -> list[str]:
        """Studies with an unacknowledged file: the modality re-sends each of them whole."""
        return [k for k, files in self.released.items() if not set(files) <= self.acked]


def _wait_event(node: ReaderNode, name: str, count: int, deadline_s: float, label: str,
                already_done: Callable[[], bool]) -> None:
    """Wait for the ``count``-th ``name`` event of this run, or until ``already_done``: the killed
    previous round may have got past this moment (e.g. it finished the send it was killed
    after), and then the event cannot come again."""
    def reached() -> bool:
        if node.process.poll() is not None:
            raise AssertionError(f"{label}: reader serve exited by itself:\n{node.log_tail()}")
        return len(node.events(name)) >= count or already_done()
    deadline = time.monotonic() + deadline_s
    while not reached():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{label}: no {count}x {name} within {deadline_s} s:\n{node.log_tail()}")
        time.sleep(_TRIGGER_POLL_S)  # a tight poll: the kill should land right after the event


def _hold(seconds: float) -> None:
    """The fault-injection delay itself (not a synchronisation wait)."""
    if seconds > 0:
        time.sleep(seconds)


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[tuple[Modality, Path]]:
    """Three studies of 20 slices, A with a 21st slice held back as a late instance, and a model."""
    a = write_study(tmp_path / "A", 21)
    b = write_study(tmp_path / "B", 20)
    c = write_study(tmp_path / "C", 20)
    parts = {"A": list(a.files[:20]), "A-late": list(a.files[20:]), "B": list(b.files), "C": list(c.files)}
    model = write_fixture_model(tmp_path / "model")
    yield Modality(parts=parts, studies={"A": a, "B": b, "C": c}), model


def _settled(jobs: JobStore, modality: Modality, *, released_only: bool = False) -> Callable[[], bool]:
    """True once every study (or, with ``released_only``, every study the modality has handed out so
    far) is processed with all its instances and every send is done."""
    def check() -> bool:
        for key, study in modality.studies.items():
            if released_only and key not in modality.released:
                continue
            state = jobs.series_state(study.series_uid)
            wanted = tuple(sorted(p.stem for p in jobs.spool.series_instances(study.study_uid,
                                                                               study.series_uid)))
            if state is None or state.status is not SeriesStatus.DONE or state.instances != wanted:
                return False
            if len(wanted) != len(modality.released[key]):
                return False
        if jobs.pending_jobs():
            return False
        return all(t.state in (SendState.DONE, SendState.SUPERSEDED) for t in jobs.sends())
    return check


def test_sigkill_at_many_moments_loses_and_duplicates_nothing(
        tmp_path: Path, orthanc: Orthanc, scenario: tuple[Modality, Path]) -> None:
    """SIGKILL at 18 moments across receive, completion, inference, encode and send, each followed by
    a restart on the same data dir: no acknowledged instance is lost and every study ends with
    exactly one current SR and SEG in the PACS.

    "Exactly one current SR and SEG" means, for each study, with N the last result version the node
    recorded for its series: (1) version N covers every SOP Instance UID the modality sent and is
    done, with no job or send left over; (2) the PACS holds exactly one SR and exactly one SEG of
    version N (their UIDs recomputed with ``reader.results.uids.result_uid``), and that SEG
    references every instance sent; (3) every SR and SEG of the study in the PACS is the node's, of
    a version 1..N, each SOP Instance UID once, at most one SR and one SEG per version; (4) no
    object of a lower version reached the PACS after an object of a higher version (Orthanc's
    change log order).
    """
    modality, model = scenario
    rng = random.Random(SEED)
    data_dir, port = tmp_path / "data", free_port()
    config = serve_config(model)
    destination = f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"
    last_events: list[str] = []

    def start(name: str) -> ReaderNode:
        return ReaderNode(tmp_path / name, config_text=config, data_dir=data_dir, port=port,
                            destinations=[destination], log_level="debug")

    for i, moment in enumerate(MOMENTS):
        node = start(f"run-{i:02d}")
        senders: list[Sender] = []
        try:
            for part in moment.send:
                study = modality.study_of(part)
                modality.released.setdefault(study, []).extend(modality.parts[part])
            for study in modality.owed():
                files = modality.released[study]
                senders.append(Sender(node, files, tmp_path / f"storescu-{i:02d}-{study}.log"))
            if moment.trigger is not None:
                _wait_event(node, moment.trigger, moment.count, TRIGGER_DEADLINE_S, moment.label,
                            _settled(JobStore(Spool(data_dir)), modality, released_only=True))
            _hold(rng.uniform(*moment.delay_s))
        finally:
            node.kill()
        for sender in senders:
            modality.acked |= sender.acknowledged()
        events = node.events()
        last_events.append(f"{moment.label}: killed after {events[-1].get('event') if events else 'start'}")
        assert_acknowledged_on_disk(data_dir, modality.acked, moment.label)

    node = start("final")
    try:
        for study in modality.owed():
            sender = Sender(node, modality.released[study], tmp_path / f"storescu-final-{study}.log")
            modality.acked |= sender.acknowledged()
        assert not modality.owed(), "the modality could not deliver its studies to a healthy node"
        jobs = JobStore(Spool(data_dir))
        wait_until(_settled(jobs, modality), FINAL_DEADLINE_S, "every study processed and delivered")
    finally:
        assert node.stop() == 0, node.log_tail()
    assert list((data_dir / "tmp").iterdir()) == [], "partial writes left behind"
    print("\n".join(last_events))
    report = []

    for key, source in modality.studies.items():
        state = jobs.series_state(source.series_uid)
        assert state is not None
        sent_uids = {p.stem for p in map(Path, modality.released[key])}
        sent_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                     for p in modality.released[key]}
        assert len(sent_uids) == len(sent_sops)
        assert set(state.instances) == sent_sops, f"study {key}: instances lost"
        current = state.version
        results = pacs_results(orthanc, source.study_uid, source.series_uid, max_version=current + 5)
        assert all(r.version is not None for r in results), f"study {key}: foreign result {results}"
        assert all(r.version is not None and r.version <= current for r in results), \
            f"study {key}: a version above the node's {current}: {results}"
        uids = [r.sop_uid for r in results]
        assert len(uids) == len(set(uids)), f"study {key}: duplicated SOP Instance UID"
        for kind in ("SR", "SEG"):
            per_version = [r.version for r in results if r.modality == kind]
            assert len(per_version) == len(set(per_version)), f"study {key}: two {kind} of one version"
            assert per_version.count(current) == 1, f"study {key}: no current {kind} (v{current})"
        for earlier, later in itertools.pairwise(results):
            assert earlier.version is not None and later.version is not None
            assert earlier.version <= later.version, \
                f"study {key}: v{earlier.version} {earlier.modality} arrived after v{later.version}"
        seg_id = next(r.orthanc_id for r in results if r.modality == "SEG" and r.version == current)
        seg = pydicom.dcmread(_download(orthanc, seg_id), stop_before_pixels=True)
        referenced = {str(item.ReferencedSOPInstanceUID)
                      for series in seg.ReferencedSeriesSequence
                      for item in series.ReferencedInstanceSequence}
        assert referenced == sent_sops, f"study {key}: the current SEG does not cover every instance"
        report.append(f"study {key}: current v{current}, PACS holds "
                      + ", ".join(f"{r.modality} v{r.version}" for r in results))
    print("\n".join(report))


def _download(orthanc: Orthanc, instance_id: str) -> Path:
    path = orthanc.workdir / f"{instance_id}.dcm"
    path.write_bytes(orthanc.download(instance_id))
    return path


@pytest.fixture
def down() -> Iterator[str]:
    """A DICOM destination that refuses every association (its sends stay pending)."""
    with refused_port() as port:
        yield f"DOWN@127.0.0.1:{port}"


def _killed_itself(node: ReaderNode, point: str) -> None:
    wait_until(lambda: node.process.poll() is not None, FINAL_DEADLINE_S, f"the node killing itself: {point}")
    assert node.process.returncode == -signal.SIGKILL, node.log_tail()
    assert [e["point"] for e in node.events("fault.injected")] == [point]


def _series_events(node: ReaderNode, series_uid: str, *names: str) -> list[dict[str, object]]:
    return [e for e in node.events() if e.get("event") in names and e.get("series_uid") == series_uid]


@pytest.mark.parametrize("point", ["retention.after_mark", "retention.mid_delete", "retention.before_unmark"])
def test_sigkill_inside_a_retention_sweep_resends_nothing(tmp_path: Path, orthanc: Orthanc,
                                                          point: str) -> None:
    """SIGKILL while retention deletes a delivered study's instances (after the durable marker,
    after the first file, before the marker goes), with a second study arriving meanwhile: the
    restarted node completes the deletion before anything else, never takes the half-deleted series
    for new work (no ``series.complete``, nothing sent again), and the second study is processed
    and delivered once: the PACS holds exactly one SR and one SEG (v1) of each."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model")
    data_dir, port = tmp_path / "data", free_port()
    pacs = f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"
    config = retention_config(model, instances_hours=0.0003)  # about one second after delivery
    first, second = write_study(tmp_path / "A", 20), write_study(tmp_path / "B", 20)
    node = ReaderNode(tmp_path / "run-1", config_text=config, data_dir=data_dir, port=port,
                      destinations=[pacs], env={CRASH_ENV: point})
    try:
        assert store_responses(node.host, node.port, node.ae_title, first.files) == ["Success"] * 20
        wait_until(lambda: bool(node.events("result.sent")), TRIGGER_DEADLINE_S, "A delivered")
        acked = store_responses(node.host, node.port, node.ae_title, second.files)  # may be cut short
        _killed_itself(node, point)
    finally:
        node.kill()
    marker = data_dir / "state" / "purging" / f"instances-{first.series_uid}.json"
    assert marker.is_file(), f"{point}: no deletion marker left by the kill"
    left = len(list((data_dir / "incoming" / first.study_uid / first.series_uid).glob("*.dcm")))
    expected = {"retention.after_mark": 20, "retention.mid_delete": 19, "retention.before_unmark": 0}
    assert left == expected[point]

    node = ReaderNode(tmp_path / "run-2", config_text=config, data_dir=data_dir, port=port,
                      destinations=[pacs])
    try:
        if acked != ["Success"] * 20:  # the modality re-sends a study whose association broke
            assert store_responses(node.host, node.port, node.ae_title, second.files) == ["Success"] * 20
        jobs = JobStore(Spool(data_dir))
        wait_until(lambda: not marker.exists() and not (data_dir / "incoming" / first.study_uid).exists(),
                   TRIGGER_DEADLINE_S, "the interrupted deletion completed")
        wait_until(lambda: (s := jobs.series_state(second.series_uid)) is not None
                   and s.status is SeriesStatus.DONE and len(s.instances) == 20
                   and all(t.state is SendState.DONE for t in jobs.sends()), FINAL_DEADLINE_S, "B delivered")
        assert node.events("retention.resumed")[0]["completed"] == 1
        again = _series_events(node, first.series_uid, "series.complete", "result.sent", "series.processed")
        assert again == [], f"{point}: the half-deleted series was taken for new work"
    finally:
        assert node.stop() == 0, node.log_tail()
    state = jobs.series_state(first.series_uid)
    assert state is not None and state.version == 1 and state.status is SeriesStatus.DONE
    assert len(state.instances) == 20
    for study in (first, second):
        held = pacs_results(orthanc, study.study_uid, study.series_uid)
        found = sorted((r.modality, r.version) for r in held)
        assert found == [("SEG", 1), ("SR", 1)], f"{point}: the PACS holds {found}"


@pytest.mark.parametrize("point", ["purge.after_mark", "purge.mid_delete"])
def test_sigkill_inside_reader_purge_is_completed_and_sends_nothing(tmp_path: Path, point: str,
                                                                   down: str) -> None:
    """SIGKILL inside ``reader purge --force`` of a study whose sends are pending (after its durable
    marker; after its first file): the next node start (or the next ``reader purge``) completes the
    purge before any worker runs, so the cancelled sends are never attempted and nothing of the
    study is left; another study is untouched."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model")
    data_dir, port = tmp_path / "data", free_port()
    config = retention_config(model, instances_hours=0)
    study, other = write_study(tmp_path / "S", 20), write_study(tmp_path / "O", 20)
    node = ReaderNode(tmp_path / "run-1", config_text=config, data_dir=data_dir, port=port,
                      destinations=[down])
    try:
        for s in (study, other):
            assert store_responses(node.host, node.port, node.ae_title, s.files) == ["Success"] * 20
        wait_until(lambda: len(node.events("series.processed")) == 2, FINAL_DEADLINE_S, "both processed")
    finally:
        assert node.stop() == 0, node.log_tail()
    killed = reader_purge(data_dir, study.study_uid, "--force", env={CRASH_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (data_dir / "state" / "purging" / f"study-{study.study_uid}.json").is_file()
    if point == "purge.mid_delete":  # the administrator runs the command again
        again = reader_purge(data_dir, study.study_uid, "--force")
        assert again.returncode == 0, again.stderr
        assert log_events(again.stderr, "study.purged")[0]["cancelled_sends"] == 1
    node = ReaderNode(tmp_path / "run-2", config_text=config, data_dir=data_dir, port=port,
                      destinations=[down])
    try:
        wait_until(lambda: len(node.events("send.retry_scheduled")) >= 2, FINAL_DEADLINE_S,
                   "the other study's send retried")
        if point == "purge.after_mark":
            (purged,) = node.events("study.purged")
            assert purged["resumed"] is True and purged["cancelled_sends"] == 1
        assert _series_events(node, study.series_uid, "series.complete", "send.retry_scheduled",
                              "result.sent", "send.parked") == []
    finally:
        assert node.stop() == 0, node.log_tail()
    assert [p for p in data_dir.rglob("*") if study.study_uid in p.name or study.series_uid in p.name] == []
    assert len(list((data_dir / "incoming" / other.study_uid / other.series_uid).glob("*.dcm"))) == 20
