"""A DICOMweb source for ``reader backfill``: QIDO-RS to find, WADO-RS to retrieve (PS3.18 10.6, 10.4).

:class:`DicomWebSource` offers the calls :class:`reader.queryretrieve.QueryRetrieveSCU` offers the
backfill, over HTTP with ``dicomweb-client``:

- :meth:`~DicomWebSource.find_studies` pages through ``GET {url}/studies`` with ``limit`` and
  ``offset`` (``page_size`` matches a request), yielding each match as it comes; nothing is
  gathered beyond one page; the modality is matched on the returned Modalities in Study;
- :meth:`~DicomWebSource.find_instances` lists a study's series (``/studies/{uid}/series``) and
  their instances;
- :meth:`~DicomWebSource.get` retrieves a series (``/studies/{uid}/series/{uid}``, multipart, one
  instance at a time) or some of its instances, and hands each to a callback as Part 10 bytes.

An HTTP error, a refused connection or a timeout raises :class:`reader.errors.RetrieveError`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import pydicom
import requests
import structlog
from dicomweb_client.api import DICOMwebClient

from reader.errors import ReaderError, RetrieveError
from reader.queryretrieve import (
    SUBOPERATIONS_FAILED,
    SUCCESS,
    MoveOutcome,
    SeriesInstances,
    StudyMatch,
    StudyQuery,
)

__all__ = ["DicomWebSource"]

log = structlog.get_logger(__name__)

_PAGE = 100  # studies per QIDO-RS request
_STUDY_DATE, _STUDY_UID, _STUDY_INSTANCES = "00080020", "0020000D", "00201208"
_SERIES_UID, _MODALITY, _SOP_UID, _MODALITIES = "0020000E", "00080060", "00080018", "00080061"


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomWebSource:
    """QIDO-RS and WADO-RS against one DICOMweb root ``url`` (e.g. ``http://pacs/dicom-web``)."""

    def __init__(self, url: str, *, timeout: timedelta = timedelta(seconds=60),
                 page_size: int = _PAGE) -> None:
        self.url = url.rstrip("/")
        self.page_size = page_size
        self._client = DICOMwebClient(url=self.url, timeout=timeout.total_seconds())

    def __str__(self) -> str:
        return self.url

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except requests.RequestException as exc:
            raise RetrieveError(f"source PACS {self} did not answer {what}: {type(exc).__name__}") from exc

    def find_studies(self, query: StudyQuery, limit: int | None = None) -> Iterator[StudyMatch]:
        """The studies matching ``query``, a page at a time; at most ``limit``."""
        filters: dict[str, Any] = {}
        date_range = query.identifier().StudyDate
        if date_range:
            filters["StudyDate"] = date_range
        # Modalities in Study is matched here, not by the server: Orthanc 1.10 applies limit and
        # offset before that filter, so the second page of a filtered search comes back empty.
        if query.accession:
            filters["AccessionNumber"] = query.accession
        offset, count = 0, 0
        while True:
            page: list[dict[str, Any]] = self._call("QIDO-RS", partial(
                self._client.search_for_studies, search_filters=filters, offset=offset, limit=self.page_size,
                fields=["StudyDate", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]))
            for item in page:
                uid = _value(item, _STUDY_UID)
                modalities = {str(m).upper() for m in item.get(_MODALITIES, {}).get("Value") or []}
                if not uid or (query.modality and query.modality.upper() not in modalities):
                    continue
                number = _value(item, _STUDY_INSTANCES)
                yield StudyMatch(uid, _value(item, _STUDY_DATE), int(number) if number else None)
                count += 1
                if limit is not None and count >= limit:
                    return
            if len(page) < self.page_size:
                return
            offset += len(page)

    def find_instances(self, study_uid: str, modality: str | None = None) -> list[SeriesInstances]:
        """The series of ``study_uid`` (only ``modality``'s when given) with their SOP Instance UIDs."""
        series = self._call("QIDO-RS", lambda: self._client.search_for_series(
            study_instance_uid=study_uid, fields=["Modality"]))
        out = []
        for item in series:
            series_uid, mod = _value(item, _SERIES_UID), _value(item, _MODALITY)
            if not series_uid or (modality is not None and mod.upper() != modality.upper()):
                continue
            instances = self._call("QIDO-RS", partial(
                self._client.search_for_instances, study_instance_uid=study_uid,
                series_instance_uid=series_uid, get_remaining=True))
            sops = sorted({_value(i, _SOP_UID) for i in instances} - {""})
            out.append(SeriesInstances(series_uid, mod, tuple(sops)))
        return out

    def get(self, study_uid: str, series_uid: str, store: Callable[[str, bytes], None],
            sop_uids: Sequence[str] = ()) -> MoveOutcome:
        """WADO-RS retrieve of a series (or ``sop_uids`` of it, one request each); ``store(sop_uid,
        part10_bytes)`` per instance. An instance the PACS does not return, or that ``store``
        refuses, counts as a failed sub-operation."""
        counts = {"completed": 0, "failed": 0}

        def keep(ds: pydicom.Dataset) -> None:
            buffer = io.BytesIO()
            try:
                ds.save_as(buffer, enforce_file_format=True)
                store(str(ds.SOPInstanceUID), buffer.getvalue())
                counts["completed"] += 1
            except (OSError, ValueError, AttributeError, ReaderError) as exc:
                log.warning("backfill.get_store_failed", error=type(exc).__name__)
                counts["failed"] += 1

        try:
            if not sop_uids:
                for ds in self._client.iter_series(study_uid, series_uid):
                    keep(ds)
            for sop in sop_uids:
                try:
                    keep(self._client.retrieve_instance(study_uid, series_uid, sop))
                except requests.HTTPError:
                    counts["failed"] += 1
        except requests.RequestException as exc:
            raise RetrieveError(f"source PACS {self} did not answer WADO-RS: {type(exc).__name__}") from exc
        status = SUBOPERATIONS_FAILED if counts["failed"] else SUCCESS
        return MoveOutcome(status, counts["completed"], counts["failed"], 0, ())
