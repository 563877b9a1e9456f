"""A cluster process's slot on the shared storage: its name, its lock and its own staging folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reader.spool import Spool


def test_a_second_process_gets_the_next_name_and_a_restart_gets_its_own_back(tmp_path: Path) -> None:
    """While one process holds ``worker``, another asking for it gets ``worker-2``; once the first
    ends (its lock released, as by SIGKILL), asking again gives ``worker`` back, so a restarted
    process finds its own staging folder."""
    spool = Spool(tmp_path)
    first, lock = spool.claim_process("worker")
    second, lock2 = spool.claim_process("worker")
    assert (first, second) == ("worker", "worker-2")
    # another OS process sees the slot taken too (flock is per open file, across processes)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from reader.spool import Spool;"
                               f"print(Spool(Path({str(tmp_path)!r})).claim_process('worker')[0])"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "worker-3"
    lock.close()
    again, lock3 = spool.claim_process("worker")
    assert again == "worker"
    lock2.close()
    lock3.close()


def test_start_up_cleans_only_its_own_staged_files(tmp_path: Path) -> None:
    """``remove_partial_writes`` of process ``a`` deletes what ``a`` staged and leaves the files
    another process (``b``) is writing right now; each process's writes stage in its own folder."""
    a = Spool(tmp_path, process="a")
    b = Spool(tmp_path, process="b")
    (a.tmp / ".w-left").write_bytes(b"partial")
    (b.tmp / ".w-inflight").write_bytes(b"partial")
    assert a.remove_partial_writes() == 1
    assert not (a.tmp / ".w-left").exists()
    assert (b.tmp / ".w-inflight").exists()
    path = a.store_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    assert path.read_bytes() == b"data"
    assert list(a.tmp.iterdir()) == []
    assert a.tmp == tmp_path / "tmp" / "a"


def test_a_running_cluster_process_counts_as_a_running_node(tmp_path: Path) -> None:
    """``reader purge`` asks ``node_running`` before deleting a study in flight: a cluster process
    holding its name on the storage counts, and stops counting once it ends."""
    spool = Spool(tmp_path)
    assert not spool.node_running()
    _, lock = spool.claim_process("receiver")
    assert spool.node_running()
    lock.close()
    assert not spool.node_running()
