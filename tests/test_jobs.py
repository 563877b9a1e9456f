"""Durable tickets and the spool: idempotent enqueueing, superseding, UIDs as safe file names."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from reader.errors import InputRejected
from reader.jobs import JobStore, SendState, SeriesStatus, backoff
from reader.spool import Spool, check_uid


def test_same_instances_are_processed_once(tmp_path: Path) -> None:
    """Re-sending identical instances queues no new processing; a new instance queues version 2."""
    jobs = JobStore(Spool(tmp_path))
    job = jobs.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2"))
    assert job is not None and job.version == 1
    jobs.finish_job(job, SeriesStatus.DONE)
    assert jobs.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.2", "1.2.3.1")) is None
    job2 = jobs.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2", "1.2.3.3"))
    assert job2 is not None and job2.version == 2


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    """A queued job is found again by a new store on the same data dir."""
    JobStore(Spool(tmp_path)).enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1",))
    pending = JobStore(Spool(tmp_path)).pending_jobs()
    assert [(j.series_uid, j.version) for j in pending] == [("1.2.3", 1)]


def test_outdated_job_does_not_overwrite_newer_state(tmp_path: Path) -> None:
    """Finishing version 1 after version 2 was queued keeps version 2 queued."""
    jobs = JobStore(Spool(tmp_path))
    v1 = jobs.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1",))
    v2 = jobs.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2"))
    assert v1 is not None and v2 is not None
    jobs.finish_job(v1, SeriesStatus.DONE)
    assert [j.version for j in jobs.pending_jobs()] == [2]
    state = jobs.series_state("1.2.3")
    assert state is not None and state.version == 2 and state.status is SeriesStatus.QUEUED


def test_new_result_version_supersedes_pending_send(tmp_path: Path) -> None:
    """A pending send of an older result version is superseded by the newer version's ticket."""
    jobs = JobStore(Spool(tmp_path))
    old = jobs.add_send("1.2.3", 1, "PACS@h:1", [tmp_path / "a.dcm"])
    again = jobs.add_send("1.2.3", 1, "PACS@h:1", [tmp_path / "a.dcm"])
    assert again.name == old.name  # idempotent
    jobs.add_send("1.2.3", 2, "PACS@h:1", [tmp_path / "b.dcm"])
    states = {t.version: t.state for t in jobs.sends()}
    assert states == {1: SendState.SUPERSEDED, 2: SendState.PENDING}


def test_retry_requeues_parked_sends(tmp_path: Path) -> None:
    """reader retry puts failed tickets back to pending with attempts reset."""
    jobs = JobStore(Spool(tmp_path))
    t = jobs.add_send("1.2.3", 1, "PACS@h:1", [])
    jobs.update_send(replace(t, state=SendState.FAILED, attempts=20))
    assert [r.name for r in jobs.requeue_failed()] == [t.name]
    fresh = jobs.send(t.name)
    assert fresh is not None and fresh.state is SendState.PENDING and fresh.attempts == 0


def test_backoff_grows_and_is_capped() -> None:
    """Backoff delays grow exponentially with jitter and never exceed the maximum."""
    rng = random.Random(1)
    initial, maximum = timedelta(seconds=1), timedelta(seconds=60)
    delays = [backoff(n, initial, maximum, rng).total_seconds() for n in range(1, 12)]
    assert all(0.5 <= d <= 60 for d in delays)
    assert max(delays[6:]) > 8 * max(delays[:2])


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/../3", "", "1.2.3a", "1" * 65, None, "1..2"])
def test_unsafe_uids_are_rejected(uid: object) -> None:
    """UIDs that are not digits and dots (PS3.5 9.1), or too long, never become file names."""
    with pytest.raises(InputRejected):
        check_uid(uid, "SOP Instance UID")


def test_valid_uid_with_padding_is_accepted() -> None:
    """A UID padded with a trailing NUL (PS3.5 6.2) is accepted without the padding."""
    assert check_uid("1.2.840.10008\0", "uid") == "1.2.840.10008"


def test_atomic_store_leaves_no_partial_files(tmp_path: Path) -> None:
    """A stored instance is complete at its final path and nothing is left in tmp/."""
    spool = Spool(tmp_path)
    path = spool.store_instance("1.2", "1.2.3", "1.2.3.4", b"DICM" * 100)
    assert path.read_bytes() == b"DICM" * 100
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p.name for p in spool.series_instances("1.2", "1.2.3")] == ["1.2.3.4.dcm"]
