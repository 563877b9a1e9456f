"""structlog set-up: one JSON event per line, without patient identity.

Events are names (``series.complete``) with fields. :func:`drop_phi` removes any field whose key
names patient identity (PS3.3 C.7.1.1 Patient Module: Patient's Name, Patient ID, Birth Date) so a
careless ``log.info(..., patient_name=...)`` can never reach the log. Library warnings become
``library.warning`` events naming their category, the attribute and the problem, never their text
(:func:`describe_warning`). Every event the node logs is listed in the README's "Logs" table
(``tests/test_log.py`` keeps the two in step).
"""

from __future__ import annotations

import linecache
import logging
import re
import sys
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

import structlog

__all__ = ["PHI_KEYS", "configure_logging", "describe_warning", "drop_phi", "warning_event"]

PHI_KEYS = frozenset({
    "patient_name", "patientname", "patient_id", "patientid", "patient_birth_date",
    "patientbirthdate", "birth_date", "other_patient_ids", "patient_address",
})


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: delete fields that would carry patient identity."""
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        del event_dict[key]
    return event_dict


# What a library warning is about, parsed from its text without ever copying a value from it. Each
# pattern is a message we know (pydicom 3, highdicom 0.28); ``vr`` may only capture two capitals.
_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"unlikely to represent the intended person name"), "person name of one component"),
    (re.compile(r"^Invalid value for VR (?P<vr>[A-Z]{2})\b"), "value invalid for its VR"),
    (re.compile(r"exceeds the maximum length of \d+ allowed for VR (?P<vr>[A-Z]{2})\b"),
     "value longer than its VR allows"),
    (re.compile(r"^The (?P<vr>PN) component length \(\d+\) exceeds"), "value longer than its VR allows"),
    (re.compile(r"^Invalid value: a value for a tag with VR (?P<vr>[A-Z]{2}) must be between"),
     "value out of its VR's range"),
    (re.compile(r"^Camel case attribute '(?P<attribute>[A-Za-z0-9]+)' used which is not in the"),
     "unknown keyword"),
    (re.compile(r"^Unknown DICOM tag (?P<tag>\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\))"), "unknown tag"),
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STACK_DEPTH = 40  # frames searched for the data element a pydicom warning is about


def _keyword(identifier: str) -> str | None:
    """``identifier`` as a DICOM keyword when it is one (``PatientName`` or ``patient_name``)."""
    from pydicom.datadict import keyword_dict  # noqa: PLC0415 - pydicom only when a warning comes

    candidate = identifier if "_" not in identifier else "".join(
        part.capitalize() for part in identifier.split("_"))
    return candidate if candidate in keyword_dict else None


def _element_in_stack() -> str | None:
    """The keyword (or tag) of the pydicom DataElement being set or checked up the stack, if any."""
    from pydicom.dataelem import DataElement  # noqa: PLC0415 - pydicom only when a warning comes

    frame: FrameType | None = sys._getframe(2)  # the frames above showwarning hold the element
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        element = frame.f_locals.get("self")
        if isinstance(element, DataElement):
            return element.keyword or str(element.tag)
        frame = frame.f_back
    return None


def _attribute_in_source(filename: str, lineno: int) -> str | None:
    """A DICOM keyword named in the source line the warning points at (``check_person_name(
    patient_name)`` -> ``PatientName``): code, never data."""
    for identifier in _IDENTIFIER.findall(linecache.getline(filename, lineno)):
        if (keyword := _keyword(identifier)) is not None:
            return keyword
    return None


def describe_warning(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int) -> dict[str, Any]:
    """The fields of a ``library.warning`` event: the category, where it was raised, what it is
    about (``problem``, ``vr``) and the attribute (from the text, the element being set up the
    stack, or the warning's source line); never the text, which may quote a patient's name."""
    path = Path(filename)
    library = path.parts[path.parts.index("site-packages") + 1] if "site-packages" in path.parts else ""
    fields: dict[str, Any] = {"category": category.__name__, "library": library or path.stem,
                              "module": path.stem, "line": lineno}
    text = str(message)
    for pattern, problem in _PROBLEMS:
        if (match := pattern.search(text)) is not None:
            fields["problem"] = problem
            fields.update(match.groupdict())
            break
    if "attribute" not in fields and "tag" not in fields:
        attribute = _element_in_stack() or _attribute_in_source(filename, lineno)
        if attribute is not None:
            fields["attribute"] = attribute
    return fields


def warning_event(  # noqa: PLR0917 - the signature of warnings.showwarning
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None,
) -> None:
    """Library warnings (pydicom, highdicom) quote header values, a patient name among them:
    log what :func:`describe_warning` finds, never their text."""
    structlog.get_logger("warnings").info(
        "library.warning", **describe_warning(message, category, filename, lineno))


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of each event, so that loggers cached on
    first use (``cache_logger_on_first_use``) follow a replaced stderr (pytest's capture, which is
    closed after each test that ran the CLI in-process) instead of keeping the old one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process: JSON lines with ISO timestamps on ``stream``, and
    Python warnings turned into PHI-free ``library.warning`` events."""
    warnings.showwarning = warning_event
    # pydicom logs each warning's text (a quoted value) to its stdlib logger as well as warning it:
    # the warning becomes a library.warning event, the text must not reach stderr by the root logger.
    logging.getLogger("pydicom").propagate = False
    # SQLAlchemy's pool prints a traceback (plain text, not JSON) for each connection it cannot close
    # cleanly while the database is away; the node logs that outage itself (worker.storage_error).
    logging.getLogger("sqlalchemy.pool").propagate = False
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
        logger_factory=structlog.PrintLoggerFactory(file=stream or cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
