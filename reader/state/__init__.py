"""The node's durable state in SQL: series outcomes, queued jobs, study lineages, send tickets,
arrivals and named leases (issue 18: scale-out on PostgreSQL).

- :mod:`reader.state.schema`: the tables (SQLAlchemy Core, no ORM), one schema for both engines;
- :mod:`reader.state.database`: :class:`Database`, opening SQLite (``<data_dir>/state.db``, the single
  node) or PostgreSQL through pg8000 (``[cluster] database``, shared by every process of a cluster),
  transactions, and the migrations run at open.

:class:`reader.jobs.JobStore` is the only reader and writer of these tables; everything else
(retention, ``reader status``, the web pages, the node's queue depths) goes through it.

**No queue library.** procrastinate and pgqueuer are PostgreSQL-only (the single node runs on
SQLite), procrastinate needs psycopg (LGPL), and neither task model knows that a newer version of a
series supersedes the one queued. Claims are plain SQL instead: a row updated only while unclaimed,
its lease expired or already ours (``SELECT ... FOR UPDATE SKIP LOCKED`` / a conditional ``UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite). A claim is a lease (``claimed_by``, ``lease_until``),
renewed while the work runs and free again once it expires, so the job of a worker killed with
SIGKILL is taken by another after the lease. Workers poll the indexed queue (``[cluster]
poll_interval``) rather than LISTEN/NOTIFY, which pg8000 cannot block on, and still get in-process
wake-ups.
"""

from __future__ import annotations

from reader.state.database import SCHEMA_VERSION, Database, redact

__all__ = ["SCHEMA_VERSION", "Database", "redact"]
