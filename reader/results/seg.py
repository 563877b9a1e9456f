"""The findings as a DICOM Segmentation (PS3.3 A.51, Segmentation IOD; C.8.20 Segmentation module).

One BINARY segment per finding: segment ``n`` is finding ``n`` (the label map already holds each
finding as its number), labelled in words (:func:`reader.results.wording.finding_label`), typed by
size (nodule or mass), placed by its site, and carrying the same Tracking Identifier and Tracking
UID as the finding's TID 1500 group in the SR (PS3.3 C.8.20.2, Segment Sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.coding import Code as PydicomCode

from reader import __version__
from reader.errors import EncodingError, InputRejected
from reader.findings import Code, Finding, InferenceResult
from reader.results.wording import finding_label, finding_site, finding_type, volume_mm3
from reader.volume import Volume

__all__ = [
    "SEG_CONTENT_DESCRIPTION",
    "SEG_CONTENT_LABEL",
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "SEVERAL_MULTIFRAME",
    "build_segmentation",
    "check_segmentable",
    "coded",
    "tracking_id",
]

SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "AI second reader SEG - for review, not for diagnosis"
SEG_CONTENT_LABEL = "AI_FINDINGS"  # Content Label, CS (PS3.3 C.10.9): uppercase, <= 16 characters
SEG_CONTENT_DESCRIPTION = "AI-generated; needs review by a radiologist; not for diagnosis"  # LO
# Display colours (CIE L*a*b*, PS3.3 C.10.7.1.1) cycled over the segments: yellow, cyan, magenta,
# orange, green, red; a viewer without them (dcmqi warns) picks its own.
_COLOURS = ((97.1, -21.6, 94.5), (91.1, -48.1, -14.1), (60.3, 98.2, -60.8), (74.9, 23.9, 78.9),
            (87.7, -86.2, 83.2), (53.2, 80.1, 67.2))
_LABEL_VALUES = 256  # label maps are uint8
_CHUNK_VOXELS = 1 << 21  # label-map voxels checked at a time


SEVERAL_MULTIFRAME = "several_multiframe_instances"  # InputRejected reason of check_segmentable


def check_segmentable(volume: Volume) -> None:
    """Raise InputRejected when no SEG can reference ``volume``'s sources: slices taken from more
    than one multi-frame instance (a SEG's frames follow one multi-frame source, PS3.3 C.8.20.2).
    Called before inference, so such a series is skipped with the reason instead of failing after
    the model ran."""
    owners = {s.sop_instance_uid for s in volume.sources if s.frame_number is not None}
    if len(owners) > 1:
        raise InputRejected(SEVERAL_MULTIFRAME, f"{len(owners)} multi-frame instances in one series; "
                            "a segmentation can reference one")


def coded(code: Code) -> PydicomCode:
    """Our Code as the pydicom Code highdicom expects (PS3.3 Table 8.8-1)."""
    return PydicomCode(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def tracking_id(finding: Finding) -> str:
    """The Tracking Identifier of a finding in the SEG and the SR (TID 4108): ``"Finding <n>"``."""
    return f"Finding {finding.number}"


def _segment_array(
    volume: Volume, result: InferenceResult, sources: Sequence[Dataset]
) -> npt.NDArray[np.uint8]:
    """The label map (values are finding = segment numbers), one frame per source frame."""
    segments = result.label_map
    if segments is None:
        raise EncodingError("a result without a label map (a boxes model) has no SEG")
    if segments.dtype != np.uint8 or segments.shape != volume.shape:
        raise EncodingError(
            f"label map {segments.dtype}{segments.shape} does not match the volume {volume.shape}"
        )
    if len(volume.sources) != segments.shape[0]:
        raise EncodingError(f"{len(volume.sources)} sources for {segments.shape[0]} slices")
    numbers = {finding.number for finding in result.findings}
    unreported = sorted(set(_labels_present(segments)) - {0, *numbers})
    if unreported:
        raise EncodingError(f"label map has voxels of findings the result lacks: {unreported}")
    frame_numbers = [source.frame_number for source in volume.sources]
    if all(number is None for number in frame_numbers):
        return segments
    # Slices taken from one multi-frame instance: frame i of the SEG pixel array must be frame i + 1
    # of that instance (highdicom's correspondence rule), so place each slice at its frame.
    if len(sources) != 1 or any(number is None for number in frame_numbers):
        raise EncodingError("slices from several multi-frame instances (or mixed) are not supported")
    frames = int(sources[0].get("NumberOfFrames", 1))
    by_frame = np.zeros((frames, *segments.shape[1:]), dtype=np.uint8)
    for index, frame in enumerate(frame_numbers):
        if frame is None or not 1 <= frame <= frames:
            raise EncodingError(f"frame number {frame} outside 1..{frames}")
        by_frame[frame - 1] = segments[index]
    return by_frame


def _labels_present(label_map: npt.NDArray[np.uint8]) -> list[int]:
    """The distinct non-zero values of ``label_map``, a few slices at a time (no full-size temporary)."""
    present = np.zeros(_LABEL_VALUES, dtype=bool)
    flat = label_map.reshape(label_map.shape[0], -1)
    step = max(1, _CHUNK_VOXELS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step]
        values = chunk[chunk != 0]
        if values.size:
            present[np.bincount(values, minlength=_LABEL_VALUES) > 0] = True
    return [int(v) for v in np.flatnonzero(present)]


def build_segmentation(
    volume: Volume,
    result: InferenceResult,
    sources: Sequence[Dataset],
    *,
    tracking_uid: Callable[[Finding], str],
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation with one segment per finding, referencing ``sources`` (headers suffice).

    ``sources`` are the source instances' datasets (without Pixel Data) in slice order, or the one
    multi-frame instance the slices came from; ``tracking_uid(finding)`` gives the Tracking UID the
    SR's group of the same finding carries.
    """
    algorithm = result.algorithm
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=coded(algorithm.family),
        version=algorithm.version,
        source=algorithm.source,
    )
    descriptions = []
    for finding in result.findings:
        site = finding_site(finding)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=finding.number,
                segment_label=finding_label(finding),
                segmented_property_category=coded(finding.finding_class.category),
                segmented_property_type=coded(finding_type(finding)),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                tracking_uid=tracking_uid(finding),
                tracking_id=tracking_id(finding),
                anatomic_regions=None if site is None else [coded(site)],
                display_color=hd.color.CIELabColor(*_COLOURS[(finding.number - 1) % len(_COLOURS)]),
            )
        )
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=_segment_array(volume, result, sources),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=algorithm.source,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            # Software has no serial number; the node's version stands in (Type 1, PS3.3 C.7.5.2).
            device_serial_number=f"dicom-second-reader {__version__}",
            content_description=SEG_CONTENT_DESCRIPTION,
            content_label=SEG_CONTENT_LABEL,
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # the library\'s text may quote header values (PHI): name the error type only
        raise EncodingError(f"highdicom rejected the segmentation: {type(exc).__name__}") from exc
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    for item, finding in zip(seg.SegmentSequence, result.findings, strict=True):
        item.SegmentDescription = segment_description(finding)  # (0062,0006) LO, Type 3
    return seg


def segment_description(finding: Finding) -> str:
    """The Segment Description: what the label does not say (volume), and not for diagnosis."""
    volume = "" if finding.volume_mm3 is None else f"volume {volume_mm3(finding.volume_mm3):.0f} mm3; "
    return f"{volume}AI-generated, not for diagnosis"[:64]
