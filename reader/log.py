"""structlog set-up: one JSON event per line, without patient identity.

Events are names (``series.complete``) with fields. :func:`drop_phi` removes any field whose key
names patient identity (PS3.3 C.7.1.1 Patient Module: Patient's Name, Patient ID, Birth Date) so a
careless ``log.info(..., patient_name=...)`` can never reach the log.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["PHI_KEYS", "configure_logging", "drop_phi"]

PHI_KEYS = frozenset({
    "patient_name", "patientname", "patient_id", "patientid", "patient_birth_date",
    "patientbirthdate", "birth_date", "other_patient_ids", "patient_address",
})


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: delete fields that would carry patient identity."""
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        del event_dict[key]
    return event_dict


def _warning_event(  # noqa: PLR0917 - the signature of warnings.showwarning
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None,
) -> None:
    """Library warnings (pydicom, highdicom) quote header values, a patient name among them:
    log only the warning's category and origin, never its text."""
    structlog.get_logger("warnings").info("library.warning", category=category.__name__,
                                          module=Path(filename).stem, line=lineno)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process: JSON lines with ISO timestamps on ``stream``, and
    Python warnings turned into PHI-free ``library.warning`` events."""
    warnings.showwarning = _warning_event
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_phi,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
