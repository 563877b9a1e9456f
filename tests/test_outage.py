"""PACS outage: the destination goes down mid-run and comes back; results wait and then arrive.

A real ``reader serve`` sends to a real Orthanc. Orthanc is stopped after the first study's
results reached it; the second study is processed while it is down, its send is retried with
backoff (``reader.dispatch``) and shows as pending in ``reader status``; Orthanc is started again on
the same DICOM port and storage, and the second study's results arrive without any operator action.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from reader.config import SendingConfig
from reader.dispatch import Dispatcher
from reader.jobs import JobStore, SendState
from reader.send import StoreSCU
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import Orthanc, free_port, require_tool, storescu, wait_until
from tests.reliability import pacs_results, serve_config, write_fixture_model, write_study

DEADLINE_S = 120.0
RETRIES_WHILE_DOWN = 3


def _has_current(orthanc: Orthanc, study_uid: str, series_uid: str, node: ReaderNode) -> bool:
    if node.process.poll() is not None:
        raise AssertionError(f"reader serve died:\n{node.log_tail()}")
    kinds = {(r.modality, r.version) for r in pacs_results(orthanc, study_uid, series_uid)}
    return {("SR", 1), ("SEG", 1)} <= kinds


def _status(data_dir: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "reader.cli", "status", "--json", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, check=True, timeout=60)
    report: dict[str, object] = json.loads(done.stdout)
    return report


@pytest.mark.integration
def test_results_made_during_a_pacs_outage_arrive_after_it_returns(tmp_path: Path) -> None:
    """With the PACS down, a study's SR and SEG are retried with backoff and kept pending (not
    parked), and they reach the PACS once it is back on the same port, next to the earlier study's."""
    require_tool("storescu")
    pacs_port = free_port()
    orthanc = Orthanc.start(tmp_path / "pacs", extra_config={"DicomPort": pacs_port})
    model = write_fixture_model(tmp_path / "model")
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model, retry_initial_seconds=0.3,
                                                                    retry_max_seconds=2.0),
                        destinations=[f"{orthanc.aet}@127.0.0.1:{pacs_port}"])
    try:
        first = write_study(tmp_path / "first")
        assert storescu(node.host, node.port, node.ae_title, list(first.files)).returncode == 0
        wait_until(lambda: _has_current(orthanc, first.study_uid, first.series_uid, node), DEADLINE_S,
                   "the first study's results before the outage")

        orthanc.stop()
        second = write_study(tmp_path / "second")
        assert storescu(node.host, node.port, node.ae_title, list(second.files)).returncode == 0
        wait_until(lambda: len([e for e in node.events("send.retry_scheduled")
                                if e.get("series_uid") == second.series_uid]) >= RETRIES_WHILE_DOWN,
                   DEADLINE_S, f"{RETRIES_WHILE_DOWN} retries while the PACS is down")
        status = _status(node.data_dir)
        assert status["sends"] == {"done": 1, "pending": 1}, status
        assert not status["failed_sends"]
        delays = [float(e["in_seconds"]) for e in node.events("send.retry_scheduled")]
        assert all(0.0 < d <= 2.0 for d in delays), delays

        orthanc = Orthanc.start(tmp_path / "pacs", extra_config={"DicomPort": pacs_port})
        wait_until(lambda: _has_current(orthanc, second.study_uid, second.series_uid, node), DEADLINE_S,
                   "the second study's results after the PACS returned")
        assert _has_current(orthanc, first.study_uid, first.series_uid, node), "the PACS lost a study"
        wait_until(lambda: _status(node.data_dir)["sends"] == {"done": 2}, DEADLINE_S,
                   "both send tickets done")
    finally:
        assert node.stop() == 0, node.log_tail()
        orthanc.kill()


def test_superseded_ticket_is_not_resent_by_a_stale_attempt(tmp_path: Path) -> None:
    """A send ticket superseded by a newer result version after the dispatcher listed it is neither
    attempted nor put back in the queue by that stale copy, so the old version cannot follow the new."""
    jobs = JobStore(Spool(tmp_path / "data"))
    destination = f"PACS@127.0.0.1:{free_port()}"
    stale = jobs.add_send("1.2.3", 1, destination, [tmp_path / "sr.dcm"])
    jobs.add_send("1.2.3", 2, destination, [tmp_path / "sr2.dcm"])
    dispatcher = Dispatcher(jobs, SendingConfig(), {}, StoreSCU("SECONDREADER"))
    assert dispatcher.attempt(stale).state is SendState.SUPERSEDED
    jobs.update_send(replace(stale, attempts=1, next_attempt_at=time.time(), last_error="timeout"))
    again = jobs.send(stale.name)
    assert again is not None and again.state is SendState.SUPERSEDED
