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
series supersedes the one queued. Claims are plain SQL instead: one conditional ``UPDATE`` sets
``claimed_by`` only while the row is this version and unclaimed, its lease expired or already ours
(on PostgreSQL the row lock makes a second claimer re-check that condition once the first commits,
so exactly one wins, as ``SELECT ... FOR UPDATE SKIP LOCKED`` would; on SQLite writers are
serialised by ``BEGIN IMMEDIATE``). A claim is a lease (``claimed_by``, ``lease_until``),
renewed while the work runs and free again once it expires, so the job of a worker killed with
SIGKILL is taken by another after the lease. Workers poll the indexed queue (``[cluster]
poll_interval``) rather than LISTEN/NOTIFY, which pg8000 cannot block on, and still get in-process
wake-ups.
"""

from __future__ import annotations

from reader.state.database import SCHEMA_VERSION, Database

__all__ = ["SCHEMA_VERSION", "Database"]
