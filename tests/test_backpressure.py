"""Back-pressure and memory: a real ``reader serve`` under a full disk and a 1000-slice series.

- Below ``node.min_free_disk_mb`` free on the data dir's filesystem, C-STORE answers Out of
  Resources (0xA700, PS3.4 Table B.2-1) before the disk fills, and stores succeed again by
  themselves once space returns. The watermark is set a margin below the free space measured at
  the start, and a ballast file (``posix_fallocate``, so it really takes the blocks) of twice that
  margin pushes free space under it: other disk activity on the machine smaller than the margin
  cannot flip the outcome.
- A 1000-slice 512x512 CT series goes through the node; its peak resident memory (``VmHWM``) is
  reported and must stay under a bound far below what keeping every decoded slice twice would need.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reader.jobs import JobStore, SeriesStatus
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import echoscu, missing, require_tool, storescu, wait_until
from tests.reliability import (
    peak_rss_bytes,
    serve_config,
    store_responses,
    write_fixture_model,
    write_study,
)

pytestmark = pytest.mark.integration

MIB = 2**20
MARGIN_MIB = 2048  # tolerated change of free space by other processes during the test
DEADLINE_S = 120.0
BIG_SLICES = 1000
BIG_DEADLINE_S = 300.0
PEAK_RSS_LIMIT_BYTES = 3 * 2**30  # the float32 volume alone is 1 GiB



def _done(data_dir: Path, series_uid: str) -> bool:
    state = JobStore(Spool(data_dir)).series_state(series_uid)
    return state is not None and state.status is SeriesStatus.DONE


def test_low_disk_refuses_with_out_of_resources_and_recovers(tmp_path: Path) -> None:
    """With free disk pushed under the watermark every C-STORE gets 0xA700 and nothing is stored,
    C-ECHO still succeeds, and once the ballast is deleted the same study is stored and processed."""
    require_tool("storescu")
    free_mib = shutil.disk_usage(tmp_path).free // MIB
    if free_mib < 3 * MARGIN_MIB:
        missing(f"needs {3 * MARGIN_MIB} MiB free under {tmp_path}, has {free_mib}")
    model = write_fixture_model(tmp_path / "model")
    watermark_mib = free_mib - MARGIN_MIB
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model, min_free_disk_mb=watermark_mib))
    ballast = tmp_path / "ballast"
    try:
        before = write_study(tmp_path / "before", 4)
        assert store_responses(node.host, node.port, node.ae_title, before.files) == ["Success"] * 4
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, 2 * MARGIN_MIB * MIB)
        finally:
            os.close(fd)
        assert shutil.disk_usage(tmp_path).free // MIB < watermark_mib, "the ballast did not take space"

        refused = write_study(tmp_path / "refused", 20)
        answers = store_responses(node.host, node.port, node.ae_title, refused.files)
        assert answers == ["Refused: OutOfResources"] * len(refused.files), answers  # DCMTK's name of 0xA7xx
        assert len(node.events("instance.refused")) == len(refused.files)
        assert not (node.data_dir / "incoming" / refused.study_uid).exists()
        assert echoscu(node.host, node.port, node.ae_title).returncode == 0

        ballast.unlink()
        answers = store_responses(node.host, node.port, node.ae_title, refused.files)
        assert answers == ["Success"] * len(refused.files), answers
        wait_until(lambda: _done(node.data_dir, refused.series_uid), DEADLINE_S,
                   "the study refused earlier to be processed")
        assert _done(node.data_dir, before.series_uid)
    finally:
        ballast.unlink(missing_ok=True)
        assert node.stop() == 0, node.log_tail()


def test_thousand_slice_series_peak_memory(tmp_path: Path) -> None:
    """A 1000-slice 512x512 CT series is stored, processed and done with the node's peak RSS under
    3 GiB (reported on stdout; the float32 volume alone is 1 GiB)."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model", findings=False)
    study = write_study(tmp_path / "big", BIG_SLICES, rows=512, columns=512)
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model, min_free_disk_mb=0))
    try:
        idle_rss = peak_rss_bytes(node.process.pid)
        sent = storescu(node.host, node.port, node.ae_title, [study.folder], timeout_s=BIG_DEADLINE_S)
        assert sent.returncode == 0, sent.stderr
        # the job is marked done before series.processed is logged: wait for the event as well
        wait_until(lambda: _done(node.data_dir, study.series_uid) and bool(node.events("series.processed")),
                   BIG_DEADLINE_S, "the 1000-slice series to be processed and logged")
        peak = peak_rss_bytes(node.process.pid)
        processed = node.events("series.processed")[-1]
        print(f"\n1000-slice 512x512 CT: node peak RSS {peak / MIB:.0f} MiB (idle {idle_rss / MIB:.0f} MiB), "
              f"volume {processed['seconds_volume']} s, total processing {processed['seconds_total']} s")
        assert peak < PEAK_RSS_LIMIT_BYTES, f"peak RSS {peak / MIB:.0f} MiB"
    finally:
        assert node.stop() == 0, node.log_tail()
