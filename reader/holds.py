"""Study holds: "do not read this study until all of these instances are here".

A C-MOVE delivers a study to the node like any push, and the node infers completion when the
association is released (``reader.assemble``). A move that ends in partial success (PS3.4 C.4.2.1.5:
some sub-operations failed) would then be read from an incomplete set. ``reader backfill`` therefore
writes a hold before it moves a study: the SOP Instance UIDs its C-FIND found, per series. While a
hold is in force, the node's completion worker queues none of the study's series until every
instance listed is stored; the instance that completes the set queues all of them at once. The
backfill retries the missing instances, and deletes the hold once the node has queued the study.

A hold ends at ``expires_at`` (wall clock), so a backfill that never came back does not keep a
study from being read for ever; the study is then read when its next instance arrives or the node
restarts.

Stored as ``state/holds/<study UID>.json`` in the node's data dir, written atomically
(``reader.spool``) by the backfill process and read by the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reader.spool import Spool, check_uid

__all__ = ["HOLDS", "StudyHold"]

HOLDS = "holds"  # state/holds/<study UID>.json


@dataclass(frozen=True)
class StudyHold:
    """The instances a study must have before the node reads it, until ``expires_at`` (epoch s)."""

    study_uid: str
    series: Mapping[str, tuple[str, ...]]  # series UID -> SOP Instance UIDs expected
    expires_at: float

    def write(self, spool: Spool) -> None:
        """Durably put the hold in force (replacing an earlier one of the study)."""
        for uid in (self.study_uid, *self.series):
            check_uid(uid, "hold UID")
        spool.write_state(HOLDS, self.study_uid, {
            "study_uid": self.study_uid, "expires_at": self.expires_at,
            "series": {s: sorted(sops) for s, sops in sorted(self.series.items())}})

    @classmethod
    def read(cls, spool: Spool, study_uid: str, now: float) -> StudyHold | None:
        """The hold of ``study_uid`` in force at ``now``, or None."""
        raw = spool.read_state(HOLDS, study_uid)
        if raw is None or float(raw["expires_at"]) <= now:
            return None
        series: dict[str, Sequence[str]] = raw["series"]
        return cls(study_uid, {s: tuple(sops) for s, sops in series.items()}, float(raw["expires_at"]))

    @staticmethod
    def delete(spool: Spool, study_uid: str) -> None:
        """End the hold of ``study_uid`` (durably); nothing when there is none."""
        spool.delete_state(HOLDS, study_uid)

    def missing(self, spool: Spool) -> dict[str, tuple[str, ...]]:
        """Series UID -> the expected SOP Instance UIDs the node has not stored (only series lacking some)."""
        out = {}
        for series_uid, sops in self.series.items():
            stored = {p.stem for p in spool.series_instances(self.study_uid, series_uid)}
            lacking = tuple(s for s in sops if s not in stored)
            if lacking:
                out[series_uid] = lacking
        return out
