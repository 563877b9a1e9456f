"""Named DIMSE status codes and their classification for the Storage Service Class.

The codes come from PS3.7 Annex C (general status codes) and PS3.4 Annex B.2.3 (C-STORE specific
statuses). Both our C-STORE SCP (``reader.scp``, which answers them) and our SCU (``reader.send``,
which classifies them) use the names below; bare hex invites typos such as ``0x210`` for ``0xC210``.

:func:`classify` sorts a status into a :class:`StatusCategory`, which tells the sender whether a
failure is worth retrying later (``TRANSIENT_FAILURE``) or must be parked (``PERMANENT_FAILURE``).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CANCEL",
    "CANNOT_UNDERSTAND",
    "CLASS_INSTANCE_CONFLICT",
    "DATASET_MISMATCH",
    "DUPLICATE_INVOCATION",
    "DUPLICATE_SOP_INSTANCE",
    "INVALID_OBJECT_INSTANCE",
    "MISTYPED_ARGUMENT",
    "NO_SUCH_SOP_CLASS",
    "OUT_OF_RESOURCES",
    "PENDING",
    "PENDING_WARNING",
    "PROCESSING_FAILURE",
    "REFUSED_NOT_AUTHORIZED",
    "RESOURCE_LIMITATION",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUCCESS",
    "UNRECOGNIZED_OPERATION",
    "WARNING_ATTRIBUTE_LIST_ERROR",
    "WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE",
    "WARNING_COERCION",
    "WARNING_DATASET_MISMATCH",
    "WARNING_ELEMENTS_DISCARDED",
    "WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED",
    "StatusCategory",
    "classify",
    "describe",
]

# --- Success (PS3.7 C.1.1) -------------------------------------------------------------------------
SUCCESS: Final = 0x0000

# --- Warnings (PS3.7 C.3 general, PS3.4 Table B.2-1 C-STORE) ---------------------------------------
WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: Final = 0x0001
WARNING_ATTRIBUTE_LIST_ERROR: Final = 0x0107
WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE: Final = 0x0116
WARNING_COERCION: Final = 0xB000
"""C-STORE: coercion of data elements (PS3.4 Table B.2-1)."""
WARNING_ELEMENTS_DISCARDED: Final = 0xB006
"""C-STORE: elements discarded."""
WARNING_DATASET_MISMATCH: Final = 0xB007
"""C-STORE: data set does not match SOP class (stored anyway)."""

# --- Failures, C-STORE specific (PS3.4 Table B.2-1); each is the first code of a range ---------------
OUT_OF_RESOURCES: Final = 0xA700
"""Refused: out of resources (0xA7xx). Transient: the peer may have space later."""
DATASET_MISMATCH: Final = 0xA900
"""Error: data set does not match SOP class (0xA9xx). Permanent."""
CANNOT_UNDERSTAND: Final = 0xC000
"""Error: cannot understand (0xCxxx). Permanent."""

# --- Failures, general (PS3.7 C.4 / C.5) ----------------------------------------------------------
PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
INVALID_OBJECT_INSTANCE: Final = 0x0117
NO_SUCH_SOP_CLASS: Final = 0x0118
CLASS_INSTANCE_CONFLICT: Final = 0x0119
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
REFUSED_NOT_AUTHORIZED: Final = 0x0124
DUPLICATE_INVOCATION: Final = 0x0210
UNRECOGNIZED_OPERATION: Final = 0x0211
MISTYPED_ARGUMENT: Final = 0x0212
RESOURCE_LIMITATION: Final = 0x0213

# --- Cancel and pending (PS3.7 C.2 / C.6); not valid answers to a C-STORE -------------------------
CANCEL: Final = 0xFE00
PENDING: Final = 0xFF00
PENDING_WARNING: Final = 0xFF01

_HIGH_BYTE: Final = 0xFF00
_HIGH_NIBBLE: Final = 0xF000

_WARNINGS: Final = frozenset(
    {
        WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED,
        WARNING_ATTRIBUTE_LIST_ERROR,
        WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE,
    }
)
_TRANSIENT: Final = frozenset({PROCESSING_FAILURE, DUPLICATE_INVOCATION, RESOURCE_LIMITATION, CANCEL})

_NAMES: Final = {
    SUCCESS: "success",
    WARNING_COERCION: "warning: coercion of data elements",
    WARNING_ELEMENTS_DISCARDED: "warning: elements discarded",
    WARNING_DATASET_MISMATCH: "warning: data set does not match SOP class",
    WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: "requested optional attributes not supported",
    WARNING_ATTRIBUTE_LIST_ERROR: "attribute list error",
    WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE: "attribute value out of range",
    PROCESSING_FAILURE: "processing failure",
    DUPLICATE_SOP_INSTANCE: "duplicate SOP instance",
    INVALID_OBJECT_INSTANCE: "invalid object instance",
    NO_SUCH_SOP_CLASS: "no such SOP class",
    CLASS_INSTANCE_CONFLICT: "class-instance conflict",
    SOP_CLASS_NOT_SUPPORTED: "refused: SOP class not supported",
    REFUSED_NOT_AUTHORIZED: "refused: not authorized",
    DUPLICATE_INVOCATION: "duplicate invocation",
    UNRECOGNIZED_OPERATION: "unrecognized operation",
    MISTYPED_ARGUMENT: "mistyped argument",
    RESOURCE_LIMITATION: "resource limitation",
    CANCEL: "cancel",
    PENDING: "pending",
    PENDING_WARNING: "pending with warnings",
}
_RANGE_NAMES: Final = {
    OUT_OF_RESOURCES: "refused: out of resources",
    DATASET_MISMATCH: "error: data set does not match SOP class",
}


class StatusCategory(enum.StrEnum):
    """What a DIMSE status means for the sender (PS3.7 Annex C status types)."""

    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT_FAILURE = "transient_failure"
    PERMANENT_FAILURE = "permanent_failure"


def classify(status: int) -> StatusCategory:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C).

    - ``0x0000`` is success; ``0x0001``, ``0x0107``, ``0x0116`` and ``0xBxxx`` are warnings (the
      instance was stored).
    - Out of resources ``0xA7xx``, processing failure ``0x0110``, resource limitation ``0x0213``,
      duplicate invocation ``0x0210`` and cancel ``0xFE00`` are transient: a later attempt on a new
      association can succeed.
    - Everything else is permanent: ``0xA9xx``, ``0xCxxx``, ``0x0122``, ``0x0124``, ``0x0211``...
      and any code the standard does not define for C-STORE (pending ``0xFFxx`` included), because
      retrying a peer we do not understand only repeats the failure; the job is parked for a human.
    """
    if not 0 <= status <= 0xFFFF:
        raise ValueError(f"DIMSE status must be a 16-bit unsigned value, got {status!r}")
    if status == SUCCESS:
        return StatusCategory.SUCCESS
    if status in _WARNINGS or status & _HIGH_NIBBLE == WARNING_COERCION:
        return StatusCategory.WARNING
    if status in _TRANSIENT or status & _HIGH_BYTE == OUT_OF_RESOURCES:
        return StatusCategory.TRANSIENT_FAILURE
    return StatusCategory.PERMANENT_FAILURE


def describe(status: int) -> str:
    """A short human description of ``status`` with its hex code, for messages and logs."""
    name = _NAMES.get(status)
    if name is None:
        name = _RANGE_NAMES.get(status & _HIGH_BYTE)
    if name is None and status & _HIGH_NIBBLE == CANNOT_UNDERSTAND:
        name = "error: cannot understand"
    if name is None and status & _HIGH_NIBBLE == WARNING_COERCION:
        name = "warning"
    return f"0x{status:04X} ({name or 'unknown status'})"
