"""Opening the state database, its transactions and its migrations (issue 18).

:class:`Database` wraps one SQLAlchemy engine:

- **SQLite** (the single node, ``<data_dir>/state.db``, or ``sqlite:///path``): WAL journal,
  ``synchronous=FULL`` (a committed transaction survives a power cut), a busy timeout for other
  processes (``reader status``), and write transactions serialised in the process by a lock per
  database file and across processes by ``BEGIN IMMEDIATE`` (the write lock taken at the start, so
  two writers never deadlock on a lock upgrade and never see ``SQLITE_BUSY`` from a lost upgrade);
  reads are plain deferred transactions, which WAL never blocks.
- **PostgreSQL** (``postgresql://user:password@host:port/db``, the shared database of a cluster):
  through pg8000 (pure Python, BSD licence; psycopg is LGPL), the scheme rewritten to
  ``postgresql+pg8000://``, connections checked before use (``pool_pre_ping``), READ COMMITTED;
  :mod:`reader.jobs` makes each multi-process step one transaction with row locks, unique
  constraints and :meth:`Database.run`'s retry on a conflict.

A database that cannot be reached raises :class:`reader.errors.DatabaseUnavailable` naming it
(host and database, the password replaced by ``***``); so does a server that is shutting down,
starting up or full (its FATAL answers: SQLSTATE class 08, 57P01-57P03, 53300), and a socket error
pg8000 lets out unwrapped: callers back off on it and never record a series as failed for it.

At open, the migration steps (:data:`MIGRATIONS`, version N = the first N steps) run in one
transaction (on PostgreSQL under an advisory lock, so processes starting together migrate once); a
database whose ``schema_version`` is above what this code knows raises
:class:`reader.errors.SchemaTooNew`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import URL, Connection, Engine, make_url

from reader.config import redact_url
from reader.errors import ConfigError, DatabaseUnavailable, SchemaTooNew, StorageError
from reader.state import schema

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Database"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

SQLITE_FILE = "state.db"
_BUSY_TIMEOUT_S = 30.0  # sqlite3 connect(timeout=): how long a writer waits for another process
_CONNECT_TIMEOUT_S = 30  # pg8000: connecting, and any one network read
_RETRIES = 8  # a conflicting insert or a deadlock is retried this many times, then StorageError
_MIGRATION_LOCK = 180_418_001  # pg_advisory_xact_lock key of the migrations
_RETRYABLE_PG = {"40001", "40P01"}  # serialization failure, deadlock detected
_UNAVAILABLE_PG_CLASSES = ("08",)  # connection exception
# admin shutdown, crash shutdown, cannot connect now (shutting down, starting up), too many connections
_UNAVAILABLE_PG = {"57P01", "57P02", "57P03", "53300"}

_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    """The process-wide write lock of one SQLite file (every Database on it shares it)."""
    with _file_locks_guard:
        return _file_locks.setdefault(path, threading.Lock())


def _create_tables(conn: Connection) -> None:
    schema.metadata.create_all(conn)


MIGRATIONS: Sequence[Callable[[Connection], None]] = (
    _create_tables,  # 1: the tables of reader.state.schema
)
SCHEMA_VERSION = len(MIGRATIONS)


def _engine_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError("cluster.database", "not a database URL") from exc
    if parsed.drivername in ("postgresql", "postgresql+pg8000"):
        return parsed.set(drivername="postgresql+pg8000")
    if parsed.drivername == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return parsed
    raise ConfigError("cluster.database", f"{redact_url(url)}: expected sqlite:///path or postgresql://...")


class Database:
    """One state database: an engine, its transactions, its schema brought up to date at open."""

    def __init__(self, url: str) -> None:
        """Open ``url`` (``sqlite:///path`` or ``postgresql://...``) and migrate it; ConfigError for
        another URL, DatabaseUnavailable when it cannot be reached, SchemaTooNew."""
        self.url = _engine_url(url)
        self.name = redact_url(url)  # as configured, whatever characters its password holds
        self.is_sqlite = self.url.drivername == "sqlite"
        self._write_lock: threading.Lock | None = None
        if self.is_sqlite:
            path = Path(str(self.url.database)).resolve()
            self._write_lock = _file_lock(str(path))
            with contextlib.suppress(FileExistsError, FileNotFoundError):  # owner-only, as the data dir
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.engine: Engine = sa.create_engine(
                self.url.set(database=str(path)),
                connect_args={"isolation_level": None, "timeout": _BUSY_TIMEOUT_S,
                              "check_same_thread": False})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True,
                                           connect_args={"timeout": _CONNECT_TIMEOUT_S})
        try:
            self._migrate()
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | None, data_dir: Path) -> Database:
        """``url``, or the data dir's own SQLite file (``<data_dir>/state.db``) when None."""
        return cls(url if url is not None else f"sqlite:///{data_dir / SQLITE_FILE}")

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.name})"

    # --- transactions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Connection]:
        """One transaction, committed when the block ends, rolled back on an exception. ``write``
        on SQLite: the process's lock on the file, then ``BEGIN IMMEDIATE``. Unreachable →
        DatabaseUnavailable; another database error → StorageError; an IntegrityError (a
        conflicting insert) passes through for :meth:`run` to retry."""
        lock = self._write_lock if write else None
        with lock if lock is not None else contextlib.nullcontext():
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(reader_write=write)
                    with conn.begin():
                        yield conn
            except sa.exc.IntegrityError:
                raise
            except sa.exc.DBAPIError as exc:
                if _retryable(exc):
                    raise
                if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or _unavailable(exc):
                    raise self._unreachable(self._reason(exc)) from exc
                raise StorageError(f"database {self.name}: {self._reason(exc)}") from exc
            except (ConnectionError, TimeoutError) as exc:  # pg8000 lets a socket's error out unwrapped
                raise self._unreachable(f"{type(exc).__name__}: {exc}") from exc

    def run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """``work`` in one transaction, run again in a fresh one after a conflict (a concurrent
        insert of the same key, a deadlock): the step is all-or-nothing and sees the winner's rows."""
        for attempt in range(_RETRIES):
            try:
                with self.transaction(write=write) as conn:
                    return work(conn)
            except sa.exc.DBAPIError as exc:
                if not (isinstance(exc, sa.exc.IntegrityError) or _retryable(exc)) or attempt == _RETRIES - 1:
                    raise StorageError(f"database {self.name}: {self._reason(exc)}") from exc
                time.sleep(0.001 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, reason: str) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"database {self.name} unavailable: {reason}")

    def _reason(self, exc: sa.exc.DBAPIError) -> str:
        text = f"{type(exc.orig).__name__}: {exc.orig}"
        if self.url.password:
            text = text.replace(str(self.url.password), "***")
        return text[:300]

    # --- migrations ------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            current = _schema_version(conn)
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(f"database {self.name} has schema version {current}; this node knows "
                                   f"up to {SCHEMA_VERSION}: upgrade the node")
            for step in range(current, SCHEMA_VERSION):
                MIGRATIONS[step](conn)
                log.info("state.migrated", version=step + 1)
            if current == 0:
                conn.execute(schema.schema_version.insert().values(id=1, version=SCHEMA_VERSION))
            elif current < SCHEMA_VERSION:
                conn.execute(schema.schema_version.update().values(version=SCHEMA_VERSION))


def _schema_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        schema.schema_version.create(conn)
        return 0
    value = conn.execute(sa.select(schema.schema_version.c.version)).scalar()
    return 0 if value is None else int(value)


def _sqlstate(exc: sa.exc.DBAPIError) -> str:
    """The PostgreSQL error code (SQLSTATE, PostgreSQL manual Appendix A) pg8000 put in the error's
    first argument; "" when there is none."""
    args: tuple[object, ...] = tuple(getattr(exc.orig, "args", ()))
    first = args[0] if args else None
    code = first.get("C") if isinstance(first, dict) else None
    return code if isinstance(code, str) else ""


def _retryable(exc: sa.exc.DBAPIError) -> bool:
    """A PostgreSQL serialization failure or deadlock: the transaction may simply run again."""
    return _sqlstate(exc) in _RETRYABLE_PG


def _unavailable(exc: sa.exc.DBAPIError) -> bool:
    """A server that is going down, starting up or full: pg8000 raises these FATAL answers as a
    ProgrammingError, not as the OperationalError SQLAlchemy names a lost server."""
    code = _sqlstate(exc)
    return code.startswith(_UNAVAILABLE_PG_CLASSES) or code in _UNAVAILABLE_PG


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    """pysqlite's own transaction handling is off (isolation_level None): begin here, IMMEDIATE
    for a write transaction."""
    write = conn.get_execution_options().get("reader_write", True)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
