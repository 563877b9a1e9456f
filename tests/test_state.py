"""The state layer (``reader.state``) and the JobStore contract on both engines (issue 18).

Every contract test runs twice: on SQLite (the single node's ``state.db``) and on a real PostgreSQL
server (tests/postgres.py), with two JobStores of different owners on the same database standing in
for two processes of a cluster (each has its own engine and connections, so the database alone
arbitrates between them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from reader.errors import DatabaseUnavailable, SchemaTooNew
from reader.jobs import Arrival, JobStore, SendState
from reader.spool import Spool
from reader.state import SCHEMA_VERSION, Database
from reader.state import schema as state_schema
from tests.peers import LOCALHOST, wait_until
from tests.postgres import PASSWORD, PostgresServer
from tests.reliability import refused_port

T = TypeVar("T")
RACERS = 8
DEADLINE_S = 30.0
A_WON = [True, False] * (RACERS // 2)  # the calls of owner a (every other one) won
B_WON = [False, True] * (RACERS // 2)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty state database of each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    postgres_url: str = request.getfixturevalue("postgres")
    return postgres_url


@pytest.fixture
def stores(url: str, tmp_path: Path) -> Iterator[tuple[JobStore, JobStore]]:
    """Two job stores, owners "a" and "b", on the same database (two processes of a cluster)."""
    spool = Spool(tmp_path / "data", min_free_bytes=0)
    a = JobStore(spool, database=Database(url), owner="a")
    b = JobStore(spool, database=Database(url), owner="b")
    yield a, b
    a.database.close()
    b.database.close()


def _race(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in threads released together; their results in order (an error re-raised)."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(DEADLINE_S)
        return call()
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [f.result(DEADLINE_S) for f in futures]


def test_enqueue_is_idempotent_and_a_new_instance_supersedes(stores: tuple[JobStore, JobStore]) -> None:
    """The same instances queue one job whichever store sees them; a new instance queues the
    next version in place of the queued one; two stores racing to queue the same series queue it
    once."""
    a, b = stores
    job = a.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.2", "1.2.3.1"))
    assert job is not None and job.version == 1 and job.instances == ("1.2.3.1", "1.2.3.2")
    assert b.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2")) is None
    newer = b.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2", "1.2.3.3"))
    assert newer is not None and newer.version == 2
    assert [(j.series_uid, j.version) for j in a.pending_jobs()] == [("1.2.3", 2)]
    assert not a.job_is_current(job) and a.job_is_current(newer)
    queued = _race([lambda s=s: s.enqueue_if_changed("1.2", "1.2.4", ("1.2.4.1",))  # type: ignore[misc]
                    for s in [a, b] * (RACERS // 2)])
    assert [j.version for j in queued if j is not None] == [1], "queued more than once"
    state = b.series_state("1.2.4")
    assert state is not None and state.version == 1


def test_a_study_version_is_minted_once_under_racing_owners(stores: tuple[JobStore, JobStore]) -> None:
    """Two owners minting the result version of the same read at once get the same version, and
    the lineage records it once; the next read mints the next version."""
    a, b = stores
    sops = ("1.2.3.1", "1.2.3.2")
    versions = _race([lambda s=s: s.study_result_version("1.2-0000abcd", "1.2.3", sops, 1)  # type: ignore[misc]
                      for s in [a, b] * (RACERS // 2)])
    assert versions == [1] * RACERS
    assert a.lineages() == {"1.2-0000abcd": ("1.2.3",)}
    assert b.study_result_version("1.2-0000abcd", "1.2.4", ("1.2.4.1",), 1) == 2
    assert a.earlier_results("1.2-0000abcd", 3) == [("1.2.4", 2), ("1.2.3", 1)]


def test_exactly_one_owner_claims_a_job_and_an_expired_lease_is_taken_over(
        stores: tuple[JobStore, JobStore]) -> None:
    """Of two owners claiming the same job at once exactly one wins; the other no longer sees it
    pending; once the winner's lease expires (a killed worker) the other claims it; a released
    claim leaves the job queued for anyone."""
    a, b = stores
    job = a.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1",))
    assert job is not None
    wins = _race([lambda s=s: s.claim_job(job, 60.0) for s in [a, b] * (RACERS // 2)])  # type: ignore[misc]
    assert wins in (A_WON, B_WON), "both owners won, or neither"
    winner, loser = (a, b) if wins[0] else (b, a)
    assert winner.claim_job(job, 60.0), "the holder's claim extends its lease"
    assert not loser.claim_job(job, 60.0)
    assert loser.pending_jobs() == [] and [j.series_uid for j in winner.pending_jobs()] == ["1.2.3"]
    assert [j.series_uid for j in loser.queued_jobs()] == ["1.2.3"], "a claimed job is still queued"
    winner.renew_job_leases(["1.2.3"], 0.2)
    wait_until(lambda: loser.claim_job(job, 60.0), DEADLINE_S, "the expired lease to be claimable")
    assert winner.pending_jobs() == []
    loser.release_job(job)
    assert [j.series_uid for j in winner.pending_jobs()] == ["1.2.3"]
    assert winner.claim_job(job, 60.0)


def test_a_send_is_leased_to_one_owner_until_updated_or_expired(stores: tuple[JobStore, JobStore]) -> None:
    """claim_send leases a pending, due ticket to one owner: the other neither claims it nor sees
    it pending; update_send clears the claim; an expired lease frees it; a ticket not yet due
    or settled is never claimed."""
    a, b = stores
    ticket = a.add_send("1.2.3", 1, "PACS@h:1", [Path("/r/sr.dcm")])
    assert b.add_send("1.2.3", 1, "PACS@h:1", [Path("/r/sr.dcm")]) == ticket, "created twice"
    claims = _race([lambda s=s: s.claim_send(ticket.name, 60.0) for s in [a, b] * (RACERS // 2)])  # type: ignore[misc]
    claimed = [c for c in claims if c is not None]
    assert [c is not None for c in claims] in (A_WON, B_WON)
    assert claimed[0].name == ticket.name
    holder, other = (a, b) if claims[0] is not None else (b, a)
    assert other.claim_send(ticket.name, 60.0) is None
    assert other.pending_sends() == [] and [t.name for t in holder.pending_sends()] == [ticket.name]
    holder.update_send(replace(claimed[0], attempts=1, next_attempt_at=time.time() + 3600))
    assert [t.name for t in other.pending_sends()] == [ticket.name], "the update kept the claim"
    assert other.claim_send(ticket.name, 60.0) is None, "claimed before it was due"
    holder.update_send(claimed[0])  # due again
    assert other.claim_send(ticket.name, 0.2) is not None
    wait_until(lambda: holder.claim_send(ticket.name, 60.0) is not None, DEADLINE_S,
               "the expired send lease to be claimable")
    done = holder.send(ticket.name)
    assert done is not None
    holder.update_send(replace(done, state=SendState.DONE))
    assert other.claim_send(ticket.name, 60.0) is None and holder.pending_sends() == []
    assert a.queue_counts() == {"jobs": 0, "sends": 0}


def test_arrivals_keep_the_latest_time_and_clear_only_what_was_seen(
        stores: tuple[JobStore, JobStore]) -> None:
    """record_arrival keeps each series' latest instance time and ORs STAT; clear_arrivals removes
    and returns only rows no later than what the completing receiver saw; stale_arrivals lists
    rows older than a time."""
    a, b = stores
    a.record_arrival("1.2", "1.2.3", 100.0)
    b.record_arrival("1.2", "1.2.3", 90.0, stat=True)
    b.record_arrival("1.2", "1.2.4", 150.0)
    a.record_arrival("1.5", "1.5.1", 10.0)
    assert a.latest_arrival("1.2") == 150.0 and b.latest_arrival("9.9") is None
    assert b.stale_arrivals(older_than=120.0) == [Arrival("1.2", "1.2.3", 100.0, True),
                                                  Arrival("1.5", "1.5.1", 10.0, False)]
    assert a.clear_arrivals("1.2", not_after=120.0) == [Arrival("1.2", "1.2.3", 100.0, True)]
    assert b.latest_arrival("1.2") == 150.0, "a later series' row was cleared"
    assert b.clear_arrivals("1.2", not_after=150.0) == [Arrival("1.2", "1.2.4", 150.0, False)]
    assert a.latest_arrival("1.2") is None


def test_a_named_lease_has_one_holder_at_a_time(stores: tuple[JobStore, JobStore]) -> None:
    """hold_lease: of two owners racing for a free lease one gets it; the holder extends it; the
    other gets it only once it expired."""
    a, b = stores
    held = _race([lambda s=s: s.hold_lease("retention", 60.0) for s in [a, b] * (RACERS // 2)])  # type: ignore[misc]
    assert held in (A_WON, B_WON)
    holder, other = (a, b) if held[0] else (b, a)
    assert holder.hold_lease("retention", 0.2)
    assert not other.hold_lease("retention", 60.0)
    wait_until(lambda: other.hold_lease("retention", 60.0), DEADLINE_S, "the expired lease to pass on")
    assert not holder.hold_lease("retention", 60.0)
    assert other.hold_lease("other-task", 60.0) and holder.hold_lease("third-task", 60.0)


def test_migrations_run_once_and_a_newer_schema_is_refused(url: str) -> None:
    """Opening a database migrates it to SCHEMA_VERSION (processes opening it together do so
    once); one whose schema_version is newer than the code knows raises SchemaTooNew."""
    opened = _race([lambda: Database(url) for _ in range(4)])
    with opened[0].transaction() as conn:
        versions = conn.execute(sa.select(state_schema.schema_version.c.version)).scalars().all()
        assert versions == [SCHEMA_VERSION]
        conn.execute(state_schema.schema_version.update().values(version=SCHEMA_VERSION + 1))
    for db in opened:
        db.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}"):
        Database(url)


def test_an_unreachable_postgresql_names_it_without_its_password() -> None:
    """A PostgreSQL URL whose port nobody listens on raises DatabaseUnavailable naming the host and
    the database, never the password."""
    with refused_port() as port, pytest.raises(DatabaseUnavailable) as caught:
        Database(f"postgresql://reader:{PASSWORD}@{LOCALHOST}:{port}/statedb")
    message = str(caught.value)
    assert f"{LOCALHOST}:{port}/statedb" in message and PASSWORD not in message, message


def test_an_unopenable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    """A SQLite path in a missing folder raises DatabaseUnavailable naming the file."""
    path = tmp_path / "missing" / "state.db"
    with pytest.raises(DatabaseUnavailable, match=r"state\.db"):
        Database(f"sqlite:///{path}")


def test_a_postgresql_restart_is_survived(postgres: str, postgres_server: PostgresServer,
                                          tmp_path: Path) -> None:
    """While the server is down a store raises DatabaseUnavailable (a StorageError the workers back
    off on) without the password; once it is back the same store works again (stale pooled
    connections are replaced)."""
    store = JobStore(Spool(tmp_path / "data", min_free_bytes=0), database=Database(postgres), owner="a")
    assert store.enqueue_if_changed("1.2", "1.2.3", ("1.2.3.1",)) is not None
    postgres_server.stop()
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            store.series_state("1.2.3")
        assert PASSWORD not in str(caught.value)
    finally:
        postgres_server.start()
    state = store.series_state("1.2.3")
    assert state is not None and state.version == 1
    store.database.close()


def test_every_error_while_postgresql_stops_and_starts_is_database_unavailable(
        postgres: str, postgres_server: PostgresServer, tmp_path: Path) -> None:
    """Threads reading and writing through the state layer while the server is stopped and started
    three times see only DatabaseUnavailable: never a socket's ConnectionResetError nor the FATAL
    "shutting down" / "starting up" answers (SQLSTATE 57P03) that pg8000 raises as other errors, on
    which a worker would record a series as failed or a worker's loop would end. (A test of what we
    rely on in pg8000 and SQLAlchemy: it fails when they change how a lost server is raised.)"""
    store = JobStore(Spool(tmp_path / "data", min_free_bytes=0), database=Database(postgres), owner="a")
    calls = [lambda: store.enqueue_if_changed("1.2", "1.2.3", (f"1.2.3.{time.monotonic_ns()}",)),
             store.pending_jobs, lambda: store.record_arrival("1.2", "1.2.3", time.time()),
             store.queue_counts]
    failures: dict[str, int] = {}
    done = threading.Event()

    def hammer(call: Callable[[], object]) -> None:
        while not done.is_set():
            try:
                call()
            except DatabaseUnavailable:
                failures["DatabaseUnavailable"] = failures.get("DatabaseUnavailable", 0) + 1
            except Exception as exc:  # noqa: BLE001 - what else escapes is the finding
                name = f"{type(exc).__name__}: {exc}"[:200]
                failures[name] = failures.get(name, 0) + 1
            done.wait(0.002)

    threads = [threading.Thread(target=hammer, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            postgres_server.stop()
            postgres_server.start()
    finally:
        done.set()
        for t in threads:
            t.join(DEADLINE_S)
    assert failures.get("DatabaseUnavailable"), "the outages went unnoticed"
    assert set(failures) == {"DatabaseUnavailable"}, failures
    assert store.queue_counts()["jobs"] == 1
    store.database.close()


def test_json_state_of_an_earlier_version_is_imported_once(url: str, tmp_path: Path) -> None:
    """A data dir with the JSON state of an earlier version (series, jobs, pending and archived
    tickets, lineages) and an empty database: the first store imports it all, keeps the ticket in
    ``state/sends/`` where both copies exist, and moves the folders to ``state/imported-json/``;
    folders found again later are moved aside, never imported twice."""
    spool = Spool(tmp_path / "data", min_free_bytes=0)
    spool.write_state("series", "1.2.3", {
        "study_uid": "1.2", "series_uid": "1.2.3", "version": 2, "instances": ["1.2.3.1"], "status": "queued",
        "reason": "", "updated_at": 5.0, "flag": None, "model": {"name": "m"}, "timeline": None})
    spool.write_state("jobs", "1.2.3", {"study_uid": "1.2", "series_uid": "1.2.3", "version": 2,
                                        "instances": ["1.2.3.1"], "priority": 1, "created_at": 4.0})
    ticket = {"name": "1.2.3-v1-abc", "series_uid": "1.2.3", "version": 1, "destination": "PACS@h:1",
              "files": ["/r/sr.dcm"], "state": "pending", "attempts": 2, "next_attempt_at": 9.0,
              "last_error": "refused", "last_status": None, "created_at": 3.0, "lineage": "",
              "updated_at": 3.5}
    spool.write_state("sends", ticket["name"], ticket)
    spool.write_state("sends-archive", ticket["name"], {**ticket, "state": "done"})
    spool.write_state("sends-archive", "1.2.3-v0-abc", {**ticket, "name": "1.2.3-v0-abc", "version": 0,
                                                        "state": "superseded"})
    spool.write_state("studies", "1.2-0000abcd", {"reads": [
        {"series_uid": "1.2.3", "instances": ["1.2.3.1"], "version": 1}]})
    store = JobStore(spool, database=Database(url), owner="a")
    state = store.series_state("1.2.3")
    assert state is not None and (state.version, state.model, state.updated_at) == (2, {"name": "m"}, 5.0)
    assert [(j.series_uid, j.version, j.priority) for j in store.pending_jobs()] == [("1.2.3", 2, 1)]
    pending = [(t.name, t.state, t.attempts) for t in store.pending_sends()]
    assert pending == [(ticket["name"], SendState.PENDING, 2)], "the copy in state/sends/ is not the truth"
    assert {t.name: t.state for t in store.sends()} == {ticket["name"]: SendState.PENDING,
                                                        "1.2.3-v0-abc": SendState.SUPERSEDED}
    assert store.study_result_version("1.2-0000abcd", "1.2.3", ("1.2.3.1",), 1) == 1, "lineage lost"
    imported = tmp_path / "data" / "state" / "imported-json"
    assert {p.name for p in imported.iterdir()} == {"jobs", "series", "sends", "sends-archive", "studies"}
    assert not any((tmp_path / "data" / "state" / k).exists() for k in ("series", "jobs", "sends", "studies"))
    spool.write_state("series", "1.2.9", {**vars(state), "series_uid": "1.2.9", "status": "done"})
    again = JobStore(spool, database=Database(url), owner="b")
    assert again.series_state("1.2.9") is None, "imported into a database that holds state"
    assert (imported / "series-2" / "1.2.9.json").is_file()
    store.database.close()
    again.database.close()
