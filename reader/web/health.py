"""Health probes for systemd, compose and Kubernetes: is the node alive, is it ready for studies.

``/healthz`` answers while the process serves HTTP at all. ``/readyz`` runs the checks below and
answers 200 only when every one passes; otherwise 503 with the names of the failed checks, each
with a short reason (no patient data, no paths beyond the data dir's own state):

- ``models``: every model a route refers to is loaded;
- ``spool``: a file can be written and synced where instances are staged;
- ``disk``: free space on the data dir is above ``min_free_disk_bytes`` (the watermark below
  which C-STORE and STOW-RS refuse instances);
- ``dicom_listener``: the DICOM port is open (a cluster's worker has none: always ok);
- ``database``: the state database answers a query (only where one is given: a cluster's
  PostgreSQL, which other machines may lose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from reader.errors import StorageError
from reader.spool import Spool

__all__ = ["CheckResult", "Readiness"]

log = structlog.get_logger(__name__)

CHECK_MODELS = "models"
CHECK_SPOOL = "spool"
CHECK_DISK = "disk"
CHECK_LISTENER = "dicom_listener"
CHECK_DATABASE = "database"


@dataclass(frozen=True)
class CheckResult:
    """One readiness check: its name, whether it passed, and why not."""

    name: str
    ok: bool
    reason: str = ""


class Readiness:
    """The readiness checks of one node; :meth:`check` runs them all (blocking file I/O)."""

    def __init__(self, spool: Spool, required_models: Iterable[str], loaded_models: Iterable[str],
                 listening: Callable[[], bool], database: Callable[[], object] | None = None) -> None:
        """``database``: a query of the state database, which raises StorageError when it cannot
        be reached (None: no such check)."""
        self._database = database
        self._spool = spool
        self._missing_models = sorted(set(required_models) - set(loaded_models))
        self._listening = listening
        self._last_ready: bool | None = None

    def check(self) -> list[CheckResult]:
        """Run every check; logs ``node.readiness`` when the overall answer changes."""
        results = [self._models(), self._spool_writable(), self._disk(), self._listener()]
        if self._database is not None:
            results.append(self._database_answers(self._database))
        ready = all(r.ok for r in results)
        if ready != self._last_ready:
            self._last_ready = ready
            log.info("node.readiness", ready=ready, failed=[r.name for r in results if not r.ok])
        return results

    def _models(self) -> CheckResult:
        if self._missing_models:
            return CheckResult(CHECK_MODELS, False, "not loaded: " + ", ".join(self._missing_models))
        return CheckResult(CHECK_MODELS, True)

    def _spool_writable(self) -> CheckResult:
        try:
            self._spool.check_writable()
        except StorageError as exc:
            return CheckResult(CHECK_SPOOL, False, str(exc))
        return CheckResult(CHECK_SPOOL, True)

    def _disk(self) -> CheckResult:
        try:
            self._spool.check_free_space()
        except (StorageError, OSError) as exc:  # below the watermark, or the data dir is gone
            return CheckResult(CHECK_DISK, False, str(exc))
        return CheckResult(CHECK_DISK, True)

    def _listener(self) -> CheckResult:
        if not self._listening():
            return CheckResult(CHECK_LISTENER, False, "the DICOM port is not open")
        return CheckResult(CHECK_LISTENER, True)

    @staticmethod
    def _database_answers(query: Callable[[], object]) -> CheckResult:
        try:
            query()
        except StorageError as exc:
            return CheckResult(CHECK_DATABASE, False, str(exc))
        return CheckResult(CHECK_DATABASE, True)
