"""A requestor association keeps each DIMSE response for the ``send_*`` call waiting on it.

pynetdicom's association reactor, waking late from one ``send_*`` while the next is already under
way, takes the next response off the queue (``reader.requestor``). The test makes that late wake
certain instead of rare: the reactor's wake is delayed 0.15 s and the caller's wait for its
response 0.4 s, so the reactor looks at the queue while the C-ECHO response sits in it. The peer is
a real ``reader serve``; nothing of the network is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from reader import dimse
from reader.requestor import keep_responses_for_caller
from tests.dicom_factory import ct_series
from tests.node_process import ReaderNode
from tests.reliability import serve_config, write_fixture_model

REACTOR_LATE_S = 0.15  # the reactor wakes this long after a send_* resumes it ...
CALLER_LATE_S = 0.4  # ... and the caller starts waiting for its response this long after sending


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReaderNode]:
    """One ``reader serve`` (results kept) to answer C-STORE and C-ECHO."""
    workdir = tmp_path_factory.mktemp("requestor-node")
    served = ReaderNode(workdir / "node", config_text=serve_config(write_fixture_model(workdir / "model")))
    yield served
    assert served.stop() == 0, served.log_tail()


def test_late_reactor_leaves_the_response_to_the_caller(node: ReaderNode) -> None:
    """With keep_responses_for_caller, a C-ECHO sent while the reactor still wakes from the C-STORE
    before it gets its Success, although the reactor looks at the DIMSE queue while the response is
    in it (without it, pynetdicom hands that response to the reactor and the caller times out)."""
    ae = AE(ae_title="REQUESTOR")
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = 5
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    keep_responses_for_caller(assoc)

    checkpoint = assoc._reactor_checkpoint
    real_wait = checkpoint.wait

    def late_wait(timeout: float | None = None) -> bool:
        woken = real_wait(timeout)
        time.sleep(REACTOR_LATE_S)
        return woken

    checkpoint.wait = late_wait  # type: ignore[method-assign]
    dimse_provider = assoc.dimse
    real_send, guarded_get = dimse_provider.send_msg, dimse_provider.get_msg

    def late_send(primitive: Any, context_id: int) -> None:
        real_send(primitive, context_id)
        time.sleep(CALLER_LATE_S)

    polls_with_response = threading.Event()

    def watched_get(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc and dimse_provider.msg_queue.qsize():
            polls_with_response.set()
        return guarded_get(block)

    dimse_provider.send_msg = late_send  # type: ignore[method-assign]
    dimse_provider.get_msg = watched_get  # type: ignore[method-assign]
    try:
        stored = assoc.send_c_store(ct_series(1, rows=4, columns=4)[0])
        assert stored.Status == dimse.SUCCESS
        echoed = assoc.send_c_echo()
        assert "Status" in echoed, "the C-ECHO response was lost: the caller timed out"
        assert echoed.Status == dimse.SUCCESS
        assert polls_with_response.is_set(), "the reactor never looked at the queue with a response in it"
    finally:
        if assoc.is_established:
            assoc.release()
