"""A cluster on one PostgreSQL (issue 18, parts 3 and 5, and its "Bad input"), all real processes.

Every test gets a fresh database on a real PostgreSQL (``tests.postgres``), an Orthanc as the PACS
(``tests.peers``), and ``reader serve --role receiver`` and ``--role worker`` subprocesses
(``tests.node_process.ReaderNode``) on one shared data dir, with the fixture model
(``tests.reliability.write_fixture_model``), a short completion grace and a short ``[cluster]``
lease (so that a dead worker's job is taken over within seconds). Modalities are DCMTK
``storescu`` processes; what they saw acknowledged is read from their ``-v`` output.

What "exactly one SR and SEG" means here (:func:`_assert_one_result`): the series' state in the
database is done with every instance sent; the PACS holds exactly one SR and exactly one SEG of
the study, both of the series' current result version (their UIDs recomputed with
``reader.results.uids.result_uid``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from reader.jobs import JobStore, SendState, SeriesStatus
from reader.spool import Spool
from reader.state import Database
from reader.state import schema as state_schema
from reader.state.database import SCHEMA_VERSION
from tests.node_process import ReaderNode
from tests.peers import Orthanc, free_port, require_tool, wait_until
from tests.postgres import PASSWORD, PostgresServer
from tests.reliability import (
    Sender,
    Study,
    assert_acknowledged_on_disk,
    pacs_results,
    refused_port,
    serve_config,
    store_responses,
    write_fixture_model,
    write_study,
)

pytestmark = pytest.mark.integration

LEASE_S = 3.0  # [cluster] lease_seconds: a killed worker's job is free this long after its last renewal
GRACE_S = 1.0  # [completion] grace_seconds
SLICES = 12
DEADLINE_S = 120.0
OUTAGE_S = 30.0  # how long PostgreSQL is down in the outage test
SEED = int(os.environ.get("READER_CRASH_SEED", "20240611"))
_POLL_S = 0.005  # a tight poll for the kill triggers: the kill should land right after the event


# --- the cluster -------------------------------------------------------------------------------

def cluster_config(model: Path, database: str, *, extra: str = "", idle_timeout_seconds: float = 60) -> str:
    """``serve_config`` with a short grace, a one-second association timeout (a send's lease is
    four of them) and a ``[cluster]`` table on ``database`` with a short lease."""
    base = serve_config(model, grace_seconds=GRACE_S, idle_timeout_seconds=idle_timeout_seconds,
                        association_timeout_seconds=1)
    return base + f"""
[cluster]
database = {json.dumps(database)}
lease_seconds = {LEASE_S}
poll_interval_seconds = 0.05
""" + extra


@dataclass
class Cluster:
    """Processes of one cluster: receivers and workers on one data dir, one database, one PACS."""

    tmp: Path
    database: str  # the postgresql:// URL of the cluster's database
    server: PostgresServer  # the PostgreSQL serving it (stopped and started by the outage test)
    orthanc: Orthanc
    config: str
    data_dir: Path
    started: list[ReaderNode] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return f"{self.orthanc.aet}@{self.orthanc.host}:{self.orthanc.dicom_port}"

    def _start(self, role: str, name: str, port: int | None, wait: bool) -> ReaderNode:
        workdir = self.tmp / f"{name}-run{sum(n.workdir.name.startswith(name + '-') for n in self.started)}"
        node = ReaderNode(workdir, config_text=self.config, data_dir=self.data_dir, port=port,
                          destinations=[self.destination], log_level="debug", role=role, name=name,
                          wait=wait)
        self.started.append(node)
        return node

    def receiver(self, name: str, *, port: int | None = None, wait: bool = True) -> ReaderNode:
        """Start ``reader serve --role receiver --name NAME`` (debug log: ``instance.stored``)."""
        return self._start("receiver", name, port, wait)

    def worker(self, name: str, *, wait: bool = True) -> ReaderNode:
        """Start ``reader serve --role worker --name NAME``."""
        return self._start("worker", name, None, wait)

    def jobs(self) -> JobStore:
        """The cluster's state as the test reads it (its own connection to the database)."""
        return JobStore(Spool(self.data_dir), database=Database.open(self.database, self.data_dir),
                        owner="test")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The fast fixture model package (one finding per series, so a SEG is made)."""
    return write_fixture_model(tmp_path / "model")


MakeCluster = Callable[[str], Cluster]  # a config's text -> a cluster of this test's pieces


@pytest.fixture
def make_cluster(tmp_path: Path, postgres: str, postgres_server: PostgresServer,
                 orthanc: Orthanc) -> Iterator[MakeCluster]:
    """Makes clusters of the given config on a fresh database, the PACS and one data dir; every
    process each started is killed at teardown."""
    require_tool("storescu")
    made: list[Cluster] = []

    def make(config: str) -> Cluster:
        made.append(Cluster(tmp_path, postgres, postgres_server, orthanc, config, tmp_path / "storage"))
        return made[-1]
    try:
        yield make
    finally:
        for node in (n for c in made for n in c.started):
            node.kill()


@pytest.fixture
def cluster(make_cluster: MakeCluster, postgres: str, model: Path) -> Cluster:
    """A cluster's pieces (:func:`cluster_config`) on a fresh database; every process it started
    is killed at teardown."""
    return make_cluster(cluster_config(model, postgres))


# --- what the logs and the PACS say ----------------------------------------------------------

def _events(nodes: Sequence[ReaderNode], name: str, series_uid: str | None = None) -> list[dict[str, Any]]:
    """Events ``name`` of every node (of one series), each with ``_node`` (its process name) added,
    in time order."""
    found = [{**e, "_node": n.workdir.name} for n in nodes for e in n.events(name)
             if series_uid is None or e.get("series_uid") == series_uid]
    return sorted(found, key=lambda e: str(e.get("timestamp", "")))


def _at(event: dict[str, Any]) -> float:
    """An event's time (seconds since the epoch)."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _queued_versions(receivers: Sequence[ReaderNode], series_uid: str) -> list[int]:
    """The versions queued by ``series.complete`` across the receivers' logs (one per queueing)."""
    return sorted(int(e["version"]) for e in _events(receivers, "series.complete", series_uid) if e["queued"])


def _processed_versions(workers: Sequence[ReaderNode], series_uid: str) -> list[int]:
    """The versions read (``series.processed``) across the workers' logs."""
    return sorted(int(e["version"]) for e in _events(workers, "series.processed", series_uid))


def _sops(files: Sequence[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def _undelivered(jobs: JobStore, studies: Sequence[Study]) -> str:
    """What is still missing before each study's series is done with all its instances, nothing
    is queued and every send is settled; "" once nothing is."""
    for study in studies:
        state = jobs.series_state(study.series_uid)
        if state is None or state.status is not SeriesStatus.DONE:
            return f"series {study.series_uid}: {state.status.value if state else 'no state'}"
        if len(state.instances) != len(study.files):
            return f"series {study.series_uid}: {len(state.instances)} of {len(study.files)} instances"
    if queued := jobs.pending_jobs():
        return "queued: " + ", ".join(f"{j.series_uid} v{j.version}" for j in queued)
    unsettled = [t for t in jobs.sends() if t.state not in (SendState.DONE, SendState.SUPERSEDED)]
    return "sends: " + ", ".join(f"{t.name} {t.state.value} ({t.last_error})" for t in unsettled) \
        if unsettled else ""


def _delivered(jobs: JobStore, studies: Sequence[Study]) -> Callable[[], bool]:
    """True once each study's series is done with all its instances, nothing is queued and every
    send is settled."""
    return lambda: not _undelivered(jobs, studies)


def _wait_delivered(jobs: JobStore, studies: Sequence[Study], nodes: Sequence[ReaderNode], what: str) -> None:
    """Wait (``DEADLINE_S``) until :func:`_delivered`; on a timeout the error says what was still
    missing and which errors the nodes logged meanwhile."""
    try:
        wait_until(_delivered(jobs, studies), DEADLINE_S, what)
    except AssertionError as exc:
        errors = sorted({f"{n.workdir.name}: {e['event']}" for n in nodes for e in n.events()
                         if e.get("level") in ("error", "critical")})
        missing = _undelivered(jobs, studies)
        raise AssertionError(f"{exc}; still missing: {missing}; errors logged: {errors}") from exc


def _assert_one_result(orthanc: Orthanc, jobs: JobStore, study: Study) -> int:
    """The study's series is done with every instance of ``study`` and the PACS holds exactly one
    SR and one SEG, of the current version; returns that version."""
    state = jobs.series_state(study.series_uid)
    assert state is not None and state.status is SeriesStatus.DONE, state
    assert set(state.instances) == set(study.sop_uids), "instances lost or foreign"
    held = pacs_results(orthanc, study.study_uid, study.series_uid, max_version=state.version + 5)
    found = sorted((r.modality, r.version) for r in held)
    assert found == [("SEG", state.version), ("SR", state.version)], f"the PACS holds {found}"
    return state.version


def _alive(nodes: Sequence[ReaderNode]) -> None:
    for node in nodes:
        assert node.process.poll() is None, f"{node.workdir.name} exited:\n{node.log_tail()}"


# --- 1. several receivers, several workers -----------------------------------------------------

def test_two_receivers_two_workers_complete_and_read_each_study_once(tmp_path: Path,
                                                                     cluster: Cluster) -> None:
    """Two receivers (two ports) and two workers on one PostgreSQL and one data dir; three studies
    sent at once: A to the first receiver, B to the second, C half over each (two associations at
    the same time, one to each receiver). Each series is queued once across the receivers' logs
    (one ``series.complete`` with queued=true, version 1), read once across the workers' logs (one
    ``series.processed``), and the PACS holds exactly one SR and one SEG (v1) per study."""
    r1, r2 = cluster.receiver("recv-a", wait=False), cluster.receiver("recv-b", wait=False)
    w1, w2 = cluster.worker("work-a", wait=False), cluster.worker("work-b", wait=False)
    for node in (r1, r2, w1, w2):
        node.wait_ready()
    a, b, c = (write_study(tmp_path / k, SLICES) for k in "ABC")
    half = len(c.files) // 2
    senders = [Sender(r1, a.files, tmp_path / "A.log", deadline_s=DEADLINE_S),
               Sender(r2, b.files, tmp_path / "B.log", deadline_s=DEADLINE_S),
               Sender(r1, c.files[:half], tmp_path / "C1.log", deadline_s=DEADLINE_S),
               Sender(r2, c.files[half:], tmp_path / "C2.log", deadline_s=DEADLINE_S)]
    acked = set().union(*(s.acknowledged() for s in senders))
    assert acked == {*a.files, *b.files, *c.files}, "a receiver refused an instance"
    jobs = cluster.jobs()
    _wait_delivered(jobs, [a, b, c], cluster.started, "every study read and delivered")
    for study in (a, b, c):
        assert _queued_versions([r1, r2], study.series_uid) == [1], "a series was queued twice"
        assert _processed_versions([w1, w2], study.series_uid) == [1], "a series was read twice"
        assert _assert_one_result(cluster.orthanc, jobs, study) == 1
    both = {e["_node"] for e in _events([r1, r2], "series.complete", c.series_uid)}
    print(f"study C completed by {sorted(both)}; deferred: {len(_events([r1, r2], 'study.deferred'))}")
    for node in (r1, r2, w1, w2):
        assert node.stop() == 0, node.log_tail()


# --- 2. a worker killed mid-job ----------------------------------------------------------------

@dataclass(frozen=True)
class Moment:
    """Kill the worker that logs ``trigger`` for the round's series, after ``delay_s`` (uniform)."""

    label: str
    trigger: str
    delay_s: tuple[float, float] = (0.0, 0.0)


WORKER_MOMENTS = (  # tests/test_crash.py's moments that happen in a worker
    Moment("routing", "series.routed"),
    Moment("volume loaded", "volume.loaded"),
    Moment("inference done", "inference.done"),
    Moment("results encoded", "results.encoded"),
    Moment("inside processing: random delay", "series.routed", delay_s=(0.05, 0.6)),
    Moment("send ticket queued", "result.queued"),
    Moment("association to the PACS", "send.association"),
    Moment("first object sent", "result.sent"),
)


def _trigger_seen(node: ReaderNode, moment: Moment, series_uid: str, earlier: int) -> bool:
    """``moment.trigger`` logged by ``node`` for the series (``send.association`` names no series:
    any new one, as one study is in flight at a time)."""
    if moment.trigger == "send.association":
        return len(node.events("send.association")) > earlier
    return any(e.get("series_uid") == series_uid for e in node.events(moment.trigger))


def _reached(workers: dict[str, ReaderNode], moment: Moment, series_uid: str,
             earlier: dict[str, int]) -> str | None:
    """The name of the process among ``workers`` (the workers, or every process) that logged the
    moment's trigger for the series, if one did."""
    return next((name for name, w in workers.items()
                 if _trigger_seen(w, moment, series_uid, earlier[name])), None)


def _logged(nodes: dict[str, ReaderNode], moment: Moment, series_uid: str,
            earlier: dict[str, int]) -> Callable[[], bool]:
    """True once one of ``nodes`` logged the moment's trigger for the series."""
    return lambda: _reached(nodes, moment, series_uid, earlier) is not None


def test_sigkill_a_worker_mid_job_another_finishes_it(tmp_path: Path, cluster: Cluster) -> None:
    """One receiver, two workers; a study per round, and the worker that reaches the round's moment
    (routing, volume loaded, inference done, results encoded, a random delay inside processing,
    send ticket queued, association to the PACS, first object sent) is SIGKILLed. The other worker
    takes the job over once the dead one's lease has run out (not before: it routes the series at
    least half a lease after the kill) and reads it; a worker killed once the outcome was recorded
    (the kill lands a little after its event) is not read again, and a live process sends the
    results it had queued once their lease runs out. The killed worker is then restarted under its
    name. Every study ends read with every instance and exactly one SR and one SEG of its version in
    the PACS, and at least four kills landed inside a job."""
    rng = random.Random(SEED)
    receiver = cluster.receiver("recv-a", wait=False)
    workers = {"work-a": cluster.worker("work-a", wait=False), "work-b": cluster.worker("work-b", wait=False)}
    for node in (receiver, *workers.values()):
        node.wait_ready()
    jobs = cluster.jobs()
    studies: list[Study] = []
    report: list[str] = []
    for i, moment in enumerate(WORKER_MOMENTS):
        study = write_study(tmp_path / f"study-{i}", SLICES)
        studies.append(study)
        everyone = {**workers, "recv-a": receiver}  # a receiver sends results too
        earlier = {name: len(n.events("send.association")) for name, n in everyone.items()}
        assert store_responses(receiver.host, receiver.port, receiver.ae_title, study.files) == \
            ["Success"] * SLICES
        done = _delivered(jobs, [study])
        deadline = time.monotonic() + DEADLINE_S
        while (victim := _reached(workers, moment, study.series_uid, earlier)) is None:
            if done():  # the trigger is logged (by a worker, or a receiver that sent the results)
                wait_until(_logged(everyone, moment, study.series_uid, earlier), DEADLINE_S,
                           f"{moment.label}: {moment.trigger} in a process's log")
                victim = _reached(workers, moment, study.series_uid, earlier)
                break
            assert time.monotonic() < deadline, f"{moment.label}: no {moment.trigger} within {DEADLINE_S} s"
            _alive([receiver, *workers.values()])
            time.sleep(_POLL_S)
        if victim is None:  # a receiver sent the results: nothing in a worker to kill
            report.append(f"{moment.label}: not reached in a worker (a receiver sent the results)")
            continue
        hold = rng.uniform(*moment.delay_s)
        if hold:
            time.sleep(hold)  # the fault-injection delay itself, not a synchronisation wait
        workers[victim].kill()
        killed_at = time.time()
        survivor = next(w for name, w in workers.items() if name != victim)
        wait_until(done, DEADLINE_S, f"{moment.label}: the study read and delivered after the kill")
        routed_after = [e for e in _events([survivor], "series.routed", study.series_uid)
                        if _at(e) > killed_at]
        if routed_after:  # the dead worker's job, taken over
            assert not _events([workers[victim]], "series.processed", study.series_uid), \
                f"{moment.label}: a series read to the end was read again"
            waited = _at(routed_after[0]) - killed_at
            assert waited >= LEASE_S / 2 - 0.2, f"{moment.label}: taken over {waited:.2f} s after the kill"
            report.append(f"{moment.label}: {victim} killed, taken over after {waited:.2f} s")
        else:  # the kill landed once the outcome was recorded (its log line may not have been written)
            report.append(f"{moment.label}: {victim} killed after recording the outcome; sends finished")
        _assert_one_result(cluster.orthanc, jobs, study)
        workers[victim] = cluster.worker(victim)  # restarted: the same name, free again since the kill
        assert workers[victim].events("node.started")[-1]["process"] == victim
    print("\n".join(report))
    assert sum("taken over" in line for line in report) >= 4, "the kills inside a job never landed"
    for study in studies:
        _assert_one_result(cluster.orthanc, jobs, study)
    for node in (receiver, *workers.values()):
        assert node.stop() == 0, node.log_tail()


# --- 3. a receiver killed mid-association -------------------------------------------------------

def _kill_a_receiver_mid_study(tmp_path: Path, cluster: Cluster
                               ) -> tuple[ReaderNode, ReaderNode, ReaderNode, Study, set[Path]]:
    """Two receivers and a worker; a modality sends a 20-slice study to the first receiver, which
    is SIGKILLed after its 5th ``instance.stored``. Returns both receivers, the worker, the study
    and the files storescu saw acknowledged (at least 5, not all)."""
    r1, r2, worker = cluster.receiver("recv-a", wait=False), cluster.receiver("recv-b", wait=False), \
        cluster.worker("work-a", wait=False)
    for node in (r1, r2, worker):
        node.wait_ready()
    study = write_study(tmp_path / "A", 20)
    sender = Sender(r1, study.files, tmp_path / "A-1.log", deadline_s=DEADLINE_S)
    wait_until(lambda: len(r1.events("instance.stored")) >= 5 or sender.process.poll() is not None,
               DEADLINE_S, "5 instances stored by the first receiver")
    r1.kill()
    acked = sender.acknowledged()
    assert 5 <= len(acked) < len(study.files), f"{len(acked)} acknowledged: the kill missed the association"
    return r1, r2, worker, study, acked


def test_sigkill_a_receiver_mid_association_loses_nothing(tmp_path: Path, cluster: Cluster) -> None:
    """Two receivers and a worker; a modality sends a study to the first receiver, which is
    SIGKILLed after its 5th ``instance.stored`` (:func:`_kill_a_receiver_mid_study`). Every
    instance storescu saw acknowledged is on the shared storage; the modality re-sends the whole
    study to the other receiver (all Success); the series is queued once (one ``series.complete``
    queued across both logs, version 1), read once, and the PACS holds exactly one SR and one SEG
    (v1). The killed receiver, restarted under its name, empties its own staging folder
    (``tmp/recv-a/``) and leaves the live one's alone."""
    r1, r2, worker, study, acked = _kill_a_receiver_mid_study(tmp_path, cluster)
    assert_acknowledged_on_disk(cluster.data_dir, acked)
    assert store_responses(r2.host, r2.port, r2.ae_title, study.files) == ["Success"] * len(study.files)
    jobs = cluster.jobs()
    _wait_delivered(jobs, [study], cluster.started, "the re-sent study read and delivered")
    assert _queued_versions([r1, r2], study.series_uid) == [1]
    assert _processed_versions([worker], study.series_uid) == [1]
    assert _assert_one_result(cluster.orthanc, jobs, study) == 1
    # the killed receiver restarts under its name and cleans its own staging folder, not another's
    staged = cluster.data_dir / "tmp"
    (staged / "recv-a" / ".w-left-by-the-kill").write_bytes(b"partial")
    (staged / "recv-b" / ".w-in-flight").write_bytes(b"another process's write")
    again = cluster.receiver("recv-a", port=r1.port)
    # it listens before it logs node.started
    wait_until(lambda: bool(again.events("node.started")), DEADLINE_S, "node.started of the restart")
    assert again.events("node.started")[-1]["process"] == "recv-a"
    assert list((staged / "recv-a").iterdir()) == []
    assert (staged / "recv-b" / ".w-in-flight").is_file(), "a start-up deleted another process's file"
    for node in (again, r2, worker):
        assert node.stop() == 0, node.log_tail()


def test_a_study_a_dead_receiver_left_half_way_is_completed_by_another(
        tmp_path: Path, postgres: str, model: Path, make_cluster: MakeCluster) -> None:
    """A receiver SIGKILLed mid-association, and a modality that never sends again: once no
    instance of the study came for the idle timeout (3 s here) and the grace, the other receiver
    adopts the study from the arrivals the dead one recorded (``study.adopted``), queues its series
    once with every instance on the storage (all those acknowledged among them), and the PACS gets
    exactly one SR of version 1, and one SEG with it when the model found something in them."""
    cluster = make_cluster(cluster_config(model, postgres, idle_timeout_seconds=3))
    r1, r2, worker, study, acked = _kill_a_receiver_mid_study(tmp_path, cluster)
    jobs = cluster.jobs()
    wait_until(lambda: bool(r2.events("study.adopted")), DEADLINE_S, "the other receiver adopting it")
    stored = {p.stem for p in Spool(cluster.data_dir).series_instances(study.study_uid, study.series_uid)}

    def delivered() -> bool:
        state = jobs.series_state(study.series_uid)
        return (state is not None and state.status is SeriesStatus.DONE and not jobs.pending_jobs()
                and all(t.state is SendState.DONE for t in jobs.sends()))
    wait_until(delivered, DEADLINE_S, "the adopted study read and delivered")
    state = jobs.series_state(study.series_uid)
    assert state is not None and set(state.instances) == stored >= _sops(sorted(acked))
    assert _queued_versions([r1, r2], study.series_uid) == [1]
    assert _processed_versions([worker], study.series_uid) == [1]
    # the few slices stored before the kill may hold no finding: then the SR alone (negative)
    (processed,) = _events([worker], "series.processed", study.series_uid)
    expected = [("SEG", 1), ("SR", 1)] if processed["findings"] else [("SR", 1)]
    held = pacs_results(cluster.orthanc, study.study_uid, study.series_uid, max_version=5)
    assert sorted((r.modality, r.version) for r in held) == expected


# --- 4. PostgreSQL lost for 30 s ---------------------------------------------------------------

def test_postgresql_down_30_s_refuses_what_it_cannot_record_and_resumes(tmp_path: Path,
                                                                        cluster: Cluster) -> None:
    """A receiver and two workers; study A is sent and PostgreSQL is stopped as a worker starts
    reading it. While the database is down (30 s): a study B sent to the receiver is answered Out of
    Resources (0xA700) for every instance, none acknowledged; every process stays up. Once it is
    back, the modality re-sends B (all Success); A (whose job the worker lost with the database)
    and B are each read and delivered: nothing acknowledged is lost, and the PACS holds exactly one
    SR and one SEG per study. The errors logged meanwhile never show the database's password."""
    receiver = cluster.receiver("recv-a", wait=False)
    workers = [cluster.worker("work-a", wait=False), cluster.worker("work-b", wait=False)]
    for node in (receiver, *workers):
        node.wait_ready()
    a, b = write_study(tmp_path / "A", SLICES), write_study(tmp_path / "B", SLICES)
    assert store_responses(receiver.host, receiver.port, receiver.ae_title, a.files) == ["Success"] * SLICES
    wait_until(lambda: bool(_events(workers, "series.routed", a.series_uid)), DEADLINE_S, "A being read")
    cluster.server.stop()
    down_at = time.monotonic()
    try:
        answers = store_responses(receiver.host, receiver.port, receiver.ae_title, b.files)
        assert answers, "no C-STORE answered while the database was down"
        assert all(r.startswith("Refused: OutOfResources") for r in answers), answers
        def outage_over() -> bool:
            _alive([receiver, *workers])
            return time.monotonic() - down_at >= OUTAGE_S
        wait_until(outage_over, OUTAGE_S + 10, "the outage's 30 s, every process up")
    finally:
        cluster.server.start()
    # the receiver may need a moment to reconnect: the modality retries a refused association
    wait_until(lambda: store_responses(receiver.host, receiver.port, receiver.ae_title, b.files)
               == ["Success"] * SLICES, DEADLINE_S, "B stored once the database is back")
    jobs = cluster.jobs()
    _wait_delivered(jobs, [a, b], cluster.started, "A and B read and delivered")
    for study in (a, b):
        _assert_one_result(cluster.orthanc, jobs, study)
    errors = _events([receiver, *workers], "worker.storage_error")
    print(f"refused while down: {len(answers)}; storage errors logged: {len(errors)}")
    assert errors, "the outage went unnoticed"
    assert not _events([receiver, *workers], "worker.crashed"), "a worker's loop ended on an unnamed error"
    assert not _events(workers, "series.failed"), "a series failed for the outage"
    assert all(PASSWORD not in n.log_path.read_text(encoding="utf-8") for n in (receiver, *workers)), \
        "the database password in a log"
    for node in (receiver, *workers):
        assert node.stop() == 0, node.log_tail()


# --- 5. bad input --------------------------------------------------------------------------------

def _serve(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``reader serve`` as an operator starts it; waits for it to end."""
    config_path = tmp_path / "reader.toml"
    config_path.write_text(config, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "reader.cli", "serve", "--config", os.fspath(config_path),
                           "--data-dir", os.fspath(tmp_path / "storage"), "--bind", "127.0.0.1",
                           "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=DEADLINE_S, check=False,
                          cwd=Path(__file__).resolve().parents[1])


def _problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_unreachable_database_at_start_is_one_line_and_exit_2(tmp_path: Path, model: Path, role: str) -> None:
    """``reader serve`` whose ``[cluster] database`` is a closed port exits 2 with one line on
    stderr naming the database (host and port) and never its password; no port was served."""
    with refused_port() as port:
        url = f"postgresql://reader:pw-not-shown@127.0.0.1:{port}/reader"
        done = _serve(tmp_path, cluster_config(model, url), "--role", role)
    assert done.returncode == 2, done.stderr
    lines = _problem_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "pw-not-shown" not in done.stderr + done.stdout, lines


def test_newer_schema_refuses_to_start(tmp_path: Path, model: Path, postgres: str) -> None:
    """A database whose ``schema_version`` is above what this code knows (a newer release migrated
    it): ``reader serve`` exits 2 with one line saying the schema is newer, and changes nothing."""
    database = Database.open(postgres, tmp_path)
    try:
        newer = SCHEMA_VERSION + 1
        database.run(lambda conn: conn.execute(state_schema.schema_version.update().values(version=newer)))
        done = _serve(tmp_path, cluster_config(model, postgres), "--role", "receiver")
        assert done.returncode == 2, done.stderr
        lines = _problem_lines(done.stderr)
        assert len(lines) == 1 and re.search(r"schema.*(too new|newer)", lines[0]), done.stderr
        assert f"version {newer}" in lines[0], lines
        version = database.run(lambda conn: conn.execute(
            state_schema.schema_version.select().with_only_columns(state_schema.schema_version.c.version)
        ).scalar(), write=False)
        assert version == newer
    finally:
        database.close()


# --- 6. STAT first on every worker ---------------------------------------------------------------

def test_stat_studies_overtake_routine_work_on_every_worker(tmp_path: Path, postgres: str, model: Path,
                                                            make_cluster: MakeCluster) -> None:
    """Two workers, idle and then frozen (SIGSTOP) while four routine studies and then two STAT
    studies (accession numbers with the configured STAT prefix "ED") are queued; both resumed at
    once (SIGCONT). Each worker's first series read is a STAT one, and no worker reads a routine
    series before its STAT one, although every routine series was queued earlier; all six are then
    read and delivered."""
    config = cluster_config(model, postgres, extra='\n[priority]\nstat_accession_prefixes = ["ED"]\n')
    made = make_cluster(config)
    receiver = made.receiver("recv-a", wait=False)
    workers = [made.worker("work-a", wait=False), made.worker("work-b", wait=False)]
    for node in (receiver, *workers):
        node.wait_ready()
    for w in workers:
        w.process.send_signal(signal.SIGSTOP)
    routine = [write_study(tmp_path / f"R{i}", SLICES, accession_number=f"R{i}") for i in range(4)]
    stat = [write_study(tmp_path / f"S{i}", SLICES, accession_number=f"ED{i}") for i in range(2)]
    for study in [*routine, *stat]:
        assert store_responses(receiver.host, receiver.port, receiver.ae_title, study.files) == \
            ["Success"] * SLICES
        wait_until(lambda s=study: bool(_queued_versions([receiver], s.series_uid)), DEADLINE_S,
                   "the study queued")
    priorities = {e["series_uid"]: e["priority"] for e in receiver.events("series.complete")}
    assert [priorities[s.series_uid] for s in stat] == [1, 1] and \
        [priorities[s.series_uid] for s in routine] == [0] * 4
    for w in workers:
        w.process.send_signal(signal.SIGCONT)
    jobs = made.jobs()
    _wait_delivered(jobs, [*routine, *stat], made.started, "all six read and delivered")
    stat_uids = {s.series_uid for s in stat}
    for w in workers:
        order = [e["series_uid"] for e in _events([w], "series.routed")]
        assert order, f"{w.workdir.name} read nothing"
        assert order[0] in stat_uids, f"{w.workdir.name} read a routine series first"
        last_stat = max(i for i, uid in enumerate(order) if uid in stat_uids)
        assert all(uid in stat_uids for uid in order[:last_stat + 1]), order
    for study in [*routine, *stat]:
        _assert_one_result(made.orthanc, jobs, study)
    for node in (receiver, *workers):
        assert node.stop() == 0, node.log_tail()
