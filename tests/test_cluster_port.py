"""Several receivers on one DICOM port (``[cluster] reuse_port``, SO_REUSEPORT; README "Cluster")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from reader.assemble import CompletionTracker
from reader.associations import AssociationLog
from reader.config import ClusterConfig, NodeConfig
from reader.errors import ConfigError
from reader.scp import StorageSCP
from reader.spool import Spool
from tests.peers import LOCALHOST, echoscu, free_port, require_tool

ATTEMPTS = 40  # both listeners get one of 40 connections but with probability 1 - 2**-39
ECHO_TIMEOUT_S = 30.0


def _scp(tmp_path: Path, name: str, port: int, *, reuse_port: bool) -> StorageSCP:
    config = NodeConfig(ae_title="SECONDREADER", bind_address=LOCALHOST, port=port,
                        data_dir=tmp_path / name, cluster=ClusterConfig(reuse_port=reuse_port))
    return StorageSCP(config, Spool(config.data_dir), CompletionTracker(config.completion), AssociationLog())


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_two_listeners_share_a_port_with_reuse_port(tmp_path: Path, stack: ExitStack) -> None:
    """With ``reuse_port = true`` two listeners bind the same port and the kernel spreads the
    associations between them: over at most 40 C-ECHOs from DCMTK echoscu, each accepts some,
    and every echo succeeds."""
    require_tool("echoscu")
    port = free_port()
    scps = [_scp(tmp_path, name, port, reuse_port=True) for name in ("a", "b")]
    for scp in scps:
        scp.start()
        stack.callback(scp.stop)
    assert [scp.port for scp in scps] == [port, port]
    echoes, counts = 0, [0, 0]
    while echoes < ATTEMPTS and not all(counts):
        done = echoscu(LOCALHOST, port, "SECONDREADER", timeout_s=ECHO_TIMEOUT_S)
        assert done.returncode == 0, done.stdout + done.stderr
        echoes += 1
        counts = [len(scp.associations.recent()) for scp in scps]
    assert all(counts), f"after {echoes} echoes the listeners accepted {counts}"
    assert sum(counts) == echoes


def test_without_reuse_port_a_second_listener_is_a_config_error(tmp_path: Path, stack: ExitStack) -> None:
    """Without ``reuse_port`` (the default) a second listener on a port in use fails at start with a
    ConfigError naming ``node.port`` and the address and pointing to ``[cluster] reuse_port``; a
    listener with ``reuse_port`` beside one without fails too (SO_REUSEPORT must be on both sockets),
    with a ConfigError naming ``node.port`` and the address (no hint: its own reuse_port is on).
    The first keeps serving."""
    require_tool("echoscu")
    port = free_port()
    first = _scp(tmp_path, "a", port, reuse_port=False)
    first.start()
    stack.callback(first.stop)
    for reuse in (False, True):
        second = _scp(tmp_path, "b", port, reuse_port=reuse)
        with pytest.raises(ConfigError) as refused:
            second.start()
        assert refused.value.key == "node.port"
        assert f"{LOCALHOST}:{port}" in refused.value.problem
        assert "reuse_port" in refused.value.problem or reuse
        assert not second.listening
    done = echoscu(LOCALHOST, port, "SECONDREADER", timeout_s=ECHO_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(first.associations.recent()) == 1
