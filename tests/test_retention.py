"""Retention: what the node deletes, when, and what it never deletes (``reader.retention``).

The rules are proved first on a data dir built through the real spool and job store, with a clock
and a free-space reading the test controls (ages of days pass in a test; disk pressure without
filling a disk), then on a real ``reader serve`` process that receives with DCMTK storescu and
delivers to a real Orthanc, with ``[retention]`` times of a fraction of a second, and through
``reader purge`` as an administrator runs it. The SIGKILL moments inside a sweep and a purge are
in ``tests/test_crash.py``.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reader.config import RetentionConfig, load_config
from reader.dispatch import Dispatcher
from reader.errors import ConfigError
from reader.holds import StudyHold
from reader.jobs import JobStore, ProcessJob, SendState, SendTicket, SeriesStatus
from reader.pipeline import STUDY_READ_FROM
from reader.retention import Retention
from reader.send import StoreSCU
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import Orthanc, free_port, require_tool, wait_until
from tests.reliability import (
    log_events,
    pacs_results,
    reader_purge,
    refused_port,
    retention_config,
    store_responses,
    write_fixture_model,
    write_study,
)

KEEP_ALL = RetentionConfig(instances=None, results=None, history=None, disk_margin_bytes=0)
PACS = "PACS@127.0.0.1:104"
DEADLINE_S = 120.0


class DataDir:
    """A spool and job store with series built through their real methods."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.spool = Spool(root, min_free_bytes=min_free_bytes)
        self.jobs = JobStore(self.spool)

    def received(self, study: str, series: str, n: int = 10, size: int = 1000) -> ProcessJob:
        """``n`` instances of ``size`` bytes stored and the series queued."""
        sops = tuple(f"{series}.{i}" for i in range(1, n + 1))
        for sop in sops:
            self.spool.store_instance(study, series, sop, b"i" * size)
        job = self.jobs.enqueue_if_changed(study, series, sops)
        assert job is not None
        return job

    def processed(self, job: ProcessJob, send: SendState | None = SendState.DONE) -> SendTicket | None:
        """The job done with a 1000-byte result and, unless ``send`` is None, a ticket in that state."""
        path = self.spool.write_result(job.series_uid, job.version, "sr", b"r" * 1000)
        ticket = None
        if send is not None:
            ticket = self.jobs.add_send(job.series_uid, job.version, PACS, [path])
        self.jobs.finish_job(job, SeriesStatus.DONE)
        if ticket is not None and send is not SendState.PENDING:
            ticket = replace(ticket, state=send)
            self.jobs.update_send(ticket)
        return ticket

    def used(self) -> int:
        """Bytes of instances and results on disk."""
        return sum(p.stat().st_size for sub in ("incoming", "results")
                   for p in (self.spool.root / sub).rglob("*") if p.is_file())

    def has_instances(self, study: str, series: str) -> bool:
        return bool(self.spool.series_instances(study, series))

    def has_results(self, series: str) -> bool:
        return (self.spool.root / "results" / series).exists()


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    """A data dir holding seven series in every situation retention must tell apart:

    1.1 delivered; 1.2 delivered later; 1.3 a send still pending; 1.4 queued; study 1.5: 1.5.1 queued
    (the series its study is read from) and 1.5.2 skipped for it (needed again if 1.5.1 is
    rejected); 1.6 skipped (no route); 1.7 its send parked; 1.8 delivered, and held again by a
    backfill (``reader.holds``) waiting for its instances.
    """
    d = DataDir(tmp_path / "data")
    d.processed(d.received("1.1", "1.1.1"))
    d.processed(d.received("1.2", "1.2.1"))
    d.processed(d.received("1.3", "1.3.1"), send=SendState.PENDING)
    d.received("1.4", "1.4.1")
    d.received("1.5", "1.5.1")
    passed_over = d.received("1.5", "1.5.2")
    d.jobs.finish_job(passed_over, SeriesStatus.SKIPPED, STUDY_READ_FROM + "series 1.5.1 (number 2)")
    d.jobs.finish_job(d.received("1.6", "1.6.1"), SeriesStatus.SKIPPED, "no route matched")
    d.processed(d.received("1.7", "1.7.1"), send=SendState.FAILED)
    d.processed(d.received("1.8", "1.8.1"))
    StudyHold("1.8", {"1.8.1": ("1.8.1.11",)}, expires_at=time.time() + 86400 * 10).write(d.spool)
    d.jobs.study_result_version("1.1-0000abcd", "1.1.1", tuple(f"1.1.1.{i}" for i in range(1, 11)), 1)
    return d


NEEDED = [("1.3", "1.3.1"), ("1.4", "1.4.1"), ("1.5", "1.5.1"), ("1.5", "1.5.2"), ("1.8", "1.8.1")]


def test_age_rules_delete_settled_data_and_never_what_is_needed(data: DataDir) -> None:
    """Instances go ``instances`` after their series settled (delivered, parked, skipped), results
    ``results`` after their sends settled, state ``history`` after its last change once its files
    are gone; instances of a series with a pending send, a queued series and a study with a queued
    job (the series it passed over included) or held by a backfill, and results with a pending
    send, all stay."""
    offset = [0.0]
    now = time.time()
    retention = Retention(data.spool, data.jobs, RetentionConfig(
        instances=timedelta(hours=1), results=timedelta(days=2), history=timedelta(days=3),
        disk_margin_bytes=0), clock=lambda: now + offset[0])
    assert retention.sweep().series == 0
    assert all(data.has_instances(*s) for s in [("1.1", "1.1.1"), *NEEDED])

    offset[0] = 2 * 3600
    counts = retention.sweep()
    assert (counts.series, counts.instances, counts.results, counts.history) == (4, 40, 0, 0)
    for study, series in [("1.1", "1.1.1"), ("1.2", "1.2.1"), ("1.6", "1.6.1"), ("1.7", "1.7.1")]:
        assert not data.has_instances(study, series)
        assert not (data.spool.root / "incoming" / study).exists(), "empty study folder left"
    assert all(data.has_instances(*s) for s in NEEDED)
    assert all(data.has_results(s) for s in ("1.1.1", "1.2.1", "1.3.1", "1.7.1"))

    offset[0] = 2 * 86400 + 3600
    assert retention.sweep().results == 3
    kept = [s for s in ("1.1.1", "1.2.1", "1.3.1", "1.7.1", "1.8.1") if data.has_results(s)]
    assert kept == ["1.3.1", "1.8.1"]

    offset[0] = 3 * 86400 + 7200
    assert retention.sweep().history == 4
    left = set(data.jobs.series_states())
    assert left == {"1.3.1", "1.4.1", "1.5.1", "1.5.2", "1.8.1"}
    assert {t.series_uid for t in data.jobs.sends()} == {"1.3.1", "1.8.1"}
    assert data.jobs.lineages() == {}, "the lineage of a study whose series are gone stays"
    assert all(data.has_instances(*s) for s in NEEDED)
    assert data.spool.list_state("purging") == []


def test_disk_pressure_deletes_the_longest_settled_first_and_nothing_needed(data: DataDir) -> None:
    """Below the watermark plus the margin, deletable data goes oldest settled first, whatever its
    age, and only until free space is back; when not enough can go, everything needed stays and
    the node says so (``retention.pressure_unrelieved``)."""
    budget = 115_000

    def retention(line: int) -> Retention:
        d = DataDir(data.spool.root, min_free_bytes=line)
        return Retention(d.spool, d.jobs, KEEP_ALL, free_bytes=lambda: budget - data.used())

    assert data.used() == 95_000  # nine series of 10,000 bytes and five results of 1,000
    counts = retention(24_000).sweep()  # 20,000 free: at least 4,000 must go
    assert counts.pressure >= 1
    assert not data.has_instances("1.1", "1.1.1"), "the longest-settled instances did not go first"
    assert data.has_instances("1.2", "1.2.1"), "more than needed was deleted"
    assert all(data.has_instances(*s) for s in NEEDED)

    with capture_logs() as logs:  # 90,000 free cannot be reached without deleting what is needed
        retention(90_000).sweep()
    assert any(e["event"] == "retention.pressure_unrelieved" for e in logs)
    assert all(data.has_instances(*s) for s in NEEDED)
    assert data.has_results("1.3.1"), "a result with a pending send was deleted"
    assert data.used() == 5 * 10_000 + 2000  # the five needed series, the pending and the held result


def test_parked_send_whose_results_are_gone_parks_again_with_the_reason(data: DataDir) -> None:
    """``reader retry`` of a parked send whose result files retention deleted parks it again,
    saying so, without trying the destination."""
    Retention(data.spool, data.jobs, replace(KEEP_ALL, results=timedelta(seconds=1)),
              clock=lambda: time.time() + 10).sweep()
    (requeued,) = data.jobs.requeue_failed()
    attempted: list[Sequence[Path]] = []

    class Recording:
        def deliver(self, files: Sequence[Path]) -> dict[str, Any]:
            attempted.append(files)
            return {}

    dispatcher = Dispatcher(data.jobs, load_config(None).sending, {PACS: Recording()}, StoreSCU("TEST"))
    after = dispatcher.attempt(requeued)
    assert after.state is SendState.FAILED and "no longer stored" in after.last_error
    assert attempted == []


def test_retention_config_is_typed_with_hospital_defaults(tmp_path: Path) -> None:
    """``[retention]`` defaults to 24 h / 30 days / 90 days, takes fractions, reads 0 as keep for
    ever, and refuses a wrong type or unknown key naming it."""
    assert load_config(None).retention == RetentionConfig(
        instances=timedelta(hours=24), results=timedelta(days=30), history=timedelta(days=90))
    path = tmp_path / "r.toml"
    path.write_text("[retention]\ninstances_hours = 0.5\nresults_days = 0\nhistory_days = 7\n"
                    "disk_margin_mb = 10\nsweep_minutes = 0.5\n", encoding="utf-8")
    config = load_config(path).retention
    assert (config.instances, config.results) == (timedelta(minutes=30), None)
    assert config.history == timedelta(days=7)
    assert (config.disk_margin_bytes, config.sweep_interval) == (10 * 2**20, timedelta(seconds=30))
    for bad, key in (('instances_hours = "24"', "retention.instances_hours"),
                     ("history_days = -1", "retention.history_days"),
                     ("sweep_minutes = 0", "retention.sweep_minutes"),
                     ("keep = true", "retention.keep")):
        path.write_text(f"[retention]\n{bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.key == key


# --- a real node -----------------------------------------------------------------------------

def study_deleted_audits(data_dir: Path, study_uid: str) -> list[bytes]:
    """The A.5.3.6 DICOM Study Deleted messages (EventID 110105) about ``study_uid`` in the
    node's local audit file."""
    audit = data_dir / "audit" / "audit.log"
    lines = audit.read_bytes().splitlines() if audit.is_file() else []
    return [line for line in lines if b'csd-code="110105"' in line and study_uid.encode() in line]


@pytest.fixture
def down() -> Iterator[str]:
    """A DICOM destination that refuses every association (its sends stay pending)."""
    with refused_port() as port:
        yield f"DOWN@127.0.0.1:{port}"


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Path]:
    """The fast fixture model package."""
    require_tool("storescu")
    yield write_fixture_model(tmp_path / "model")


def test_node_deletes_delivered_instances_and_keeps_those_owed(tmp_path: Path, orthanc: Orthanc,
                                                              model: Path, down: str) -> None:
    """A running node deletes a study's instances once its results reached the PACS and
    ``instances_hours`` passed, keeps its results, logs ``retention.swept`` and audits the deletion
    (DICOM Study Deleted, naming the patient); a study whose
    results wait for a destination that is down keeps its instances and results across sweeps."""
    data_dir, port = tmp_path / "data", free_port()
    pacs = f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"
    config = retention_config(model, instances_hours=0.0003)  # about one second
    node = ReaderNode(tmp_path / "run-1", config_text=config, data_dir=data_dir, port=port,
                      destinations=[pacs])
    delivered = write_study(tmp_path / "A", 20)
    try:
        assert store_responses(node.host, node.port, node.ae_title, delivered.files) == ["Success"] * 20
        incoming = data_dir / "incoming" / delivered.study_uid
        wait_until(lambda: not incoming.exists(), DEADLINE_S, "delivered instances deleted")
        assert len(pacs_results(orthanc, delivered.study_uid, delivered.series_uid)) == 2
        assert (data_dir / "results" / delivered.series_uid / "v1" / "sr.dcm").is_file()
        swept = [e for e in node.events("retention.swept") if e["series"] == 1]
        assert swept and swept[0]["instances"] == 20
        wait_until(lambda: len(study_deleted_audits(data_dir, delivered.study_uid)) == 1, 30,
                   "the deletion audited (DICOM Study Deleted)")
        assert b"Synthetic^Phantom" in study_deleted_audits(data_dir, delivered.study_uid)[0]
    finally:
        assert node.stop() == 0, node.log_tail()

    node = ReaderNode(tmp_path / "run-2", config_text=config, data_dir=data_dir, port=port,
                      destinations=[pacs, down])
    owed = write_study(tmp_path / "B", 20)
    try:
        assert store_responses(node.host, node.port, node.ae_title, owed.files) == ["Success"] * 20
        wait_until(lambda: len(node.events("result.sent")) >= 1, DEADLINE_S, "B delivered to the PACS")
        sweeps = len(node.events("retention.swept"))
        wait_until(lambda: len(node.events("retention.swept")) >= sweeps + 5, DEADLINE_S, "five more sweeps")
        jobs = JobStore(Spool(data_dir))
        assert any(t.state is SendState.PENDING for t in jobs.sends() if t.series_uid == owed.series_uid)
        assert len(list((data_dir / "incoming" / owed.study_uid / owed.series_uid).iterdir())) == 20
        assert (data_dir / "results" / owed.series_uid / "v1" / "sr.dcm").is_file()
    finally:
        assert node.stop() == 0, node.log_tail()


def test_reader_purge_removes_a_study_everywhere(tmp_path: Path, model: Path, down: str) -> None:
    """``reader purge --study``: refuses (exit 2, one line) a study whose sends are pending while
    the node runs, and, with the node stopped, without ``--force``; with it, cancels the pending
    sends (named in ``study.purged``) and leaves nothing of the study: no instance, result, ticket,
    lineage or series state, and a restarted node sends nothing; the purge is audited as DICOM
    Study Deleted by the account that ran it, naming the patient. A bad UID exits 2."""
    data_dir, port = tmp_path / "data", free_port()
    node = ReaderNode(tmp_path / "run-1", config_text=retention_config(model, instances_hours=0),
                      data_dir=data_dir, port=port, destinations=[down])
    study = write_study(tmp_path / "S", 20)
    kept = write_study(tmp_path / "K", 20)
    try:
        for s in (study, kept):
            assert store_responses(node.host, node.port, node.ae_title, s.files) == ["Success"] * 20
        wait_until(lambda: len(node.events("series.processed")) == 2, DEADLINE_S, "both studies processed")
        refused = reader_purge(data_dir, study.study_uid)
        assert refused.returncode == 2 and "node is running" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    finally:
        assert node.stop() == 0, node.log_tail()
    bad = reader_purge(data_dir, "1.2.x")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    unforced = reader_purge(data_dir, study.study_uid)
    assert unforced.returncode == 2 and "--force" in unforced.stderr

    done = reader_purge(data_dir, study.study_uid, "--force")
    assert done.returncode == 0, done.stderr
    (purged,) = log_events(done.stderr, "study.purged")
    assert purged["cancelled_sends"] == 1 and purged["instances"] == 20 and purged["results"] == 1
    assert purged["cancelled_destinations"] == [down]
    (audited,) = study_deleted_audits(data_dir, study.study_uid)
    assert f'UserID="{getpass.getuser()}"'.encode() in audited and b"SYNTH-0001" in audited
    leftovers = [p for p in data_dir.rglob("*") if study.study_uid in p.name or study.series_uid in p.name]
    assert leftovers == []
    assert study.series_uid not in json.dumps([vars(t) for t in JobStore(Spool(data_dir)).sends()])
    assert (data_dir / "incoming" / kept.study_uid / kept.series_uid).is_dir(), "another study was touched"

    node = ReaderNode(tmp_path / "run-2", config_text=retention_config(model, instances_hours=0),
                      data_dir=data_dir, port=port, destinations=[down])
    try:
        wait_until(lambda: len(node.events("retention.swept")) >= 2, DEADLINE_S, "two sweeps")
        attempts = {e.get("series_uid") for e in node.events() if str(e.get("event", "")).startswith("send.")}
        assert study.series_uid not in attempts
        assert node.events("series.complete") == []
    finally:
        assert node.stop() == 0, node.log_tail()
