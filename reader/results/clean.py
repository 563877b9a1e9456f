"""Repair patient/study attributes that highdicom copies from a defective source header.

highdicom copies every root attribute of the source's Patient and Study IE modules (PS3.3 C.7.1,
C.7.2) into a derived object, defects included. The shared Lung-PET-CT-Dx CT (TCIA), for example, carries a
Referenced Study Sequence whose item lacks the Type 1 Referenced SOP Class UID (PS3.3 Table 10-11,
SOP Instance Reference Macro), which dciodvfy reports as an error in every derived object.

Rules, applied to root attributes the derived object shares (same tag, same value) with the source:

* a sequence with an item (at any depth) that breaks the SOP Instance Reference Macro, or holds a
  value invalid for its VR (PS3.5 6.2), is removed: the copied sequences are all Type 3 (or 1C with
  an alternative) in those modules, and nothing useful can be re-created without the source's intent;
* a value invalid for its VR (length, characters, format) is removed if the attribute is Type 3,
  emptied if it is Type 2 (PS3.5 7.4.1/7.4.3), and kept as is, with a warning, if it identifies the
  patient or study: a PACS files a derived object by those, so they must match the source exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import DataElement, Dataset
from pydicom.config import RAISE
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

__all__ = ["Repair", "clean_copied_attributes", "prepare_source", "prepared_source"]

log = structlog.get_logger(__name__)

_BINARY_VRS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "OB", "OD", "OF", "OL", "OW", "OV"})
# Identity: PACS matching depends on these being byte-for-byte the source's values.
_IDENTITY = frozenset(
    {"PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "IssuerOfPatientID"}
)
# Type 2 attributes of the Patient (C.7.1.1) and General Study (C.7.2.1) modules.
_TYPE_2 = frozenset(
    {"PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID"}
)


@dataclass(frozen=True)
class Repair:
    """One change made to a copied attribute: keyword (or tag) and what was done."""

    attribute: str
    action: str  # "removed", "emptied" or "kept-invalid"
    reason: str


def _invalid_value(element: DataElement) -> str | None:
    """Why the element's value is invalid for its VR, or None when it is valid.

    The reason names the VR only, never the value (it may be PHI and ends up in the log).
    """
    vr = str(element.VR)
    if vr == "SQ" or element.value is None:
        return None
    values: list[Any] = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
    for value in values:
        # DS/IS values are str-like number subclasses; their validators want the string form.
        keep = vr in _BINARY_VRS or isinstance(value, bytes | bytearray)
        try:
            validate_value(vr, value if keep else str(value), RAISE)
        except ValueError:
            return f"value invalid for VR {vr}"
    return None


def _sequence_problem(element: DataElement) -> str | None:
    """Why a sequence cannot be kept: a broken SOP instance reference or an invalid value inside."""
    for item in element.value:
        has_class = "ReferencedSOPClassUID" in item
        has_instance = "ReferencedSOPInstanceUID" in item
        if has_class != has_instance:
            missing = "ReferencedSOPInstanceUID" if has_class else "ReferencedSOPClassUID"
            return f"item lacks Type 1 {missing} (SOP Instance Reference Macro)"
        for inner in item:
            problem = _sequence_problem(inner) if inner.VR == "SQ" else _invalid_value(inner)
            if problem is not None:
                return f"{inner.keyword or inner.tag}: {problem}"
    return None


def _same(a: DataElement, b: DataElement) -> bool:
    """True when two elements carry the same value (sequences compared by their items)."""
    if a.VR != b.VR:
        return False
    if a.VR == "SQ":
        return len(a.value) == len(b.value) and all(x == y for x, y in zip(a.value, b.value, strict=True))
    return bool(a.value == b.value)


def clean_copied_attributes(derived: Dataset, source: Dataset) -> tuple[Repair, ...]:
    """Fix, in place, root attributes of ``derived`` copied from ``source``; return what was changed."""
    repairs: list[Repair] = []
    copied: list[BaseTag] = [
        element.tag
        for element in derived
        if element.tag in source and _same(element, source[element.tag])
    ]
    for tag in copied:
        element = derived[tag]
        name = element.keyword or str(tag)
        if element.VR == "SQ":
            problem = _sequence_problem(element)
            if problem is not None:
                del derived[tag]
                repairs.append(Repair(name, "removed", problem))
            continue
        problem = _invalid_value(element)
        if problem is None:
            continue
        if name in _IDENTITY:
            repairs.append(Repair(name, "kept-invalid", problem))
        elif name in _TYPE_2:
            element.value = None
            repairs.append(Repair(name, "emptied", problem))
        else:
            del derived[tag]
            repairs.append(Repair(name, "removed", problem))
    for repair in repairs:
        # Keywords and reasons only: the values may be PHI.
        if repair.action == "kept-invalid":
            log.warning("results.clean.kept_invalid", attribute=repair.attribute, reason=repair.reason)
        else:
            log.info("results.clean.repaired", attribute=repair.attribute, action=repair.action,
                     reason=repair.reason)
    return tuple(repairs)


def prepare_source(ds: Dataset) -> Dataset:
    """Make a source header safe for highdicom to copy from, in place, and return it.

    highdicom reads the Type 2 Patient and General Study attributes (PS3.3 C.7.1.1, C.7.2.1) of the
    source and fails when one is absent or, for dates and times, malformed; its error text then
    quotes the value, a birth date say. Absent ones are added empty and invalid ones emptied
    (PS3.5 7.4.3), so encoding neither fails on them nor copies the defect.
    """
    for keyword in sorted(_TYPE_2):
        if keyword not in ds:
            setattr(ds, keyword, "")
            continue
        element = ds[keyword]
        if _invalid_value(element) is not None:
            element.value = ""
            log.info("results.clean.repaired", attribute=keyword, action="emptied",
                     reason="source value invalid for its VR")
    return ds


def prepared_source(ds: Dataset, valid: dict[tuple[object, ...], bool] | None = None) -> Dataset:
    """``ds`` itself when :func:`prepare_source` would change nothing, else a prepared deep copy.

    ``valid`` memoizes the VR checks across the headers of one series, which mostly share these
    patient and study values (keys: VR and the value exactly as it is checked).
    """
    for keyword in _TYPE_2:
        if keyword not in ds:
            return prepare_source(copy.deepcopy(ds))
        element = ds[keyword]
        key = _check_key(element)
        if valid is None or key is None:
            ok = _invalid_value(element) is None
        elif key in valid:
            ok = valid[key]
        else:
            ok = valid[key] = _invalid_value(element) is None
        if not ok:
            return prepare_source(copy.deepcopy(ds))
    return ds


def _check_key(element: DataElement) -> tuple[object, ...] | None:
    """What :func:`_invalid_value` looks at: the VR and each value as validated; None: do not memoize."""
    vr = str(element.VR)
    if vr == "SQ" or element.value is None:
        return (vr, None)
    values: list[Any] = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
    checked: list[object] = []
    for value in values:
        keep = vr in _BINARY_VRS or isinstance(value, bytes | bytearray)
        item = value if keep else str(value)
        if not isinstance(item, str | bytes | int | float):
            return None
        checked.append(item if not isinstance(item, bytearray) else bytes(item))
    return (vr, *checked)
