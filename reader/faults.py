"""Named crash points for the fault-injection tests (``tests/test_crash.py``).

``crash_point("retention.after_mark")`` kills the process with SIGKILL, exactly there, when the
environment variable ``READER_CRASH_AT`` names that point; otherwise it does nothing. A kill timed
from outside (on a log event) lands somewhere after the event; a step that takes microseconds, such
as deleting one file, needs the process to kill itself to be interrupted at a chosen moment. An
operator never sets the variable.
"""

from __future__ import annotations

import os
import signal

import structlog

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "READER_CRASH_AT"

log = structlog.get_logger(__name__)


def crash_point(name: str) -> None:
    """SIGKILL this process when ``READER_CRASH_AT`` equals ``name`` (tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("fault.injected", point=name)
        os.kill(os.getpid(), signal.SIGKILL)
