"""Receive-path tuning for the associations the node accepts (PS3.8 upper layer, pynetdicom 3).

pynetdicom's acceptor runs two polling loops per association: the DUL reactor sleeps 1 ms whenever
a loop found nothing to do, and the association reactor sleeps 1 ms before every look at the DIMSE
message queue. A C-STORE sender waits for each response before sending the next instance, so these
sleeps sit on the critical path of every image, several times (once per PDU that is not yet in the
socket buffer, once before the handler, once before the response goes out). It also reads the
socket in 4 KiB ``recv`` calls.

:func:`tune_association`, called when the transport opens (before the association's threads
start), changes three things on that one association and nothing process-global:

- the DUL reactor no longer sleeps; instead its readiness check waits in ``select`` for data:
  up to 0.2 ms while the association is busy (so a queued response leaves within 0.2 ms), up to
  20 ms once it has been quiet for 50 ms (an idle association costs ~50 wake-ups a second);
- the association reactor waits on its DIMSE queue (up to 5 ms) instead of polling it, so a
  decoded C-STORE request reaches the handler at once;
- PDUs are read with ``recv_into`` into one buffer of the PDU's length, and TCP_NODELAY is set so
  small responses are not held back by Nagle's algorithm.

Measured effect and method: ``bench/README.md``.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket

__all__ = ["tune_association"]

_BUSY_WAIT_S = 0.0002  # select timeout while the association is active
_IDLE_WAIT_S = 0.02  # ... and once it has been quiet for _QUIET_AFTER_S
_QUIET_AFTER_S = 0.05
_MSG_WAIT_S = 0.005  # how long the association reactor waits for a DIMSE message per loop


class _TunedSocket(AssociationSocket):
    """An AssociationSocket whose readiness check waits briefly in ``select`` and whose reads fill
    one buffer per PDU. Instances get this class by :func:`tune_association` only."""

    _active_at: float = 0.0

    @property
    def ready(self) -> bool:
        """True when data can be read; waits up to 0.2 ms (busy) or 20 ms (quiet) for it."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        now = time.monotonic()
        wait = _BUSY_WAIT_S if now - self._active_at < _QUIET_AFTER_S else _IDLE_WAIT_S
        try:
            readable, _, _ = select.select([sock], [], [], wait)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom does: transport connection closed
            return False
        if readable:
            self._active_at = now
        return bool(readable)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer when the peer closes), straight into one buffer."""
        sock = self.socket
        assert sock is not None  # the DUL only reads a socket it was given
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if n == 0:
                    break
                got += n
        if got < nr_bytes:
            del buffer[got:]
        return buffer


def _waiting_get_msg(dimse: DIMSEServiceProvider, block: bool = False) -> Any:
    """DIMSEServiceProvider.get_msg that waits a little when asked not to block (see module doc)."""
    try:
        return dimse.msg_queue.get(timeout=dimse.dimse_timeout if block else _MSG_WAIT_S)
    except queue.Empty:
        return None, None


def tune_association(assoc: Association) -> None:
    """Apply the receive-path tuning to one accepted association (call at EVT_CONN_OPEN)."""
    transport = assoc.dul.socket
    if transport is None or transport.socket is None or type(transport) is not AssociationSocket:
        return
    transport.__class__ = _TunedSocket
    raw = transport.socket
    if raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assoc.dul._run_loop_delay = 0.0  # the select in _TunedSocket.ready paces the loop instead
    dimse = assoc.dimse

    def get_msg(block: bool = False) -> Any:
        return _waiting_get_msg(dimse, block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]
