"""Shared fixtures: real Orthanc (tests/peers.py), MLLP listener and webhook receiver
(tests/worklist_peers.py), the shared CT with a tumour finding (tests/results_helpers.py), and a
real PostgreSQL server with a fresh database per test (tests/postgres.py)."""

from tests.peers import orthanc, orthanc_factory
from tests.postgres import postgres, postgres_server
from tests.results_helpers import box, positive, volume
from tests.worklist_peers import listener, receiver

__all__ = ["box", "listener", "orthanc", "orthanc_factory", "positive", "postgres", "postgres_server",
           "receiver", "volume"]
