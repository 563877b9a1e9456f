"""Storing one received instance: the single function both ways in call.

The C-STORE handler (``reader.scp``) and the STOW-RS handler (``reader.web.stow``) each take an
instance off the wire, name it by its UIDs (:func:`instance_ids`) and hand it here
(:func:`store_received`), so that both apply the same free-disk watermark, the same atomic write
and the same completion bookkeeping. Neither decodes pixel data or runs anything else: decoding
and inference happen in the pipeline, once the series is complete (``reader.assemble``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reader.assemble import CompletionTracker
from reader.errors import InputRejected
from reader.spool import Spool, check_uid

__all__ = ["InstanceIds", "instance_ids", "store_received"]


@dataclass(frozen=True)
class InstanceIds:
    """Where a received instance is filed: its study, series and SOP Instance UIDs (checked)."""

    study_uid: str
    series_uid: str
    sop_uid: str


def instance_ids(header: Any, sop_uid: str | None = None) -> InstanceIds:
    """The UIDs of a dataset ``header``; ``sop_uid`` is the one the transfer announced (C-STORE's
    Affected SOP Instance UID, or the file meta's Media Storage SOP Instance UID) and must agree
    with the dataset's own. Raises InputRejected naming the UID that is missing, malformed or
    inconsistent."""
    study_uid = check_uid(header.get("StudyInstanceUID"), "Study Instance UID")
    series_uid = check_uid(header.get("SeriesInstanceUID"), "Series Instance UID")
    own = header.get("SOPInstanceUID")
    if sop_uid is None:
        sop_uid = check_uid(own, "SOP Instance UID")
    else:
        sop_uid = check_uid(sop_uid, "Affected SOP Instance UID")
        if str(own if own is not None else sop_uid) != sop_uid:
            raise InputRejected("uid_mismatch", "SOP Instance UID differs from Affected SOP Instance UID")
    return InstanceIds(study_uid, series_uid, sop_uid)


def store_received(spool: Spool, tracker: CompletionTracker, source_id: int, ids: InstanceIds,
                   data: bytes, *, stat: bool = False) -> None:
    """Durably store one received instance (a Part 10 file) and tell the tracker.

    ``source_id`` names what carried it: an association, or a STOW-RS request; the tracker is
    told when that ends (``CompletionTracker.association_ended``). Raises OutOfResources below
    the free-disk watermark and StorageError when the write fails; nothing is tracked then.
    """
    spool.check_free_space()
    spool.store_instance(ids.study_uid, ids.series_uid, ids.sop_uid, data)
    tracker.instance_stored(source_id, ids.study_uid, ids.series_uid, stat=stat)
