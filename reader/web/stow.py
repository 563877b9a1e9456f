"""STOW-RS in (PS3.18 10.5 Store Transaction): instances POSTed over HTTP, stored as C-STORE does.

A request is ``POST /dicom-web/studies[/{study}]`` with a ``multipart/related;
type="application/dicom"`` body, one Part 10 file per part. It is handled in two phases:

1. every part is parsed and checked first (:func:`read_request`). A body that is not multipart,
   or a part that is not a DICOM Part 10 file, refuses the whole request (HTTP 400, or 415 for a
   media type other than multipart/related of application/dicom), and nothing of it is stored;
2. each instance that can be stored goes through ``reader.intake.store_received``, the very
   function the C-STORE handler calls: same free-disk watermark, same atomic write, same
   completion bookkeeping. The request counts as one "association" for ``CompletionTracker``: it
   is told the request ended once every instance is stored, so the study completes ``grace``
   later, as after an A-RELEASE.

Instances that are DICOM but cannot be stored are answered in the Failed SOP Sequence with a
Failure Reason (PS3.18 10.5.3, codes of PS3.4 B.2.3 and PS3.7 C): a Study Instance UID other than
the URL's (0xA900), a SOP Class or Transfer Syntax the node does not accept (0x0122, 0xC122; the
same lists as the DICOM listener negotiates), missing or malformed UIDs (0xC000), free disk below
the watermark (0xA700), a failed write (0x0110). The response is the Store Instances Response
dataset as ``application/dicom+json``: 200 when all were stored, 202 when some were, 409 when none.

Like the C-STORE handler, this only stores: pixel data is never decoded here.
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass
from email.message import Message
from typing import TYPE_CHECKING, Final

import pydicom
import structlog
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser

from reader import dimse
from reader.assemble import CompletionTracker
from reader.errors import InputRejected, OutOfResources, RequestRejected, StorageError
from reader.intake import InstanceIds, instance_ids, store_received
from reader.metrics import PROTOCOL_STOW, NodeMetrics
from reader.scp import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES
from reader.spool import Spool

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from reader.audit import AuditTrail

__all__ = ["MEDIA_DICOM", "MEDIA_DICOM_JSON", "Instance", "StowResult", "read_request", "store_request"]

log = structlog.get_logger(__name__)

MEDIA_DICOM: Final = "application/dicom"
MEDIA_DICOM_JSON: Final = "application/dicom+json"
TRANSFER_SYNTAX_NOT_SUPPORTED: Final = 0xC122  # PS3.18 Store Instances Response failure reason

HTTP_OK: Final = 200
HTTP_ACCEPTED: Final = 202  # some instances stored, some failed
HTTP_BAD_REQUEST: Final = 400
HTTP_CONFLICT: Final = 409  # no instance stored
HTTP_UNSUPPORTED_MEDIA_TYPE: Final = 415

_ACCEPTED_CLASSES: Final = frozenset(str(c) for c in IMAGE_STORAGE_CLASSES)
_ACCEPTED_SYNTAXES: Final = frozenset(str(t) for t in TRANSFER_SYNTAXES)
# Each request is one "association" for the CompletionTracker; pynetdicom's are id() values (> 0).
_request_ids = itertools.count(-1, -1)


@dataclass(frozen=True)
class Instance:
    """One part of a request, read and judged: ``failure`` is the reason it will not be stored."""

    sop_class_uid: str
    sop_uid: str
    ids: InstanceIds | None
    data: bytes
    failure: int | None = None
    header: Dataset | None = None  # the part's header as phase 1 read it (the audit trail's patient)


@dataclass(frozen=True)
class StowResult:
    """What one request stored and what it did not, with the HTTP status and response dataset."""

    http_status: int
    response: Dataset
    stored: int
    failed: int


def _media_type(header_value: str) -> Message:
    """A Content-Type header value parsed (stdlib ``email``): type, subtype and parameters."""
    if "\r" in header_value or "\n" in header_value:
        raise RequestRejected(HTTP_BAD_REQUEST, "bad_content_type", "Content-Type spans lines")
    header = Message()
    header["Content-Type"] = header_value
    return header


class _Collector:
    """Callbacks of python-multipart's streaming parser: each part's headers and bytes."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], list[bytes]]] = []
        self.ended = False
        self._field: list[bytes] = []
        self._value: list[bytes] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": lambda: self.parts.append(({}, [])),
            "on_header_field": lambda data, start, end: self._field.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.append(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self.parts[-1][1].append(data[start:end]),
            "on_end": self._end,
        }

    def _header_end(self) -> None:
        name = b"".join(self._field).decode("latin-1").strip().lower()
        self.parts[-1][0][name] = b"".join(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self.ended = True


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """``(media type, bytes)`` of each part of a multipart/related body; RequestRejected for another
    media type, a malformed body or one without parts. A part without Content-Type has the
    request's ``type``. The body is split by python-multipart's streaming parser (the one
    Starlette uses for forms), which checks the boundaries and part headers."""
    request_type = _media_type(content_type)
    if request_type.get_content_type() != "multipart/related":
        raise RequestRejected(HTTP_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                              f"expected multipart/related; type=\"{MEDIA_DICOM}\"")
    root_type = request_type.get_param("type")
    if root_type is not None and str(root_type).lower() != MEDIA_DICOM:
        raise RequestRejected(HTTP_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                              f"only type=\"{MEDIA_DICOM}\" is accepted")
    boundary = request_type.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise RequestRejected(HTTP_BAD_REQUEST, "bad_multipart", "Content-Type has no boundary")
    collector = _Collector()
    try:
        parser = MultipartParser(boundary.encode("latin-1"), collector.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, FormParserError, UnicodeEncodeError) as exc:
        raise RequestRejected(HTTP_BAD_REQUEST, "bad_multipart", f"malformed multipart body: {exc}") from exc
    if not collector.ended:
        raise RequestRejected(HTTP_BAD_REQUEST, "bad_multipart", "the body ends before its closing boundary")
    if not collector.parts:
        raise RequestRejected(HTTP_BAD_REQUEST, "bad_multipart", "the body holds no parts")
    return [(_media_type(headers.get("content-type", MEDIA_DICOM)).get_content_type(), b"".join(chunks))
            for headers, chunks in collector.parts]


def _instance(number: int, media_type: str, data: bytes, study_uid: str | None) -> Instance:
    """Read part ``number`` (1-based) as a Part 10 file and judge it; RequestRejected if it is not
    DICOM. Reads the header only; pixel data is not decoded."""
    if media_type != MEDIA_DICOM:
        raise RequestRejected(HTTP_BAD_REQUEST, "not_dicom",
                              f"part {number} is {media_type}, not {MEDIA_DICOM}")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)  # needs the "DICM" prefix
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        sop_class = str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        try:
            ids: InstanceIds | None = instance_ids(ds, ds.file_meta.get("MediaStorageSOPInstanceUID"))
        except InputRejected as exc:
            log.warning("instance.rejected", reason=exc.reason, detail=exc.detail, via="stow-rs")
            ids = None
    except Exception as exc:  # pydicom raises many types on malformed input: all mean "not DICOM"
        raise RequestRejected(HTTP_BAD_REQUEST, "not_dicom",
                              f"part {number} is not a DICOM Part 10 file ({type(exc).__name__})") from exc
    failure = None
    if ids is None:
        failure = dimse.CANNOT_UNDERSTAND
    elif sop_class not in _ACCEPTED_CLASSES:
        failure = dimse.SOP_CLASS_NOT_SUPPORTED
    elif syntax not in _ACCEPTED_SYNTAXES:
        failure = TRANSFER_SYNTAX_NOT_SUPPORTED
    elif study_uid is not None and ids.study_uid != study_uid:
        failure = dimse.DATASET_MISMATCH
    return Instance(sop_class, sop_uid, ids, data, failure, header=ds)


def read_request(content_type: str, body: bytes, study_uid: str | None) -> list[Instance]:
    """Parse and judge every part of a request before anything is stored (phase 1)."""
    return [_instance(n, media_type, data, study_uid)
            for n, (media_type, data) in enumerate(_parts(content_type, body), start=1)]


def store_request(spool: Spool, tracker: CompletionTracker, instances: list[Instance], *,
                  base_url: str, study_uid: str | None, caller: str, address: str = "",
                  audit: AuditTrail | None = None, metrics: NodeMetrics | None = None) -> StowResult:
    """Store the instances that passed phase 1 (phase 2) and build the response (PS3.18 10.5.3);
    the audit trail records what was received, as for an association (PS3.15 A.5.3.5);
    ``metrics`` counts each one stored by the caller's name."""
    started = time.perf_counter()
    request_id = next(_request_ids)
    stored: list[Instance] = []
    failed: list[tuple[Instance, int]] = []
    try:
        for inst in instances:
            reason = inst.failure
            if reason is None and inst.ids is not None:
                try:
                    store_received(spool, tracker, request_id, inst.ids, inst.data)
                    stored.append(inst)
                    if metrics is not None:
                        metrics.instance_received(PROTOCOL_STOW, caller, len(inst.data))
                    if audit is not None:
                        audit.instance_received(request_id, calling_ae=caller, address=address,
                                                study_uid=inst.ids.study_uid,
                                                sop_class_uid=inst.sop_class_uid, header=inst.header)
                    continue
                except OutOfResources as exc:
                    log.warning("instance.refused", reason="out_of_resources", detail=str(exc), via="stow-rs")
                    reason = dimse.OUT_OF_RESOURCES
                except StorageError as exc:
                    log.error("instance.store_failed", detail=str(exc), via="stow-rs")
                    reason = dimse.PROCESSING_FAILURE
            failed.append((inst, reason if reason is not None else dimse.CANNOT_UNDERSTAND))
    finally:
        tracker.association_ended(request_id)  # as an A-RELEASE: the study completes after grace
        if audit is not None:
            audit.association_ended(request_id)
    status = HTTP_OK if not failed else HTTP_ACCEPTED if stored else HTTP_CONFLICT
    log.info("stow.received", caller=caller, instances=len(instances), stored=len(stored),
             failed=len(failed), reasons=sorted({f"0x{r:04X}" for _, r in failed}),
             seconds=round(time.perf_counter() - started, 3))
    return StowResult(status, _response(base_url, study_uid, stored, failed), len(stored), len(failed))


def _response(base_url: str, study_uid: str | None, stored: list[Instance],
              failed: list[tuple[Instance, int]]) -> Dataset:
    """The Store Instances Response Module (PS3.18 10.5.3, Table 10.5.3-2)."""
    ds = Dataset()
    studies = {i.ids.study_uid for i in stored if i.ids is not None}
    if study_uid is not None or len(studies) == 1:
        ds.RetrieveURL = f"{base_url}/dicom-web/studies/{study_uid or studies.pop()}"
    referenced = []
    for inst in stored:
        assert inst.ids is not None  # only instances with checked UIDs are stored
        item = Dataset()
        item.ReferencedSOPClassUID = inst.sop_class_uid
        item.ReferencedSOPInstanceUID = inst.ids.sop_uid
        item.RetrieveURL = (f"{base_url}/dicom-web/studies/{inst.ids.study_uid}/series/"
                            f"{inst.ids.series_uid}/instances/{inst.ids.sop_uid}")
        referenced.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    failures = []
    for inst, reason in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = inst.sop_class_uid
        item.ReferencedSOPInstanceUID = inst.sop_uid
        item.FailureReason = reason
        failures.append(item)
    if failures:
        ds.FailedSOPSequence = failures
    return ds
