"""A real HL7 MLLP listener for tests: records every message it receives and answers an ACK.

Run as a subprocess (``tests/test_hl7.py``)::

    python tests/mllp_listener.py --record DIR [--port 0] [--ack AA|AE|AR|CA|none] [--err-code 207]

It binds 127.0.0.1 (port 0: the OS picks one), prints ``LISTENING <port>`` on stdout once it
accepts connections, then for each MLLP block (python-hl7's ``hl7.mllp`` streams) writes the raw
message to ``DIR/<n>.hl7`` (atomically: temporary file, then rename) and answers an original-mode
ACK with MSA-1 = ``--ack`` (HL7 v2.5.1 2.9.2), plus an ERR segment with ERR-3 = ``--err-code``
(table 0357) when given. ``--ack none`` closes the connection without answering. It runs until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
from pathlib import Path

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type information
import hl7.mllp  # type: ignore[import-untyped]

_ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR", "none")


def _ack(message: str, code: str, err_code: str | None) -> str:
    """The ACK of ``message``: MSH answering its MSH, MSA-1 ``code``, MSA-2 its control ID, ERR-3."""
    parsed = hl7.parse(message)
    ack = str(parsed.create_ack(ack_code=code, message_id="ACK" + str(parsed.segment("MSH")(10))[:17]))
    ack = ack.rstrip("\r")
    if err_code is not None:
        ack += f"\rERR|||{err_code}^^HL70357|E"
    return ack


def _record(folder: Path, number: int, raw: bytes) -> None:
    """Write one received message atomically, so a poller never reads half of it."""
    temporary = folder / f".{number}.tmp"
    temporary.write_bytes(raw)
    os.replace(temporary, folder / f"{number}.hl7")


async def _serve(args: argparse.Namespace) -> None:
    counter = itertools.count(1)
    stop = asyncio.Event()

    async def on_client(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                try:
                    block: bytes = await reader.readblock()
                except asyncio.IncompleteReadError:
                    return  # the peer closed the connection
                _record(args.record, next(counter), block)
                if args.ack == "none":
                    return
                writer.writeblock(_ack(block.decode("utf-8"), args.ack, args.err_code).encode("utf-8"))
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await hl7.mllp.start_hl7_server(on_client, args.host, args.port, encoding="utf-8")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ack", choices=_ACK_CODES, default="AA")
    parser.add_argument("--err-code", default=None)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    args.record.mkdir(parents=True, exist_ok=True)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
