"""Associations the node requests as an SCU (PS3.7 DIMSE-C over a PS3.8 association, pynetdicom 3).

pynetdicom runs a reactor thread beside every association. On an association we requested, the
``send_*`` methods (``send_c_store``, ``send_c_echo``, ``send_c_find``, ...) pause that reactor, send
the request and take the response off the DIMSE message queue themselves, then let the reactor run
again. The pause is a handshake on a flag: ``send_*`` clears the reactor's checkpoint and waits for
``_is_paused``. When the reactor thread has not yet woken from the previous ``send_*`` (a loaded
machine: inference on every core), ``_is_paused`` is still true from that earlier pause, the next
``send_*`` goes ahead, and the reactor, waking late, takes the new response off the queue as if it
were a request ("Received unexpected C-ECHO service message"). The caller then waits for the whole
DIMSE timeout and aborts the association, though the peer answered in milliseconds. With three busy
loops on 2 cores this hit 6 of 300 associations that sent a C-STORE and then a C-ECHO.

:func:`keep_responses_for_caller` closes that window on one association: the reactor's look at the
queue (the only non-blocking ``get_msg`` in pynetdicom) finds nothing, so every message stays for
the ``send_*`` call waiting on it. A requestor association serves no requests through its reactor:
we negotiate no SCP role on it, C-GET's C-STORE sub-operations are taken by ``send_c_get`` itself, and
N-EVENT-REPORT requests bypass the queue.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association

__all__ = ["keep_responses_for_caller"]


def keep_responses_for_caller(assoc: Association) -> None:
    """Leave every DIMSE message of ``assoc`` (a requestor association) to the blocking ``get_msg``
    of the ``send_*`` call waiting for it; the association reactor's polls find none (see module
    doc). Call once, after the association is established and before the first ``send_*``."""
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            return None, None
        return blocking_get(block=True)

    dimse.get_msg = get_msg  # type: ignore[method-assign]
