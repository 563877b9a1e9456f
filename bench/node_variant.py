"""Run ``reader serve`` with parts of the receive path switched off, to measure what each costs.

Benchmark use only, never a deployment: ``--no-fsync`` makes stores non-durable.

    python bench/node_variant.py [--no-fsync] [--no-tune] serve ARGS...

- ``--no-fsync``: ``os.fsync`` becomes a no-op in this process (the spool's per-instance fsync of
  the file and of its folder; the files are still written and renamed);
- ``--no-tune``: the accepted associations keep pynetdicom's stock receive loop
  (``reader.receiver.tune_association`` is not applied).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _no_fsync(fd: object) -> None:
    """Stand-in for os.fsync: does nothing."""


def _no_tune(assoc: object) -> None:
    """Stand-in for reader.receiver.tune_association: leaves the association alone."""


def main() -> None:
    """Apply the switches, then hand the remaining arguments to ``reader.cli``."""
    args = sys.argv[1:]
    if "--no-fsync" in args:
        args.remove("--no-fsync")
        os.fsync = _no_fsync
    if "--no-tune" in args:
        args.remove("--no-tune")
        import reader.scp  # noqa: PLC0415 - patched before the node starts

        setattr(reader.scp, "tune_association", _no_tune)  # noqa: B010 - not exported, on purpose
    from reader import cli  # noqa: PLC0415 - after the switches

    sys.argv = [sys.argv[0], *args]
    raise SystemExit(cli.main())


if __name__ == "__main__":
    main()
