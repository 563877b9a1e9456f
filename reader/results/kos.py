"""A flagged study's Key Object Selection document (PS3.3 A.35.4, Key Object Selection Document IOD).

Content tree (PS3.16 TID 2010 Key Object Selection)::

    CONTAINER (128201, DCM, "For Physician Review")       document title, CID 7010
      observation context: the algorithm as device (TID 1002/1004)
      TEXT (113012, DCM, "Key Object Description")       why it was flagged, AI notice
      IMAGE   each triggering finding's key slice (where it is largest), in slice order
      IMAGE   the SEG (an image object: it has Rows and Columns)
      COMPOSITE the TID 1500 SR

"For Physician Review" is the CID 7010 title that says what the flag asks for; (113000, DCM,
"Of Interest") would be the generic alternative. Only triggering findings make key images, one each
(the slice the SR's outline is drawn on): the KOS points the radiologist at what the rule flagged,
the SR and SEG hold everything. A detection model's flagged result has no SEG to reference. UIDs are derived
like the SEG's and SR's (:func:`reader.results.uids.result_uid`, kinds ``kos-series`` and
``kos-instance``), so a re-send replaces the document instead of duplicating it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import highdicom as hd
import structlog
from pydicom import Dataset
from pydicom.sr.codedict import codes

from reader.errors import EncodingError
from reader.findings import Finding, InferenceResult
from reader.flag import FlagDecision
from reader.results.clean import clean_copied_attributes
from reader.results.sources import source_headers
from reader.results.sr import AI_NOTICE, device_observer
from reader.results.uids import result_uids
from reader.results.wording import finding_label
from reader.volume import Volume

__all__ = ["KOS_SERIES_DESCRIPTION", "KOS_SERIES_NUMBER", "KOS_TITLE", "encode_kos", "kos_description"]

log = structlog.get_logger(__name__)

KOS_SERIES_NUMBER = 9903
KOS_SERIES_DESCRIPTION = "AI second reader KOS - flagged for review, not for diagnosis"
KOS_TITLE = codes.cid7010.ForPhysicianReview  # (128201, DCM, "For Physician Review")
_DESCRIPTION_MAX = 1024  # a short text for the viewer's key-image panel; the SR has the details


def kos_description(decision: FlagDecision, findings: Sequence[Finding]) -> str:
    """The Key Object Description text: the rule, the triggering findings and the AI notice."""
    by_number = {finding.number: finding for finding in findings}
    parts = []
    for number in decision.triggering_findings:
        finding = by_number[number]
        parts.append(finding_label(finding))
    text = f"Flagged by AI second reader ({decision.rule}): {'; '.join(parts)}. {AI_NOTICE}"
    return text if len(text) <= _DESCRIPTION_MAX else text[: _DESCRIPTION_MAX - 3] + "..."


def _key_image_headers(volume: Volume, result: InferenceResult, decision: FlagDecision) -> list[Dataset]:
    """Headers (no Pixel Data) of the distinct key slices of the triggering findings."""
    by_number = {finding.number: finding for finding in result.findings}
    unknown = [n for n in decision.triggering_findings if n not in by_number]
    if unknown:
        raise EncodingError(f"the flag decision names findings the result lacks: {unknown}")
    slices = sorted({by_number[n].outline.slice_index for n in decision.triggering_findings})
    if slices and not 0 <= slices[0] <= slices[-1] < len(volume.sources):
        raise EncodingError(f"finding key slices outside 0..{len(volume.sources) - 1}")
    return source_headers(volume.sources[i] for i in slices)


def encode_kos(
    volume: Volume,
    result: InferenceResult,
    *,
    seg: Dataset | None,
    sr: Dataset,
    result_version: int,
    decision: FlagDecision,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of a flagged result; raises EncodingError for an unflagged decision or a segmentation
    result without its SEG."""
    if not decision.flagged:
        raise EncodingError("a KOS is only made for a flagged study")
    if seg is None and result.label_map is not None:
        raise EncodingError("a flagged segmentation result has findings, so its SEG is required")
    started = time.perf_counter()
    key_images = _key_image_headers(volume, result, decision)
    algorithm = result.algorithm
    referenced = [*key_images, sr] if seg is None else [*key_images, seg, sr]
    uid = result_uids(volume.series_instance_uid, algorithm, result_version)
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=KOS_TITLE,
            referenced_objects=referenced,
            observer_device_context=device_observer(result),
            description=kos_description(decision, result.findings),
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=uid("kos-series"),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=uid("kos-instance"),
            instance_number=1,
            manufacturer=algorithm.source,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # the library\'s text may quote header values (PHI): name the error type only
        raise EncodingError(f"highdicom rejected the KOS: {type(exc).__name__}") from exc
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    clean_copied_attributes(kos, key_images[0])
    log.info(
        "results.kos_encoded",
        series_uid=volume.series_instance_uid,
        key_images=len(key_images),
        findings=len(decision.triggering_findings),
        seconds=round(time.perf_counter() - started, 3),
    )
    return kos
