"""Pipelined processing (issue 5): work for one series never blocks another.

A real node (``reader.node.Node``) with a real fixture ONNX model processes synthetic CT series.
The test holds chosen series at chosen stages with Events: :class:`GatedModel` wraps the real
model package and :class:`ObservedPipeline` the real pipeline (set as the node's pipeline before
it starts), so that the overlaps the node promises can be observed while they happen. Jobs are
queued on the node's own spool before it starts, as a restart finds them; the STAT series
arrives over a real association (C-STORE Priority HIGH).

The last tests cover the send-ticket archive: settled tickets are not re-read by the dispatcher,
and ``reader status`` / ``reader retry`` still see and re-queue them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from reader.config import SendingConfig
from reader.dispatch import Dispatcher
from reader.errors import DatabaseUnavailable
from reader.findings import InferenceResult
from reader.inference import ModelPackage
from reader.jobs import JobStore, ProcessJob, SendState, SeriesStatus
from reader.node import PRIORITY_ROUTINE, PRIORITY_STAT, Node, run_guarded
from reader.pipeline import Inferred, Pipeline, Prepared
from reader.requestor import keep_responses_for_caller
from reader.send import StoreSCU
from reader.spool import Spool
from reader.state import schema as state_schema
from reader.volume import Volume
from tests.peers import LOCALHOST, wait_until
from tests.reliability import Study, write_fixture_model, write_study
from tests.test_node import DEADLINE_S, _config


class Probe:
    """Named Events a test waits on or opens, and the order in which marks were made."""

    def __init__(self, closed: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self.marks: list[str] = []
        for name in closed:
            self.event(f"gate:{name}")  # created closed; every other gate is open
        self._closed = set(closed)

    def event(self, name: str) -> threading.Event:
        """The Event called ``name``, created on first use."""
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def mark(self, name: str) -> None:
        """Record ``name`` and set its Event."""
        with self._lock:
            self.marks.append(name)
        self.event(name).set()

    def gate(self, name: str) -> None:
        """Wait at gate ``name`` if the test closed it, until the test opens it."""
        if name in self._closed and not self.event(f"gate:{name}").wait(DEADLINE_S):
            raise AssertionError(f"gate {name} never opened")

    def open(self, name: str) -> None:
        """Open gate ``name``."""
        self.event(f"gate:{name}").set()

    def open_all(self) -> None:
        """Open every gate (teardown)."""
        for name in self._closed:
            self.open(name)

    def wait(self, name: str) -> None:
        """Wait for mark ``name`` with the test deadline."""
        wait_until(self.event(name).is_set, DEADLINE_S, name)


class GatedModel:
    """The real model package; a run marks ``infer:<series>``, waits at gate ``infer:<series>``,
    raises for series in ``fail``, and marks ``inferred:<series>`` when the model returns."""

    def __init__(self, inner: ModelPackage, probe: Probe, fail: frozenset[str] = frozenset()) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.probe = probe
        self.fail = fail
        self.order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        """The rest (algorithm, provider, precision) as the real package has it."""
        return getattr(self.inner, name)

    def run(self, volume: Volume) -> InferenceResult:
        """Run the real model once the test lets this series through."""
        uid = volume.series_instance_uid
        self.order.append(uid)
        self.probe.mark(f"infer:{uid}")
        self.probe.gate(f"infer:{uid}")
        if uid in self.fail:
            raise RuntimeError("fixture failure in the model")
        result = self.inner.run(volume)
        self.probe.mark(f"inferred:{uid}")
        return result


@dataclass(frozen=True)
class ObservedPipeline(Pipeline):
    """The real pipeline, marking ``prepared:<series>``, ``finish:<series>`` (then waiting at gate
    ``finish:<series>``) and ``finished:<series>``; ``fail`` maps series to a stage that raises."""

    probe: Probe
    fail: Mapping[str, str]

    def _maybe_fail(self, uid: str, stage: str) -> None:
        if self.fail.get(uid) == stage:
            raise RuntimeError(f"fixture failure in {stage}")

    def prepare(self, job: ProcessJob) -> Prepared | SeriesStatus:
        """Route and load, then mark."""
        self._maybe_fail(job.series_uid, "prepare")
        outcome = super().prepare(job)
        self.probe.mark(f"prepared:{job.series_uid}")
        return outcome

    def finish(self, inferred: Inferred) -> SeriesStatus:
        """Mark, wait at the gate, encode and write, mark."""
        uid = inferred.prepared.job.series_uid
        self.probe.mark(f"finish:{uid}")
        self.probe.gate(f"finish:{uid}")
        self._maybe_fail(uid, "finish")
        outcome = super().finish(inferred)
        self.probe.mark(f"finished:{uid}")
        return outcome


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """The fast real ONNX fixture package the reliability tests use."""
    return ModelPackage.load(write_fixture_model(tmp_path_factory.mktemp("model")))


def _studies(tmp_path: Path, *names: str) -> dict[str, Study]:
    return {name: write_study(tmp_path / "studies" / name, 12) for name in names}


def _node(tmp_path: Path, model: ModelPackage, probe: Probe, *, fail_model: frozenset[str] = frozenset(),
          fail_stage: Mapping[str, str] | None = None) -> tuple[Node, GatedModel]:
    gated = GatedModel(model, probe, fail_model)
    node = Node(_config(tmp_path), {"blob": cast(Any, gated)})
    base = node.pipeline
    node.pipeline = ObservedPipeline(base.config, base.spool, base.jobs, base.models, probe, fail_stage or {})
    return node, gated


def _queue(node: Node, study: Study, priority: int = PRIORITY_ROUTINE) -> None:
    """Store the study's instances in the node's spool and queue its job, as a restart finds them."""
    sops = []
    for f in study.files:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        node.spool.store_instance(study.study_uid, study.series_uid, sop, f.read_bytes())
        sops.append(sop)
    assert node.jobs.enqueue_if_changed(study.study_uid, study.series_uid, tuple(sops), priority) is not None


def _status(node: Node, study: Study) -> SeriesStatus | None:
    state = node.jobs.series_state(study.series_uid)
    return None if state is None else state.status


def _wait_settled(node: Node, studies: list[Study]) -> None:
    wait_until(lambda: all(_status(node, s) in (SeriesStatus.DONE, SeriesStatus.FAILED) for s in studies)
               and not node.jobs.pending_jobs(), DEADLINE_S, "every series processed")


def _send_stat(port: int, study: Study) -> None:
    """Send a study with C-STORE Priority HIGH (PS3.7 9.1.1.1), which makes it STAT."""
    ae = AE(ae_title="EDMODALITY")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate(LOCALHOST, port, ae_title="SECONDREADER")
    assert assoc.is_established
    keep_responses_for_caller(assoc)  # several requests on one association (reader.requestor)
    try:
        for f in study.files:
            assert assoc.send_c_store(pydicom.dcmread(f), priority=1).Status == 0
    finally:
        assoc.release()


def test_next_series_is_loaded_while_the_model_runs(tmp_path: Path, fixture_model: ModelPackage) -> None:
    """While the model is held on the first series, the second one is routed and decoded."""
    s = _studies(tmp_path, "one", "two")
    probe = Probe(closed=(f"infer:{s['one'].series_uid}",))
    node, _ = _node(tmp_path, fixture_model, probe)
    _queue(node, s["one"])
    _queue(node, s["two"])
    node.start()
    try:
        probe.wait(f"infer:{s['one'].series_uid}")
        probe.wait(f"prepared:{s['two'].series_uid}")
        wait_until(lambda: node.board.snapshot()["ready"] == [s["two"].series_uid], DEADLINE_S,
                   "the second volume handed to the inference worker")
        assert node.board.snapshot()["inferring"] == [s["one"].series_uid]
        probe.open_all()
        _wait_settled(node, list(s.values()))
    finally:
        probe.open_all()
        node.stop()
    assert [_status(node, x) for x in s.values()] == [SeriesStatus.DONE, SeriesStatus.DONE]


def test_encoding_overlaps_the_next_inference(tmp_path: Path, fixture_model: ModelPackage) -> None:
    """While the first series is held in encoding, the model runs the second one to its end."""
    s = _studies(tmp_path, "one", "two")
    probe = Probe(closed=(f"finish:{s['one'].series_uid}",))
    node, gated = _node(tmp_path, fixture_model, probe)
    _queue(node, s["one"])
    _queue(node, s["two"])
    node.start()
    try:
        probe.wait(f"finish:{s['one'].series_uid}")
        probe.wait(f"inferred:{s['two'].series_uid}")
        assert node.board.snapshot()["finishing"] == [s["one"].series_uid]
        assert _status(node, s["one"]) is SeriesStatus.QUEUED  # still being encoded
        probe.open_all()
        _wait_settled(node, list(s.values()))
    finally:
        probe.open_all()
        node.stop()
    assert gated.order == [s["one"].series_uid, s["two"].series_uid]
    assert probe.marks.index(f"finished:{s['one'].series_uid}") < probe.marks.index(
        f"finished:{s['two'].series_uid}")
    assert [_status(node, x) for x in s.values()] == [SeriesStatus.DONE, SeriesStatus.DONE]


def test_stat_series_overtakes_prepared_routine_work(tmp_path: Path, fixture_model: ModelPackage) -> None:
    """A STAT series arriving while a routine one is already decoded reaches the model before it;
    the routine volume is set aside and runs next."""
    s = _studies(tmp_path, "routine-1", "routine-2", "stat")
    uid = {name: st.series_uid for name, st in s.items()}
    probe = Probe(closed=(f"infer:{uid['routine-1']}",))
    node, gated = _node(tmp_path, fixture_model, probe)
    _queue(node, s["routine-1"])
    _queue(node, s["routine-2"])
    node.start()
    try:
        probe.wait(f"infer:{uid['routine-1']}")
        probe.wait(f"prepared:{uid['routine-2']}")
        _send_stat(node.scp.port, s["stat"])
        probe.wait(f"prepared:{uid['stat']}")
        job = next(j for j in node.jobs.pending_jobs() if j.series_uid == uid["stat"])
        assert job.priority == PRIORITY_STAT
        wait_until(lambda: sorted(node.board.snapshot()["ready"]) == sorted([uid["routine-2"], uid["stat"]]),
                   DEADLINE_S, "the STAT volume waiting beside the routine one set aside")
        probe.open_all()
        _wait_settled(node, list(s.values()))
    finally:
        probe.open_all()
        node.stop()
    assert gated.order == [uid["routine-1"], uid["stat"], uid["routine-2"]]
    assert all(_status(node, x) is SeriesStatus.DONE for x in s.values())


def test_a_failing_series_does_not_stop_later_ones(tmp_path: Path, fixture_model: ModelPackage) -> None:
    """Unexpected errors in loading, in the model and in encoding fail only their own series
    (recorded with the reason); the series queued after them are processed."""
    s = _studies(tmp_path, "bad-load", "bad-model", "bad-encode", "good")
    uid = {name: st.series_uid for name, st in s.items()}
    probe = Probe()
    node, _ = _node(tmp_path, fixture_model, probe, fail_model=frozenset({uid["bad-model"]}),
                    fail_stage={uid["bad-load"]: "prepare", uid["bad-encode"]: "finish"})
    for name in ("bad-load", "bad-model", "bad-encode", "good"):
        _queue(node, s[name])
    node.start()
    try:
        _wait_settled(node, list(s.values()))
    finally:
        node.stop()
    for name in ("bad-load", "bad-model", "bad-encode"):
        state = node.jobs.series_state(uid[name])
        assert state is not None and state.status is SeriesStatus.FAILED, name
        assert state.reason.startswith("internal error: RuntimeError: fixture failure"), state.reason
    assert _status(node, s["good"]) is SeriesStatus.DONE
    assert node.spool.result_path(uid["good"], 1, "sr").is_file()


def test_stop_drops_waiting_work_and_restart_resumes_it(tmp_path: Path, fixture_model: ModelPackage) -> None:
    """Stopping while a series is in the model and another is decoded finishes the first, leaves the
    second queued on disk, and a new node on the same data dir processes it."""
    s = _studies(tmp_path, "one", "two")
    probe = Probe(closed=(f"infer:{s['one'].series_uid}",))
    node, _ = _node(tmp_path, fixture_model, probe)
    _queue(node, s["one"])
    _queue(node, s["two"])
    node.start()
    stopper, started = threading.Thread(target=node.stop), False
    try:
        probe.wait(f"prepared:{s['two'].series_uid}")
        wait_until(lambda: node.board.snapshot()["ready"] == [s["two"].series_uid], DEADLINE_S,
                   "the second volume waiting")
        stopper.start()
        started = True
        wait_until(lambda: node.board.snapshot()["ready"] == [], DEADLINE_S, "the waiting volume dropped")
    finally:
        probe.open_all()
        if started:
            stopper.join(DEADLINE_S)
        else:
            node.stop()
    assert _status(node, s["one"]) is SeriesStatus.DONE
    assert [j.series_uid for j in node.jobs.pending_jobs()] == [s["two"].series_uid]
    again, _ = _node(tmp_path, fixture_model, Probe())
    again.start()
    try:
        _wait_settled(again, list(s.values()))
    finally:
        again.stop()
    assert _status(again, s["two"]) is SeriesStatus.DONE


# --- send-ticket archive -----------------------------------------------------------------------
def _cli(data_dir: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "reader.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_settled_tickets_are_archived_and_not_reread(tmp_path: Path) -> None:
    """A delivered ticket is settled: the dispatcher's pass does not read it (an unreadable settled
    row changes nothing), while ``reader status`` still counts it."""
    jobs = JobStore(Spool(tmp_path))
    dispatcher = Dispatcher(jobs, SendingConfig(), {}, StoreSCU("SECONDREADER"))
    done = jobs.add_send("1.2.3", 1, "PACS@h:1", [])
    waiting = jobs.add_send("1.2.4", 1, "PACS@h:1", [])
    jobs.update_send(replace(done, state=SendState.DONE, attempts=1))
    assert [t.name for t in jobs.pending_sends()] == [waiting.name]
    states = {t.name: t.state for t in jobs.sends()}
    assert states == {done.name: SendState.DONE, waiting.name: SendState.PENDING}
    with jobs.database.transaction() as conn:
        conn.execute(sa.update(state_schema.sends).where(state_schema.sends.c.name == done.name)
                     .values(files="not json"))
    assert [t.name for t in dispatcher.due(now=1e12)] == [waiting.name]
    assert dispatcher.next_due_in(now=1e12) == 0.0
    with jobs.database.transaction() as conn:
        conn.execute(sa.update(state_schema.sends).where(state_schema.sends.c.name == done.name)
                     .values(files="[]"))
    status = json.loads(_cli(tmp_path, "status", "--json"))
    assert status["sends"] == {"done": 1, "pending": 1}
    fetched = jobs.send(done.name)
    assert fetched is not None and fetched.state is SendState.DONE


def test_parked_ticket_is_archived_and_reader_retry_requeues_it(tmp_path: Path) -> None:
    """A parked ticket leaves the dispatcher's queue; ``reader status`` lists it as failed and
    ``reader retry`` puts it back in the queue with attempts reset."""
    jobs = JobStore(Spool(tmp_path))
    ticket = jobs.add_send("1.2.3", 1, "PACS@h:1", [])
    jobs.update_send(replace(ticket, state=SendState.FAILED, attempts=20, last_error="gave up"))
    assert jobs.pending_sends() == []
    status = json.loads(_cli(tmp_path, "status", "--json"))
    assert [f["ticket"] for f in status["failed_sends"]] == [ticket.name]
    assert "re-queued 1" in _cli(tmp_path, "retry")
    pending = jobs.pending_sends()
    assert [(t.name, t.state, t.attempts) for t in pending] == [(ticket.name, SendState.PENDING, 0)]
    assert jobs.sends() == pending, "a settled copy of the re-queued ticket is left"
    assert json.loads(_cli(tmp_path, "status", "--json"))["sends"] == {"pending": 1}


def test_settled_ticket_left_among_pending_ones_is_moved(tmp_path: Path) -> None:
    """A settled ticket found among the pending ones of a data dir from before the state database
    (``state/sends/``, where a crash mid-move or a data dir from before the archive left it) is
    imported settled, unchanged, at the first open; the JSON folders move to
    ``state/imported-json/``."""
    spool = Spool(tmp_path)
    ticket = {"name": "1.2.3-v1-abc", "series_uid": "1.2.3", "version": 1, "destination": "PACS@h:1",
              "files": [], "state": "done", "attempts": 1, "next_attempt_at": 0.0, "last_error": "",
              "last_status": 0, "created_at": 1.0, "lineage": "", "updated_at": 2.0}
    spool.write_state("sends", ticket["name"], ticket)
    spool.write_state("sends-archive", ticket["name"], {**ticket, "state": "pending"})  # the stale copy
    jobs = JobStore(spool)
    assert jobs.pending_sends() == []
    assert not (tmp_path / "state" / "sends").exists()
    assert (tmp_path / "state" / "imported-json" / "sends" / "1.2.3-v1-abc.json").is_file()
    moved = jobs.send(ticket["name"])
    assert moved is not None and moved.state is SendState.DONE and moved.updated_at == 2.0
    assert [t.name for t in jobs.sends()] == [ticket["name"]]


def test_a_worker_loop_ended_by_an_error_is_logged_and_started_again() -> None:
    """``run_guarded`` (every worker thread of a node): a loop ended by the state database out of
    reach is logged ``worker.storage_error``, one ended by an unexpected error ``worker.crashed``
    with its traceback; each time the loop starts again, and the guard returns once the loop does."""
    raised: list[BaseException] = [DatabaseUnavailable("database x unavailable"), RuntimeError("a bug")]
    runs: list[int] = []

    def loop() -> None:
        runs.append(1)
        if raised:
            raise raised.pop(0)

    with capture_logs() as logs:
        run_guarded("loader", loop, threading.Event(), backoff_s=0.0)
    assert len(runs) == 3
    assert [(e["event"], e["worker"], e["log_level"]) for e in logs] == [
        ("worker.storage_error", "loader", "error"), ("worker.crashed", "loader", "error")]
    assert logs[1].get("exc_info"), "the traceback of the crash is not logged"
