"""Result encoding: findings -> DICOM Segmentation (PS3.3 A.51) + Comprehensive 3D SR with TID 1500.

Both objects join the source study (patient and study attributes copied from the source headers,
then repaired by :mod:`reader.results.clean`), carry the algorithm as manufacturer and have
deterministic UIDs (:func:`result_uid`), so encoding the same result twice gives the same objects
and a re-send replaces rather than duplicates. A study without findings gets an SR only, and so
does a detection (boxes) model's result: its findings are drawn in the SR, with no SEG.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from pydicom import Dataset

from reader.findings import Finding, InferenceResult
from reader.results.clean import clean_copied_attributes
from reader.results.seg import build_segmentation
from reader.results.sources import source_headers
from reader.results.sr import build_report
from reader.results.uids import result_uid, result_uids
from reader.volume import Volume

__all__ = ["ResultObjects", "encode_results", "load_standard_tables", "result_uid"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class ResultObjects:
    """The derived objects of one result: a SEG when there are findings, always an SR."""

    seg: Dataset | None
    sr: Dataset

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """The objects to send, SEG first (the SR references it)."""
        return (self.sr,) if self.seg is None else (self.seg, self.sr)


def load_standard_tables() -> None:
    """Load highdicom's tables of the standard (SOP class -> IOD -> modules -> attributes) now.

    highdicom parses them from JSON on its first SEG/SR (about 0.25 s and 70 MiB kept for the
    process's lifetime, with a further ~40 MiB transient while parsing); a node that calls this
    at start-up keeps that cost out of its first series' latency and peak memory. The loaders are
    highdicom internals: when they are absent the tables simply load on first use as before.
    """
    from highdicom import _standard_utils  # noqa: PLC0415 - private module; only here, only if present

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(_standard_utils, name, None)
        if callable(loader):
            loader()


def _source_headers(volume: Volume) -> list[Dataset]:
    """Source headers without Pixel Data, one per distinct file, in slice order."""
    return source_headers(volume.sources)


def encode_results(volume: Volume, result: InferenceResult, result_version: int = 1,
                   previous_sr: Dataset | None = None) -> ResultObjects:
    """Encode ``result`` on ``volume`` as SEG (if any finding) and TID 1500 SR; raises EncodingError.

    ``previous_sr`` is the SR of the result version this one supersedes: it is referenced in the
    new SR's Predecessor Documents Sequence (PS3.3 C.17.2, SR Document General Module).
    """
    started = time.perf_counter()
    sources = _source_headers(volume)
    uid = result_uids(volume.series_instance_uid, result.algorithm, result_version)

    def tracking_uid(finding: Finding) -> str:
        return uid(f"finding-{finding.number}")

    seg: Dataset | None = None
    if result.findings and result.label_map is not None:
        seg = build_segmentation(
            volume,
            result,
            sources,
            tracking_uid=tracking_uid,
            series_instance_uid=uid("seg-series"),
            sop_instance_uid=uid("seg-instance"),
        )
        clean_copied_attributes(seg, sources[0])
    sr = build_report(volume, result, sources, seg=seg, uid=uid, tracking_uid=tracking_uid,
                      previous=previous_sr)
    clean_copied_attributes(sr, sources[0])
    log.info(
        "results.encoded",
        series_uid=volume.series_instance_uid,
        findings=len(result.findings),
        segments=0 if seg is None else len(result.findings),
        seconds=round(time.perf_counter() - started, 3),
    )
    return ResultObjects(seg=seg, sr=sr)
