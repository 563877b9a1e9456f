"""The state tables (SQLAlchemy Core), one schema for SQLite and PostgreSQL (issue 18).

What each table holds (``reader.jobs`` reads and writes them, nothing else does):

- ``series``: each series' last processing outcome (:class:`reader.jobs.SeriesState`);
- ``jobs``: complete series queued for processing (:class:`reader.jobs.ProcessJob`), one per series,
  with the claim of the worker processing it (``claimed_by``, ``lease_until``); the claim order is
  ``priority`` descending, then ``created_at`` (index ``ix_jobs_claim_order``);
- ``study_reads``: a study's result lineage, one row per result version it minted
  (``JobStore.study_result_version``); ``UNIQUE(lineage, version)``: a version is minted once, whatever
  the number of processes racing for it;
- ``sends``: send tickets (:class:`reader.jobs.SendTicket`) with their claim; pending and settled
  ones share the table, told apart by ``state`` (the JSON store's archive folder), and the
  dispatcher's pass reads through the ``(state, next_attempt_at)`` index only pending ones;
- ``arrivals``: per series, the wall-clock time of the last instance a receiver stored, for
  completion across receivers sharing a PostgreSQL database (:class:`reader.jobs.Arrival`);
- ``leases``: named leases held by one process at a time (retention), ``JobStore.hold_lease``;
- ``schema_version``: one row, the migration step the database is at (``reader.state.database``).

Lists and mappings (instances, files, flag, model, timeline) are JSON text, the same on both engines;
times are seconds since the epoch (double precision), as the dataclasses hold them.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

__all__ = ["arrivals", "jobs", "json_text", "leases", "metadata", "schema_version", "sends", "series",
           "study_reads"]

metadata = sa.MetaData()

_UID = 64  # PS3.5 9.1
_TIME: sa.Double[float] = sa.Double()


def json_text(value: Any) -> str | None:
    """The JSON text a list or mapping column holds (keys sorted); None stays NULL."""
    return None if value is None else json.dumps(value, sort_keys=True)

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1: one row
    sa.Column("version", sa.Integer, nullable=False),
)

series = sa.Table(
    "series", metadata,
    sa.Column("series_uid", sa.String(_UID), primary_key=True),
    sa.Column("study_uid", sa.String(_UID), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("instances", sa.Text, nullable=False),  # JSON list of SOP Instance UIDs, sorted
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", _TIME, nullable=False),
    sa.Column("flag", sa.Text, nullable=True),  # JSON object
    sa.Column("model", sa.Text, nullable=True),  # JSON object
    sa.Column("timeline", sa.Text, nullable=True),  # JSON object
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("series_uid", sa.String(_UID), primary_key=True),
    sa.Column("study_uid", sa.String(_UID), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("instances", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("claimed_by", sa.String(255), nullable=True),
    sa.Column("lease_until", _TIME, nullable=True),
    sa.Index("ix_jobs_claim_order", sa.desc("priority"), "created_at"),
)

study_reads = sa.Table(
    "study_reads", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("lineage", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("series_uid", sa.String(_UID), nullable=False),
    sa.Column("instances", sa.Text, nullable=False),
    sa.Column("job_version", sa.Integer, nullable=False),
    sa.UniqueConstraint("lineage", "version", name="uq_study_reads_lineage_version"),
)

sends = sa.Table(
    "sends", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("series_uid", sa.String(_UID), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("files", sa.Text, nullable=False),  # JSON list of paths
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", _TIME, nullable=False, default=0.0),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("lineage", sa.String(255), nullable=False, default=""),
    sa.Column("line", sa.String(255), nullable=False),  # lineage, or the series when none
    sa.Column("updated_at", _TIME, nullable=False, default=0.0),
    sa.Column("claimed_by", sa.String(255), nullable=True),
    sa.Column("lease_until", _TIME, nullable=True),
    sa.Index("ix_sends_state_due", "state", "next_attempt_at"),
    sa.Index("ix_sends_line", "line", "destination"),
)

arrivals = sa.Table(
    "arrivals", metadata,
    sa.Column("study_uid", sa.String(_UID), primary_key=True),
    sa.Column("series_uid", sa.String(_UID), primary_key=True),
    sa.Column("last_instance_at", _TIME, nullable=False),
    sa.Column("stat", sa.Boolean, nullable=False, default=False),
)

leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("lease_until", _TIME, nullable=False),
)
