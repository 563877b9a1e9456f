"""Query/Retrieve SCU (PS3.4 Annex C, Study Root information model) against a source PACS.

:class:`QueryRetrieveSCU` opens one association per call and:

- :meth:`~QueryRetrieveSCU.find_studies` yields the matching studies one C-FIND response at a time
  (pynetdicom hands over each pending response as it is decoded), so a query that matches thousands
  of studies is never turned into a list here; ``limit`` stops it early (the association is
  aborted, so the PACS stops sending);
- :meth:`~QueryRetrieveSCU.find_instances` lists a study's series (optionally of one modality) and
  their SOP Instance UIDs (a SERIES-level, then an IMAGE-level C-FIND per series: the hierarchical
  query of PS3.4 C.4.1.3.1);
- :meth:`~QueryRetrieveSCU.move` asks the PACS to C-STORE a series, or some of its instances, to a
  destination AE title (C-MOVE, PS3.4 C.4.2); its :class:`MoveOutcome` gives the sub-operation
  counts and the Failed SOP Instance UID List (0008,0058) of a partial success;
- :meth:`~QueryRetrieveSCU.get` retrieves them on the same association instead (C-GET, PS3.4
  C.4.3: we take the Storage SCP role for the image classes the node reads), for a PACS that
  cannot connect back to the node; each instance is handed, as the peer's Part 10 bytes, to a
  callback.

An association that cannot be made, a DIMSE timeout, an abort, or a failure status raise
:class:`reader.errors.RetrieveError`; the ``reader backfill`` command turns it into one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from reader.errors import ReaderError, RetrieveError
from reader.requestor import keep_responses_for_caller
from reader.scp import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES
from reader.send import validate_ae_title

__all__ = [
    "MOVE_DESTINATION_UNKNOWN",
    "SUBOPERATIONS_FAILED",
    "MoveOutcome",
    "QueryRetrieveSCU",
    "SeriesInstances",
    "StudyMatch",
    "StudyQuery",
]

log = structlog.get_logger(__name__)

# C-FIND / C-MOVE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5) beyond reader.dimse's general ones.
SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
PENDING_WARNING: Final = 0xFF01
CANCEL: Final = 0xFE00
SUBOPERATIONS_FAILED: Final = 0xB000
"""C-MOVE warning: sub-operations complete, one or more failures or warnings."""
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
"""C-MOVE refused: the PACS does not know the destination AE title."""

_PENDING: Final = frozenset({PENDING, PENDING_WARNING})
_PROCESSING_FAILURE: Final = 0x0110  # our answer to a C-GET sub-operation we could not store


@dataclass(frozen=True)
class StudyQuery:
    """What to look for: a study date range (inclusive), a modality in the study, an accession."""

    since: date | None = None
    until: date | None = None
    modality: str | None = None
    accession: str | None = None

    def identifier(self) -> Dataset:
        """The STUDY-level C-FIND identifier (PS3.4 C.6.2.1): matching keys and the return keys read."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyDate = _date_range(self.since, self.until)
        ds.ModalitiesInStudy = self.modality or ""
        ds.AccessionNumber = self.accession or ""
        ds.NumberOfStudyRelatedInstances = ""
        return ds


def _date_range(since: date | None, until: date | None) -> str:
    if since is None and until is None:
        return ""
    start = since.strftime("%Y%m%d") if since else ""
    end = until.strftime("%Y%m%d") if until else ""
    return f"{start}-{end}" if start != end else start


@dataclass(frozen=True)
class StudyMatch:
    """One study a C-FIND matched (no patient attributes: they are not needed and not logged)."""

    study_uid: str
    study_date: str
    instances: int | None  # Number of Study Related Instances, when the PACS returns it


@dataclass(frozen=True)
class SeriesInstances:
    """One series of a study with the SOP Instance UIDs the PACS holds for it."""

    series_uid: str
    modality: str
    sop_uids: tuple[str, ...]


@dataclass(frozen=True)
class MoveOutcome:
    """The final C-MOVE response: status and sub-operation counts (PS3.4 C.4.2.1.5)."""

    status: int
    completed: int
    failed: int
    warning: int
    failed_sop_uids: tuple[str, ...]  # Failed SOP Instance UID List (0008,0058)

    @property
    def partial(self) -> bool:
        """Not a plain success: some sub-operations failed, or the move failed part-way, so the
        destination may lack instances (the caller checks which)."""
        return self.status != SUCCESS or self.failed > 0 or bool(self.failed_sop_uids)


class QueryRetrieveSCU:
    """C-FIND and C-MOVE against one PACS (``ae_title@host:port``) as ``calling_ae``."""

    def __init__(self, calling_ae: str, ae_title: str, host: str, port: int, *,
                 acse_timeout: timedelta = timedelta(seconds=30),
                 dimse_timeout: timedelta = timedelta(seconds=60),
                 network_timeout: timedelta = timedelta(seconds=60)) -> None:
        self.calling_ae = validate_ae_title(calling_ae, "calling AE title")
        self.ae_title = validate_ae_title(ae_title, "source AE title")
        self.host = host
        self.port = port
        self._acse_s = acse_timeout.total_seconds()
        self._dimse_s = dimse_timeout.total_seconds()
        self._network_s = network_timeout.total_seconds()

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    # -- C-FIND -------------------------------------------------------------------------------------
    def find_studies(self, query: StudyQuery, limit: int | None = None) -> Iterator[StudyMatch]:
        """The studies matching ``query``, as the PACS answers them; at most ``limit``. The
        association stays open while the caller iterates: consume promptly, or stop early."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        count = 0
        try:
            responses = assoc.send_c_find(query.identifier(), StudyRootQueryRetrieveInformationModelFind)
            for identifier in self._pending(responses, "C-FIND"):
                uid = str(identifier.get("StudyInstanceUID", "")).strip()
                if not uid:
                    continue
                number = identifier.get("NumberOfStudyRelatedInstances")
                yield StudyMatch(uid, str(identifier.get("StudyDate", "")),
                                 int(number) if number not in (None, "") else None)
                count += 1
                if limit is not None and count >= limit:
                    break
        finally:
            self._close(assoc, cancelled=limit is not None and count >= limit)

    def find_instances(self, study_uid: str, modality: str | None = None) -> list[SeriesInstances]:
        """The series of ``study_uid`` (only those of ``modality`` when given), each with its SOP
        Instance UIDs, on one association."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        try:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = ""
            q.Modality = ""
            series: list[tuple[str, str]] = []
            for ident in self._pending(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind),
                                       "C-FIND"):
                uid, mod = str(ident.get("SeriesInstanceUID", "")).strip(), str(ident.get("Modality", ""))
                if uid and (modality is None or mod.upper() == modality.upper()):
                    series.append((uid, mod))
            out = []
            for series_uid, mod in series:
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = series_uid
                q.SOPInstanceUID = ""
                sops = [str(i.get("SOPInstanceUID", "")).strip() for i in self._pending(
                    assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind), "C-FIND")]
                out.append(SeriesInstances(series_uid, mod, tuple(sorted({s for s in sops if s}))))
            return out
        finally:
            self._close(assoc)

    # -- C-MOVE -------------------------------------------------------------------------------------
    def get(self, study_uid: str, series_uid: str, store: Callable[[str, bytes], None],
            sop_uids: Sequence[str] = ()) -> MoveOutcome:
        """C-GET a series (or only ``sop_uids`` of it); ``store(sop_uid, part10_bytes)`` is called
        for each instance in the association's thread (an exception in it fails that sub-operation).
        Returns the final response, as :meth:`move`."""
        def on_store(event: evt.Event) -> int:
            try:
                request = cast(C_STORE, event.request)
                store(str(request.AffectedSOPInstanceUID), event.encoded_dataset())
            except (OSError, ValueError, ReaderError) as exc:
                log.warning("backfill.get_store_failed", error=type(exc).__name__)
                return _PROCESSING_FAILURE
            return SUCCESS

        assoc = self._associate(StudyRootQueryRetrieveInformationModelGet, storage=True,
                                handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            final = None
            for status, identifier in assoc.send_c_get(_retrieve_identifier(study_uid, series_uid, sop_uids),
                                                       StudyRootQueryRetrieveInformationModelGet):
                code = _status(status, self, "C-GET")
                if code not in _PENDING:
                    final = (code, identifier, status)
        finally:
            self._close(assoc)
        return self._outcome(final, "C-GET", "")

    def move(self, destination_ae: str, study_uid: str, series_uid: str,
             sop_uids: Sequence[str] = ()) -> MoveOutcome:
        """C-MOVE a series (or only ``sop_uids`` of it, an IMAGE-level move with a UID list) to
        ``destination_ae``; returns the final response, a failure status included. Raises
        RetrieveError when the PACS does not know the destination, or stops answering."""
        q = _retrieve_identifier(study_uid, series_uid, sop_uids)
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove)
        try:
            final: tuple[int, Dataset | None, Dataset] | None = None
            for status, identifier in assoc.send_c_move(q, destination_ae,
                                                        StudyRootQueryRetrieveInformationModelMove):
                code = _status(status, self, "C-MOVE")
                if code not in _PENDING:
                    final = (code, identifier, status)
        finally:
            self._close(assoc)
        return self._outcome(final, "C-MOVE", destination_ae)

    def _outcome(self, final: tuple[int, Dataset | None, Dataset] | None, what: str,
                 destination_ae: str) -> MoveOutcome:
        if final is None:
            raise RetrieveError(f"{self} sent no final {what} response")
        code, identifier, status = final
        if code == MOVE_DESTINATION_UNKNOWN:
            raise RetrieveError(f"{self} does not know the move destination {destination_ae} (0xA801): "
                                "add the node's AE title, host and port to the PACS", code)
        failed_uids: tuple[str, ...] = ()
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            value = identifier.FailedSOPInstanceUIDList
            failed_uids = tuple(str(v) for v in (value if isinstance(value, list | tuple) else [value]) if v)
            failed_uids = tuple(u for v in failed_uids for u in v.split("\\") if u)
        # Any other failure (0xA7xx, 0xA900, 0xC000...) may come after some sub-operations stored
        # instances (Orthanc fails the whole move at the first C-STORE the destination refuses):
        # the caller checks what arrived and moves the rest again.
        return MoveOutcome(code, _count(status, "NumberOfCompletedSuboperations"),
                           _count(status, "NumberOfFailedSuboperations"),
                           _count(status, "NumberOfWarningSuboperations"), failed_uids)

    def echo(self) -> bool:
        """True when the peer accepts an association and answers C-ECHO with success."""
        try:
            assoc = self._associate(Verification)
        except RetrieveError:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == SUCCESS
        finally:
            self._close(assoc)

    # -- association --------------------------------------------------------------------------------
    def _associate(self, abstract_syntax: Any, *, storage: bool = False,
                   handlers: list[Any] | None = None) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self._acse_s
        ae.connection_timeout = self._acse_s
        ae.dimse_timeout = self._dimse_s
        ae.network_timeout = self._network_s
        ae.maximum_pdu_size = 0
        ae.add_requested_context(abstract_syntax)
        roles: list[Any] = []
        if storage:  # C-GET: the PACS sends the instances back on this association, to our SCP role
            for sop_class in IMAGE_STORAGE_CLASSES:
                ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
                roles.append(build_role(sop_class, scp_role=True))
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, ext_neg=roles or None,
                             evt_handlers=handlers or None)
        if not assoc.is_established:
            why = ("rejected the association" if assoc.is_rejected
                   else "did not answer (connection refused, timed out or aborted)")
            raise RetrieveError(f"source PACS {self} {why}")
        keep_responses_for_caller(assoc)
        return assoc

    def _pending(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> Iterator[Dataset]:
        """The identifiers of the pending responses; raises on a failure status or silence."""
        for status, identifier in responses:
            code = _status(status, self, what)
            if code in _PENDING:
                if identifier is not None:
                    yield identifier
            elif code not in (SUCCESS, CANCEL):
                raise RetrieveError(f"{self} answered {what} with status 0x{code:04X}", code)

    def _close(self, assoc: Association, *, cancelled: bool = False) -> None:
        if assoc.is_established:
            if cancelled:
                assoc.abort()  # stop the rest of a C-FIND we no longer read
            else:
                assoc.release()


def _retrieve_identifier(study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> Dataset:
    """A SERIES-level retrieve identifier, or IMAGE level with a list of SOP Instance UIDs."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE" if sop_uids else "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    if sop_uids:
        q.SOPInstanceUID = list(sop_uids)
    return q


def _status(status: Dataset, scu: QueryRetrieveSCU, what: str) -> int:
    if not status or "Status" not in status:
        raise RetrieveError(f"no {what} response from {scu} (DIMSE timeout or abort)")
    return int(status.Status)


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else 0
