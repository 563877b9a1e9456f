"""Shared fixtures: real Orthanc (tests/peers.py), MLLP listener and webhook receiver
(tests/worklist_peers.py)."""

from tests.peers import orthanc, orthanc_factory
from tests.worklist_peers import listener, receiver

__all__ = ["listener", "orthanc", "orthanc_factory", "receiver"]
