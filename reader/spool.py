"""The data dir on disk: layout, atomic writes, durable JSON state files.

Layout (every hand-over between stages is a file, written atomically)::

    <data_dir>/
      tmp/                                   partial writes, same filesystem, renamed into place
      tmp/<process>/                         the same, of one process of a cluster (``--role``)
      processes/<process>.lock               held (flock) by that process while it runs
      incoming/<study>/<series>/<sop>.dcm    received instances, exactly the peer's bytes (PS3.10 file)
      state.db                               series, jobs, lineages, send tickets (reader.state, SQLite;
                                             a cluster's are in PostgreSQL instead)
      state/holds/<study>.json               instances a backfilled study waits for (reader.holds)
      state/backfill/<run>/<study>.json      a backfill's progress, one record per study (reader.backfill)
      state/purging/<name>.json              deletions under way (reader.retention)
      results/<series>/v<N>/<kind>.dcm       encoded SEG/SR of result version N
      node.lock                              held (flock) by the running single node

A write is durable once :func:`atomic_write` returns: data fsynced, renamed, directory fsynced.
UIDs become file names only after :func:`check_uid` (PS3.5 9.1: digits and dots, at most 64
characters), so a crafted UID cannot escape the data dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from reader.errors import InputRejected, OutOfResources, StorageError

__all__ = ["Spool", "atomic_write", "check_uid"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros occur in the wild; still safe


def check_uid(uid: object, what: str) -> str:
    """Return ``uid`` if it is a syntactically valid UID (PS3.5 9.1), else raise InputRejected."""
    if not isinstance(uid, str):
        raise InputRejected("invalid_uid", f"{what} missing")
    text = uid.strip("\0 ")
    if not 0 < len(text) <= 64 or not _UID_RE.match(text):
        raise InputRejected("invalid_uid", f"{what} is not a valid UID")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(path: Path) -> IO[bytes] | None:
    """``path`` opened and flock-ed (exclusive, not waiting): the open file, which holds the lock
    until it is closed or the process ends; None while another open file holds it."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in {errno.EAGAIN, errno.EACCES}:
            return None
        raise StorageError(f"cannot lock {path.name}: {exc.strerror}") from exc
    return handle


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for folder in reversed(missing):  # mkdir(parents=True) would give the parents default modes
        folder.mkdir(mode=0o700, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".w-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StorageError(f"cannot write {path.name}: {exc.strerror}") from exc
    _fsync_dir(path.parent)
    for folder in missing:  # each new folder's entry must be durable too
        _fsync_dir(folder.parent)


@dataclass(frozen=True)
class Spool:
    """Paths and durable reads/writes under one data dir."""

    root: Path
    min_free_bytes: int = 512 * 1024 * 1024
    process: str = ""  # a cluster process's name (:meth:`claim_process`): its own ``tmp/<process>/``

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)  # instances carry patient data: the service user alone reads them
        for sub in ("tmp", "incoming", "state", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.process:
            self.tmp.mkdir(exist_ok=True, mode=0o700)

    @property
    def tmp(self) -> Path:
        """Where this process stages its writes: ``tmp/``, or ``tmp/<process>/`` in a cluster."""
        return self.root / "tmp" / self.process if self.process else self.root / "tmp"

    def remove_partial_writes(self) -> int:
        """Delete what this process's writes interrupted by a crash left in :attr:`tmp`; returns
        how many. Another process's staged files (a cluster shares the storage) are left alone.

        Only the node calls this, at start-up, before anything writes: ``reader status`` opens
        the same spool while a node may be writing.
        """
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_file():
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
                    removed += 1
        return removed

    def claim_process(self, base: str) -> tuple[str, IO[bytes]]:
        """The first free process name among ``base``, ``base-2``, ``base-3``... on this storage,
        and its lock (``processes/<name>.lock``, an flock held until the file is closed or the
        process ends). The same name comes back after a restart, so the process finds and cleans
        its own staged files (:meth:`remove_partial_writes`)."""
        folder = self.root / "processes"
        folder.mkdir(exist_ok=True, mode=0o700)
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}-{n}"
            handle = _try_lock(folder / f"{name}.lock")
            if handle is not None:
                return name, handle
        raise StorageError(f"no free process name {base}-N under {folder}")

    # --- the running node ------------------------------------------------------------------
    def lock_node(self) -> IO[bytes]:
        """Take the data dir's node lock (``node.lock``, an flock held until the returned file is
        closed or the process ends, SIGKILL included); StorageError when another process holds it."""
        handle = _try_lock(self.root / "node.lock")
        if handle is None:
            raise StorageError(f"another reader node is using {self.root}")
        return handle

    def node_running(self) -> bool:
        """True while a node holds the data dir's lock (:meth:`lock_node`), or a process of a
        cluster holds its name on this storage (:meth:`claim_process`; one on this machine, or on
        another where the shared filesystem passes flock on, as NFSv4 does)."""
        for lock in [self.root / "node.lock", *sorted((self.root / "processes").glob("*.lock"))]:
            handle = _try_lock(lock)
            if handle is None:
                return True
            handle.close()
        return False

    # --- deleting (reader.retention) ---------------------------------------------------------
    def remove_file(self, path: Path) -> int:
        """Delete one file; its size in bytes, or 0 when it was already gone. Durable once
        :meth:`sync_folder` ran on its folder."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def sync_folder(self, folder: Path) -> None:
        """Make the deletions in ``folder`` durable (fsync), if it still exists."""
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(folder)

    def prune_empty(self, folder: Path, top: Path) -> None:
        """Remove ``folder`` and then its parents while they are empty, up to (not including) ``top``."""
        while folder != top and top in folder.parents:
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    return
                raise StorageError(f"cannot remove {folder.name}: {exc.strerror}") from exc
            self.sync_folder(folder.parent)
            folder = folder.parent

    # --- instances -------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; the UIDs must have passed :func:`check_uid`."""
        return self.root / "incoming" / study_uid / series_uid / f"{sop_uid}.dcm"

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store one received instance; storing the same SOP Instance UID again replaces it."""
        path = self.instance_path(study_uid, series_uid, sop_uid)
        atomic_write(path, data, self.tmp)
        return path

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The folder holding a series' instances."""
        return self.root / "incoming" / study_uid / series_uid

    def series_instances(self, study_uid: str, series_uid: str) -> list[Path]:
        """The stored instance files of a series, sorted by name."""
        folder = self.series_dir(study_uid, series_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def stored_series(self) -> Iterator[tuple[str, str]]:
        """(study UID, series UID) of every series with stored instances."""
        for study in sorted((self.root / "incoming").iterdir()):
            if study.is_dir():
                for series in sorted(study.iterdir()):
                    if series.is_dir():
                        yield study.name, series.name

    def study_series(self, study_uid: str) -> list[str]:
        """Series UIDs of a study with stored instances, sorted."""
        folder = self.root / "incoming" / study_uid
        if not folder.is_dir():
            return []
        return sorted(series.name for series in folder.iterdir() if series.is_dir())

    def check_free_space(self) -> None:
        """Raise OutOfResources when the data dir's filesystem is below the free-space watermark."""
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise OutOfResources(f"{free} bytes free, watermark {self.min_free_bytes}")

    def check_writable(self) -> None:
        """Write, sync and delete a small file where writes are staged; StorageError if that fails."""
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix=".probe-")
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            raise StorageError(f"data dir not writable: {exc.strerror}") from exc

    # --- results ---------------------------------------------------------------------------
    def result_path(self, series_uid: str, version: int, kind: str, suffix: str = ".dcm") -> Path:
        """Where result ``kind`` of a result version is kept: "seg", "sr", "kos" (DICOM), or a
        rendered notification ("hl7-...", suffix ".hl7"; "webhook", suffix ".json")."""
        return self.root / "results" / series_uid / f"v{version}" / f"{kind}{suffix}"

    def write_result(self, series_uid: str, version: int, kind: str, data: bytes,
                     suffix: str = ".dcm") -> Path:
        """Durably store an encoded result object or rendered notification."""
        path = self.result_path(series_uid, version, kind, suffix)
        atomic_write(path, data, self.tmp)
        return path

    # --- JSON state ------------------------------------------------------------------------
    def state_path(self, kind: str, name: str) -> Path:
        """The JSON file of a piece of state (``kind`` is holds, backfill/<run> or purging)."""
        return self.root / "state" / kind / f"{name}.json"

    def write_state(self, kind: str, name: str, value: dict[str, Any]) -> None:
        """Durably replace a state file."""
        atomic_write(self.state_path(kind, name), json.dumps(value, indent=1).encode(), self.tmp)

    def read_state(self, kind: str, name: str) -> dict[str, Any] | None:
        """A state file's content, or None when it does not exist."""
        try:
            value = json.loads(self.state_path(kind, name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise StorageError(f"state {kind}/{name} unreadable: {exc}") from exc
        if not isinstance(value, dict):
            raise StorageError(f"state {kind}/{name} is not an object")
        return value

    def list_state(self, kind: str) -> list[str]:
        """Names of all state files of a kind, sorted."""
        return sorted(p.stem for p in (self.root / "state" / kind).glob("*.json"))

    def delete_state(self, kind: str, name: str) -> None:
        """Remove a state file (durably) if it exists."""
        path = self.state_path(kind, name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_dir(path.parent)
