"""A real PostgreSQL server for tests: its own cluster in a temporary folder (issue 18).

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<major>/bin``
(Debian's ``postgresql`` package; missing → :func:`tests.peers.missing`, a failure under CI). It
listens on a Unix socket in its folder and on a free TCP port on 127.0.0.1; the test user
``reader`` has a password (so URLs carry one, as in production, and tests can check it is never
shown) but the server trusts local connections. Every wait has a deadline. As root (a container)
the server runs as the ``postgres`` user, since PostgreSQL refuses to run as root.

Fixtures (``tests/conftest.py``): ``postgres_server`` (one server for the test session) and
``postgres`` (the URL of a fresh database for one test, dropped afterwards).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from tests.peers import LOCALHOST, free_port, missing, wait_until

__all__ = ["PostgresServer", "postgres", "postgres_server"]

USER = "reader"
PASSWORD = "test-only-secret-7q"  # a test server's: tests prove it is never shown
_START_S = 60.0
_STOP_S = 30.0


def _bin_dir() -> Path:
    def major(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=major)
    if not found:
        missing("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
                "install the Debian package 'postgresql'")
    return Path(found[-1]).parent


class PostgresServer:
    """One PostgreSQL cluster in ``root``: :meth:`start`, :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.bin = _bin_dir()
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.log = root / "server.log"
        self.port = free_port()
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid}
            os.chown(root, account.pw_uid, account.pw_gid)
        self.socket_dir.mkdir(mode=0o700)
        if self._run_as:
            os.chown(self.socket_dir, self._run_as["user"], self._run_as["group"])
        self._tool("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                   "--no-instructions")

    def _tool(self, name: str, *args: str, timeout: float = _START_S) -> None:
        done = subprocess.run([str(self.bin / name), *args], capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.root, **self._run_as)
        if done.returncode != 0:
            raise AssertionError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def url(self, database: str = "postgres", *, password: str | None = PASSWORD) -> str:
        """A ``postgresql://`` URL of ``database`` over TCP, with the user's password."""
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{USER}{secret}@{LOCALHOST}:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait (with a deadline) until it accepts connections; set the
        user's password on the first start."""
        options = (f"-k {self.socket_dir} -p {self.port} -h {LOCALHOST} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                   "-t", str(int(_START_S)), "start", timeout=_START_S + 10)
        wait_until(self.accepting, _START_S, f"PostgreSQL on port {self.port}")
        self.execute(f"ALTER ROLE {USER} PASSWORD '{PASSWORD}'")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed) within a deadline."""
        self._tool("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(_STOP_S)), "stop",
                   timeout=_STOP_S + 10)

    def accepting(self) -> bool:
        """True when a connection over TCP succeeds."""
        try:
            conn = pg8000.native.Connection(USER, host=LOCALHOST, port=self.port, database="postgres",
                                            password=PASSWORD, timeout=5)
        except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError):
            return False
        conn.close()
        return True

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the test user."""
        conn = pg8000.native.Connection(USER, host=LOCALHOST, port=self.port, database=database,
                                        password=PASSWORD, timeout=10)
        try:
            conn.run(sql)
        finally:
            conn.close()

    def create_database(self) -> str:
        """A fresh, empty database; its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing its remaining connections."""
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session, in a temporary folder removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="reader-pg-"))
    try:
        server = PostgresServer(root)
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> Iterator[str]:
    """The ``postgresql://`` URL (with the test user's password) of a fresh database, dropped after
    the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
