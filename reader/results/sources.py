"""Source headers for result encoding: read once per distinct file, made safe for highdicom."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from reader.errors import EncodingError
from reader.results.clean import prepare_source

__all__ = ["read_source_headers"]


def read_source_headers(paths: Iterable[Path]) -> list[Dataset]:
    """Headers without Pixel Data, one per distinct file in first-seen order, prepared for copying."""
    headers: list[Dataset] = []
    for path in dict.fromkeys(paths):
        try:
            headers.append(prepare_source(pydicom.dcmread(path, stop_before_pixels=True)))
        except (OSError, InvalidDicomError) as exc:
            raise EncodingError(f"cannot read source header {path.name}: {type(exc).__name__}") from exc
    return headers
