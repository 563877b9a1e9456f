"""Load: eight modalities send a 300-slice 512x512 CT series each, at the same time.

Eight DCMTK ``storescu`` processes, one association each, send to one real ``reader serve``. The
fixture model finds nothing (no SEG to encode), so the test measures the node: receiving,
completion, volume loading and the SR, not a network. Throughput and the node's peak RSS are
printed; the assertions are about correctness (every C-STORE Success, every series processed), not
speed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reader.jobs import JobStore, SeriesStatus
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import require_tool, wait_until
from tests.reliability import (
    Study,
    peak_rss_bytes,
    serve_config,
    store_responses,
    write_fixture_model,
    write_study,
)

pytestmark = pytest.mark.integration

SENDERS = 8
SLICES = 300
DEADLINE_S = 300.0
MIB = 2**20


def test_eight_concurrent_senders_all_stored_and_processed(tmp_path: Path) -> None:
    """Eight simultaneous 300-slice series all get Success for every instance and are all processed
    with an SR; the receive throughput and peak RSS are reported."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model", findings=False)
    studies = [write_study(tmp_path / f"series-{i}", SLICES, rows=512, columns=512) for i in range(SENDERS)]
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model, grace_seconds=1.0,
                                                                    min_free_disk_mb=0))
    jobs = JobStore(Spool(node.data_dir))

    def send(study: Study) -> list[str]:
        return store_responses(node.host, node.port, node.ae_title, study.files)

    def all_done() -> bool:
        if node.process.poll() is not None:
            raise AssertionError(f"reader serve died:\n{node.log_tail()}")
        states = [jobs.series_state(s.series_uid) for s in studies]
        return all(st is not None and st.status is not SeriesStatus.QUEUED for st in states)

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(SENDERS) as pool:
            answers = list(pool.map(send, studies))
        received_s = time.perf_counter() - started
        for study, responses in zip(studies, answers, strict=True):
            assert responses == ["Success"] * SLICES, f"{study.series_uid}: {set(responses)}"
        wait_until(all_done, DEADLINE_S, "all eight series processed")
        processed_s = time.perf_counter() - started
        peak = peak_rss_bytes(node.process.pid)
        for study in studies:
            state = jobs.series_state(study.series_uid)
            assert state is not None and state.status is SeriesStatus.DONE, state
            assert len(state.instances) == SLICES
            assert jobs.spool.result_path(study.series_uid, 1, "sr").is_file()
        images = SENDERS * SLICES
        megabytes = sum(f.stat().st_size for s in studies for f in s.files) / MIB
        print(f"\nload: {SENDERS} senders x {SLICES} slices 512x512: received {images} images "
              f"({megabytes:.0f} MiB) in {received_s:.1f} s = {images / received_s:.0f} img/s, "
              f"{megabytes / received_s:.0f} MiB/s; all processed after {processed_s:.1f} s; "
              f"node peak RSS {peak / MIB:.0f} MiB")
    finally:
        assert node.stop() == 0, node.log_tail()
