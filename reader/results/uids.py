"""Deterministic UIDs for the derived objects (PS3.5 B.2: "2.25." followed by a UUID as an integer).

Encoding the same result twice must give the same Series/SOP Instance UIDs, so that a resend after
a crash replaces the earlier object at the PACS instead of duplicating it; a new ``result_version``
(e.g. after a model update or a re-run on request) gives new ones.

The UUIDs are name-based (RFC 9562 version 5) over all inputs. ``pydicom.uid.generate_uid`` is not
used: with ``prefix=None`` pydicom 3 ignores ``entropy_srcs`` and returns a random UUID, and it
concatenates entropy sources without a separator.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial

from reader.findings import AlgorithmIdentity

__all__ = ["device_observer_uid", "model_identity", "result_uid", "result_uids"]

# Fixed namespace of this project's name-based UUIDs; never change it (UIDs would all change).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-second-reader:uid")
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in UIDs, names or versions we accept


def _uid(*fields: str) -> str:
    """A "2.25." UID from a version-5 UUID over ``fields`` joined by a separator (<= 44 chars)."""
    if any(_SEPARATOR in field for field in fields):
        raise ValueError("UID inputs must not contain the ASCII unit separator")
    return f"2.25.{uuid.uuid5(_NAMESPACE, _SEPARATOR.join(fields)).int}"


def result_uid(
    source_series_uid: str,
    model_name: str,
    model_version: str,
    result_version: int,
    kind: str,
) -> str:
    """A UID determined by every argument; ``kind`` e.g. "seg-series", "sr-instance", "finding-1"."""
    if result_version < 1:
        raise ValueError(f"result_version must be >= 1, got {result_version}")
    if not source_series_uid or not model_name or not kind:
        raise ValueError("source_series_uid, model_name and kind must not be empty")
    return _uid("result/1", source_series_uid, model_name, model_version, str(result_version), kind)


def result_uids(
    source_series_uid: str, algorithm: AlgorithmIdentity, result_version: int
) -> Callable[[str], str]:
    """``kind -> UID`` for one result: :func:`result_uid` with the model's :func:`model_identity`."""
    return partial(result_uid, source_series_uid, algorithm.name, model_identity(algorithm), result_version)


def model_identity(algorithm: AlgorithmIdentity) -> str:
    """What identifies a model's weights in UIDs: ``sha256:<digest>`` of the graph that ran, or the
    free-text version only for hand-made results that carry no digest (tests)."""
    return f"sha256:{algorithm.weights_sha256}" if algorithm.weights_sha256 else algorithm.version


def device_observer_uid(algorithm: AlgorithmIdentity) -> str:
    """Device Observer UID (TID 1004) of the algorithm: stable per model name, weights
    (:func:`model_identity`) and source."""
    return _uid("device/1", algorithm.name, model_identity(algorithm), algorithm.source)
