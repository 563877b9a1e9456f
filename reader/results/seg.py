"""The findings as a DICOM Segmentation (PS3.3 A.51, Segmentation IOD; C.8.20 Segmentation module).

One BINARY segment per finding class that has at least one finding. highdicom numbers segments
1..N without gaps, so finding-class labels are mapped onto contiguous segment numbers
(:func:`segment_numbers`); the SR references the segments through the same mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.coding import Code as PydicomCode

from reader import __version__
from reader.errors import EncodingError
from reader.findings import Code, InferenceResult
from reader.volume import Volume

__all__ = [
    "SEG_CONTENT_LABEL",
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "build_segmentation",
    "coded",
    "segment_numbers",
]

SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "AI second reader SEG - for review"
SEG_CONTENT_LABEL = "AI_FINDINGS"  # Content Label, CS (PS3.3 C.10.9): uppercase, <= 16 characters
SEG_CONTENT_DESCRIPTION = "AI-generated segmentation; requires review by a radiologist"
_LABEL_VALUES = 256  # label maps are uint8
_CHUNK_VOXELS = 1 << 21  # label-map voxels checked at a time


def coded(code: Code) -> PydicomCode:
    """Our Code as the pydicom Code highdicom expects (PS3.3 Table 8.8-1)."""
    return PydicomCode(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_numbers(result: InferenceResult) -> dict[int, int]:
    """Finding-class label -> SEG Segment Number (1..N), only for classes with a finding, in label order."""
    labels = sorted({finding.finding_class.label for finding in result.findings})
    return {label: number for number, label in enumerate(labels, start=1)}


def _segment_array(
    volume: Volume, result: InferenceResult, numbers: Mapping[int, int], sources: Sequence[Dataset]
) -> npt.NDArray[np.uint8]:
    """The label map with labels replaced by segment numbers, one frame per source frame."""
    label_map = result.label_map
    if label_map.dtype != np.uint8 or label_map.shape != volume.shape:
        raise EncodingError(
            f"label map {label_map.dtype}{label_map.shape} does not match the volume {volume.shape}"
        )
    if len(volume.sources) != label_map.shape[0]:
        raise EncodingError(f"{len(volume.sources)} sources for {label_map.shape[0]} slices")
    unreported = sorted(set(_labels_present(label_map)) - {0, *numbers})
    if unreported:
        raise EncodingError(f"label map has voxels of labels without a finding: {unreported}")
    segments: npt.NDArray[np.uint8]
    if all(label == number for label, number in numbers.items()):
        segments = label_map  # labels are segment numbers already: no copy
    else:
        lut = np.zeros(_LABEL_VALUES, dtype=np.uint8)
        for label, number in numbers.items():
            lut[label] = number
        segments = lut[label_map]
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
    numbers: Mapping[int, int],
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation of the reported findings, referencing ``sources`` (headers suffice).

    ``sources`` are the source instances' datasets (without Pixel Data) in slice order, or the one
    multi-frame instance the slices came from.
    """
    classes = {finding.finding_class.label: finding.finding_class for finding in result.findings}
    algorithm = result.algorithm
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=coded(algorithm.family),
        version=algorithm.version,
        source=algorithm.source,
    )
    descriptions = []
    for label, number in sorted(numbers.items(), key=lambda item: item[1]):
        finding_class = classes[label]
        site = finding_class.site
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=finding_class.name,
                segmented_property_category=coded(finding_class.category),
                segmented_property_type=coded(finding_class.property_type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                anatomic_regions=None if site is None else [coded(site)],
            )
        )
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=_segment_array(volume, result, numbers, sources),
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
    return seg
