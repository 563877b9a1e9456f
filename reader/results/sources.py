"""Source headers for result encoding: read once per distinct file, made safe for highdicom."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from reader.errors import EncodingError
from reader.results.clean import prepare_source, prepared_source
from reader.volume import SourceInstance

__all__ = ["read_source_headers", "source_headers"]


def read_source_headers(paths: Iterable[Path]) -> list[Dataset]:
    """Headers without Pixel Data, one per distinct file in first-seen order, prepared for copying."""
    headers: list[Dataset] = []
    for path in dict.fromkeys(paths):
        try:
            headers.append(prepare_source(pydicom.dcmread(path, stop_before_pixels=True)))
        except (OSError, InvalidDicomError) as exc:
            raise EncodingError(f"cannot read source header {path.name}: {type(exc).__name__}") from exc
    return headers


def source_headers(sources: Iterable[SourceInstance]) -> list[Dataset]:
    """Like :func:`read_source_headers` for the files of ``sources``, without reading them again.

    The header ``load_volume`` kept on each source is used when there is one (never modified: a
    header that needs preparing is copied first); a source without one is read from its file.
    """
    headers: list[Dataset] = []
    valid: dict[tuple[object, ...], bool] = {}
    by_path: dict[Path, SourceInstance] = {}
    for source in sources:
        by_path.setdefault(source.path, source)
    for path, source in by_path.items():
        if source.header is None:
            headers.extend(read_source_headers([path]))
        else:
            headers.append(prepared_source(source.header, valid))
    return headers
