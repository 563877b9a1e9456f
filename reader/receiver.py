"""Receive-path tuning for the associations the node accepts (PS3.8 upper layer, pynetdicom 3).

pynetdicom's acceptor runs two polling loops per association: the DUL reactor sleeps 1 ms whenever
a loop found nothing to do, and the association reactor sleeps 1 ms before every look at the DIMSE
message queue. A C-STORE sender waits for each response before sending the next instance, so these
sleeps sit on the critical path of every image, several times (once per PDU not yet in the socket
buffer, once before the handler, once before the response goes out). It also reads the socket in
4 KiB ``recv`` calls.

:func:`tune_association`, called when the transport opens (before the association's threads
start), changes these on that one association and nothing process-global:

- the DUL reactor no longer sleeps or polls: it waits in ``select`` on the peer's socket and on a
  wake-up socket pair, which is signalled whenever a primitive is queued for it to send (a C-STORE
  response, A-RELEASE-RP...) or it is told to stop; the ``select`` times out every 20 ms so its
  timers (ARTIM, idle) are still checked;
- the association reactor waits on its DIMSE queue (up to 5 ms) instead of polling it, so a
  decoded C-STORE request reaches the handler at once;
- PDUs are read with ``recv_into`` into one buffer of the PDU's length, and TCP_NODELAY is set so
  small responses are not held back by Nagle's algorithm.

Measured effect and method: ``bench/README.md``.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import weakref
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

__all__ = ["tune_association"]

_SELECT_TIMEOUT_S = 0.02  # the DUL reactor's longest wait: its timers are checked this often
_MSG_WAIT_S = 0.005  # how long the association reactor waits for a DIMSE message per loop
_WAKE = b"\x00"


class _TunedSocket(AssociationSocket):
    """An AssociationSocket whose readiness check sleeps in ``select`` until the peer sends or the
    DUL is woken, and whose reads fill one buffer per PDU. Instances get this class by
    :func:`tune_association` only, which also sets ``_wake``."""

    _wake: socket.socket | None = None
    _wake_signal: socket.socket | None = None

    @property
    def ready(self) -> bool:
        """True when the peer's data can be read; otherwise waits for data, a wake-up or 20 ms."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        wake = self._wake
        watched: list[Any] = [sock] if wake is None else [sock, wake]
        try:
            readable, _, _ = select.select(watched, [], [], _SELECT_TIMEOUT_S)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom does: transport connection closed
            return False
        if wake is not None and wake in readable:
            with contextlib.suppress(BlockingIOError):  # drained already: nothing left to read
                wake.recv(4096)
        return sock in readable

    def _shutdown_socket(self) -> None:
        """Shut the connection down (every path that ends it comes here), then close the wake-up
        pair: a later wake-up is ignored, a later ``select`` fails as it would on the closed
        connection (pynetdicom then signals Evt17)."""
        super()._shutdown_socket()
        for end in (self._wake, self._wake_signal):
            if end is not None:
                end.close()

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


def _wake_on_calls(dul: DULServiceProvider, signal: socket.socket) -> None:
    """Make the DUL's ``send_pdu`` and ``kill_dul`` wake its ``select``, and ``stop_dul`` wait for
    the thread instead of spinning (the reactor's loop delay is 0)."""
    send_pdu, kill_dul = dul.send_pdu, dul.kill_dul

    def wake() -> None:
        # BlockingIOError: the buffer is full, a wake-up is pending anyway; other OSError: the pair
        # was closed with the connection and there is no reactor left to wake.
        with contextlib.suppress(OSError):
            signal.send(_WAKE)

    def queued_send_pdu(primitive: Any) -> None:
        send_pdu(primitive)
        wake()

    def waking_kill_dul() -> None:
        kill_dul()
        wake()

    def joining_stop_dul() -> bool:
        if dul.state_machine.current_state != "Sta1":
            return False
        dul._kill_thread = True
        wake()
        if threading.current_thread() is not dul and dul.is_alive():
            dul.join()
        return True

    dul.send_pdu = queued_send_pdu  # type: ignore[method-assign]
    dul.kill_dul = waking_kill_dul  # type: ignore[method-assign]
    dul.stop_dul = joining_stop_dul  # type: ignore[method-assign]


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
    raw = transport.socket
    if raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    receiver, signal = socket.socketpair()  # closed with the connection (_shutdown_socket)
    receiver.setblocking(False)
    signal.setblocking(False)
    _wake_on_calls(assoc.dul, signal)
    transport.__class__ = _TunedSocket
    tuned = cast(_TunedSocket, transport)
    tuned._wake, tuned._wake_signal = receiver, signal
    for end in (receiver, signal):  # in case the connection ends on a path we did not foresee
        weakref.finalize(tuned, end.close)
    assoc.dul._run_loop_delay = 0.0  # the select in _TunedSocket.ready paces the loop instead
    dimse = assoc.dimse

    def get_msg(block: bool = False) -> Any:
        return _waiting_get_msg(dimse, block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]
