"""Importing the JSON state of a data dir written before the state database (issue 18).

Before ``reader.state``, the job store kept one JSON file per piece of state: ``state/series/``,
``state/jobs/``, ``state/sends/`` (pending tickets, and where a crash left both copies, the truth),
``state/sends-archive/`` (settled tickets) and ``state/studies/`` (study lineages). The first open
of such a data dir with an empty database imports them all in one transaction
(:func:`import_json_state`) and then moves the folders to ``state/imported-json/``, kept for an
operator to delete; a crash between the two leaves folders that the next open moves without
importing again (the database is no longer empty). Holds, backfill progress and purge markers stay
files and are not touched.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from reader.errors import StorageError
from reader.state import schema
from reader.state.database import Database

__all__ = ["LEGACY_KINDS", "import_json_state"]

log = structlog.get_logger(__name__)

LEGACY_KINDS = ("series", "jobs", "sends", "sends-archive", "studies")
IMPORTED = "imported-json"


def _has_legacy(state_dir: Path) -> bool:
    return any(next((state_dir / kind).glob("*.json"), None) is not None for kind in LEGACY_KINDS)


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StorageError(f"legacy state {path.parent.name}/{path.name} unreadable: {exc}") from exc
    if not isinstance(value, dict):
        raise StorageError(f"legacy state {path.parent.name}/{path.name} is not an object")
    return value


def _files(state_dir: Path, kind: str) -> list[Path]:
    return sorted((state_dir / kind).glob("*.json"))


def _empty(conn: Connection) -> bool:
    return all(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
               for table in (schema.series, schema.jobs, schema.sends, schema.study_reads))


def _import(conn: Connection, state_dir: Path) -> int:
    rows = 0
    for path in _files(state_dir, "series"):
        raw = _read(path)
        conn.execute(schema.series.insert().values(
            series_uid=raw["series_uid"], study_uid=raw["study_uid"], version=int(raw["version"]),
            instances=json.dumps(sorted(raw["instances"])), status=raw["status"],
            reason=raw.get("reason", ""), updated_at=float(raw.get("updated_at", 0.0)),
            flag=schema.json_text(raw.get("flag")), model=schema.json_text(raw.get("model")),
            timeline=schema.json_text(raw.get("timeline"))))
        rows += 1
    for path in _files(state_dir, "jobs"):
        raw = _read(path)
        conn.execute(schema.jobs.insert().values(
            series_uid=raw["series_uid"], study_uid=raw["study_uid"], version=int(raw["version"]),
            instances=json.dumps(list(raw["instances"])), priority=int(raw.get("priority", 0)),
            created_at=float(raw.get("created_at", 0.0))))
        rows += 1
    tickets: dict[str, dict[str, Any]] = {}
    for kind in ("sends-archive", "sends"):  # where both copies exist, the one in sends/ is the truth
        for path in _files(state_dir, kind):
            tickets[path.stem] = _read(path)
    for raw in tickets.values():
        lineage = str(raw.get("lineage", ""))
        conn.execute(schema.sends.insert().values(
            name=raw["name"], series_uid=raw["series_uid"], version=int(raw["version"]),
            destination=raw["destination"], files=json.dumps(list(raw["files"])), state=raw["state"],
            attempts=int(raw.get("attempts", 0)), next_attempt_at=float(raw.get("next_attempt_at", 0.0)),
            last_error=raw.get("last_error", ""), last_status=raw.get("last_status"),
            created_at=float(raw.get("created_at", 0.0)), lineage=lineage,
            line=lineage or raw["series_uid"], updated_at=float(raw.get("updated_at", 0.0))))
        rows += 1
    for path in _files(state_dir, "studies"):
        for read in _read(path).get("reads", []):
            version = int(read["version"])
            conn.execute(schema.study_reads.insert().values(
                lineage=path.stem, version=version, series_uid=read["series_uid"],
                instances=json.dumps(sorted(read["instances"])),
                job_version=int(read.get("job_version", version))))  # before job versions: the same job
            rows += 1
    return rows


def _move_aside(state_dir: Path) -> None:
    target = state_dir / IMPORTED
    target.mkdir(mode=0o700, exist_ok=True)
    for kind in LEGACY_KINDS:
        folder = state_dir / kind
        if not folder.is_dir():
            continue
        destination = target / kind
        n = 1
        while destination.exists():
            n += 1
            destination = target / f"{kind}-{n}"
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            folder.rename(destination)
    for folder in (target, state_dir):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def import_json_state(database: Database, data_dir: Path) -> int:
    """Import ``data_dir``'s JSON state into an empty ``database`` and move its folders to
    ``state/imported-json/``; returns the rows imported (0 when there was nothing to import, or the
    database already held state: then the folders are only moved)."""
    state_dir = data_dir / "state"
    if not _has_legacy(state_dir):
        return 0

    def work(conn: Connection) -> int:
        return _import(conn, state_dir) if _empty(conn) else 0
    rows = database.run(work)
    _move_aside(state_dir)
    if rows:
        log.info("state.json_imported", rows=rows)
    else:
        log.warning("state.json_moved_aside", reason="database not empty")
    return rows
