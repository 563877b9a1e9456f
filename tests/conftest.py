"""Shared fixtures: real Orthanc peers (tests/peers.py)."""

from tests.peers import orthanc, orthanc_factory

__all__ = ["orthanc", "orthanc_factory"]
