"""The findings as a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report (PS3.16).

Content tree (PS3.16 TID 1500 rows in brackets)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")              [1], CID 7021 title
      language en-US (TID 1204), observation context (TID 1001)        [2, 3]
        device observer = the algorithm (TID 1002/1004)
      Procedure reported, from the modality (CID 100)                  [4]
      CONTAINER Imaging Measurements (only when there are findings)    [6]
        one group per finding, n = 1..N by descending score            [8]
          Tracking Identifier "Finding <n>" + Tracking UID (TID 4108): the same in the SEG
          Finding category (CID 7150), Finding type by size (nodule <= 30 mm, mass above),
          Finding site (the side where the anatomy tells it, else the class's site)
          Algorithm Identification (TID 4019), with weights digest, provider and precision
          segmentation models, TID 1411 Volumetric ROI:
            Referenced Segment: SEG instance + segment n + source series
            Image Region: SCOORD POLYLINE, the outline on its key slice (what viewers draw)
            Center: SCOORD3D POINT in the source frame of reference
            Volume (mm3, to 1), Long axis (mm, to 0.1), score (%)        (TID 1419)
          detection models (no SEG), TID 1410 Planar ROI:
            Image Region: SCOORD POLYLINE, the box on its key slice
            Long axis, Short axis (mm, to 0.1), score (%)
      CONTAINER Qualitative Evaluations                                [12]
        TEXT Comment: AI-generated result, requires review, not for diagnosis
        TEXT Comment: the source series read; what the score means; software, weights, provider
        TEXT Finding: "No findings detected by the algorithm"  (negative studies only)

OHIF 3 (3.13, tests/viewers.py) draws a group only when it carries image coordinates, and only the
group's first SCOORD or SCOORD3D: a group with only a segment reference leaves the SR viewport
blank, so each group carries its key-slice outline first, then its centre. OHIF lists a group in
its measurement panel only when its measurements are INFERRED FROM that outline too (TID 300
row 8), so each NUM also carries a copy of it. The score is the calibrated probability of a true
lesion when the package has a calibration, else the raw model output named as such
(``reader.results.wording``).

A negative study has no row 6 (TID 1500 needs at least one of rows 6, 10 and 12; an empty row 6
container would lack the Content Sequence that readers such as highdicom expect) and states the
negative result in row 12. The Image Library (row 5, TID 1600) lists the findings' key slices only
(older OHIF releases fail to load an SR without one); the evidence sequence lists every source
image, and a library of all 64 slices tripled encoding time.
The document is PARTIAL, UNVERIFIED and PRELIMINARY: AI output for review.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from reader import __version__
from reader.errors import EncodingError
from reader.findings import Finding, InferenceResult
from reader.results.seg import coded, tracking_id
from reader.results.uids import device_observer_uid
from reader.results.wording import (
    CALIBRATED_SCORE,
    finding_site,
    finding_type,
    length_mm,
    score_percent,
    volume_mm3,
)
from reader.volume import Volume

__all__ = [
    "AI_NOTICE",
    "NO_FINDINGS",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_report",
    "device_observer",
    "procedure_reported",
    "source_series_text",
]

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "AI second reader SR - for review, not for diagnosis"
AI_NOTICE = "AI-generated result: requires review by a radiologist; not for diagnosis"
NO_FINDINGS = "No findings detected by the algorithm"

# Codes pydicom's dictionary lacks.
_QUALITATIVE_EVALUATIONS = PydicomCode("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
_ENGLISH = hd.sr.CodedConcept(value="en-US", scheme_designator="RFC5646", meaning="English (United States)")
# Procedure Reported, CID 100 "Quantitative Diagnostic Imaging Procedures" (SNOMED CT).
_PROCEDURES: Mapping[str, PydicomCode] = {
    "CT": PydicomCode("77477000", "SCT", "Computerized axial tomography"),
    "MR": PydicomCode("113091000", "SCT", "Magnetic resonance imaging"),
    "PT": PydicomCode("82918005", "SCT", "Positron emission tomography"),
    "CR": PydicomCode("168537006", "SCT", "Plain radiography"),
    "DX": PydicomCode("168537006", "SCT", "Plain radiography"),
}
_SOFTWARE_VERSIONS = 0x00181020  # (0018,1020) Software Versions, LO, multi-valued
_IMAGING_PROCEDURE = PydicomCode("363679005", "SCT", "Imaging procedure")


def procedure_reported(modality: str) -> PydicomCode:
    """The Procedure Reported code (TID 1500 row 4) for a source modality."""
    return _PROCEDURES.get(modality, _IMAGING_PROCEDURE)


def device_observer(result: InferenceResult) -> hd.sr.ObserverContext:
    """The algorithm as device observer (TID 1002/1004), in the SR and the KOS alike."""
    algorithm = result.algorithm
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=algorithm.source,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )


def _observation_context(result: InferenceResult) -> hd.sr.ObservationContext:
    """TID 1001 with the algorithm as device observer (TID 1004)."""
    return hd.sr.ObservationContext(observer_device_context=device_observer(result))


def algorithm_identification(result: InferenceResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version with the weights digest, and as parameters what ran."""
    algorithm = result.algorithm
    version = algorithm.version
    if algorithm.weights_sha256:
        version = f"{algorithm.version} (sha256 {algorithm.weights_sha256[:16]})"
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=version,
        family=coded(algorithm.family),
        manufacturer=algorithm.source,
        parameters=[f"provider {result.provider}", f"precision {result.precision}",
                    f"node dicom-second-reader {__version__}"],
    )


def _measurements(finding: Finding, algorithm_id: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """TID 1419 / TID 300: volume (segmentations), long and short axis, the score, rounded."""
    measurements = []
    if finding.volume_mm3 is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.Volume, value=volume_mm3(finding.volume_mm3),
            unit=codes.UCUM.CubicMillimeter, algorithm_id=algorithm_id))
    measurements.append(hd.sr.Measurement(
        name=codes.SCT.LongAxis,  # CID 7470 Linear Measurements: the longest diameter
        value=length_mm(finding.longest_diameter_mm), unit=codes.UCUM.Millimeter, algorithm_id=algorithm_id))
    if finding.short_axis_mm is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.ShortAxis, value=length_mm(finding.short_axis_mm), unit=codes.UCUM.Millimeter,
            algorithm_id=algorithm_id))
    concept, percent = score_percent(finding)
    measurements.append(hd.sr.Measurement(
        name=coded(concept), value=percent, unit=codes.UCUM.Percent, algorithm_id=algorithm_id))
    return measurements


def _image_region(finding: Finding, volume: Volume) -> hd.sr.ImageRegion:
    """The finding's outline on its key slice: an SCOORD POLYLINE selected from that image."""
    outline = finding.outline
    if not 0 <= outline.slice_index < len(volume.sources):
        raise EncodingError(f"finding {finding.number}: key slice {outline.slice_index} outside the series")
    source = volume.sources[outline.slice_index]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(outline.points, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.sop_class_uid,
            referenced_sop_instance_uid=source.sop_instance_uid,
            referenced_frame_numbers=None if source.frame_number is None else [source.frame_number],
        ),
    )


_Group = (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
          | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)


def _measurement_group(
    finding: Finding,
    *,
    volume: Volume,
    seg: Dataset | None,
    tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> _Group:
    """One group: a TID 1411 volumetric group referencing the finding's own SEG segment and carrying
    its key-slice outline and centre, or (no SEG: a detection) a TID 1410 planar group on its box."""
    site = finding_site(finding)
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_id(finding)),
        "finding_category": coded(finding.finding_class.category),
        "finding_type": coded(finding_type(finding)),
        "finding_sites": None if site is None else [hd.sr.FindingSite(anatomic_location=coded(site))],
        "algorithm_id": algorithm_id,
        "measurements": _measurements(finding, algorithm_id),
    }
    region = _image_region(finding, volume)
    if seg is None:
        planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
        _infer_measurements_from(planar[0].ContentSequence, region)
        return planar
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=finding.number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        **common,
    )
    items = group[0].ContentSequence
    items.append(region)
    _infer_measurements_from(items, region)
    if volume.frame_of_reference_uid:
        items.append(hd.sr.Scoord3DContentItem(
            name=codes.DCM.Center,
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([finding.centroid_mm], dtype=np.float64),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    return group


def _describable(header: Dataset) -> bool:
    """Whether highdicom can make an Image Library entry (TID 1601) of ``header``: it needs, e.g.,
    Imager Pixel Spacing of a radiograph, which some lack (pydicom-data's RG1_UNCR.dcm). Such an
    image stays out of the library; the SR's evidence and its groups still reference it."""
    try:
        hd.sr.ImageLibraryEntryDescriptors(header)
    except (AttributeError, ValueError, TypeError, KeyError):
        return False
    return True


def _infer_measurements_from(items: Sequence[Dataset], region: hd.sr.ImageRegion) -> None:
    """Give each NUM among ``items`` a copy of ``region`` as INFERRED FROM (TID 300 row 8)."""
    for item in items:
        if item.ValueType != "NUM":
            continue
        inferred = copy.deepcopy(region)
        inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
        if "ContentSequence" not in item:
            item.ContentSequence = hd.sr.ContentSequence()
        item.ContentSequence.append(inferred)


def source_series_text(volume: Volume, header: Dataset) -> str:
    """What was read, in words: ``Read series 2 "LUNG 5mm" (kernel L, 5.0 mm, 64 images), UID ...``."""
    details = []
    kernel = header.get("ConvolutionKernel")
    if kernel:
        details.append("kernel " + ("\\".join(kernel) if not isinstance(kernel, str) else kernel))
    details.append(f"{volume.spacing_mm[0]:.1f} mm")
    details.append(f"{len(volume.sources)} images")
    number = header.get("SeriesNumber")
    description = str(header.get("SeriesDescription", "") or "").strip()
    name = "series" + (f" {number}" if number not in (None, "") else "")
    name += f' "{description}"' if description else ""
    return f"Read {name} ({', '.join(details)}), Series Instance UID {volume.series_instance_uid}"


def _score_text(result: InferenceResult) -> str:
    """What the score in each group means."""
    if any(finding.calibrated_score is not None for finding in result.findings):
        return (f'Score: "{CALIBRATED_SCORE.meaning}" is the fraction of findings reported at that model '
                "output that were true lesions on the model's validation set; it is not a diagnosis.")
    return ("Score: the model's maximum output in the finding, not calibrated; it is not a probability "
            "of disease.")


def _provenance_text(result: InferenceResult) -> str:
    algorithm = result.algorithm
    weights = f", weights sha256 {algorithm.weights_sha256}" if algorithm.weights_sha256 else ""
    return (f"Produced by dicom-second-reader {__version__} with {algorithm.name} {algorithm.version}"
            f"{weights}, run on {result.provider} at {result.precision}.")


def _text(name: PydicomCode, value: str) -> hd.sr.TextContentItem:
    """A TEXT item CONTAINed by its parent (TID 1500 row 14)."""
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _root(
    result: InferenceResult,
    modality: str,
    groups: Sequence[_Group],
    notes: Sequence[str],
    key_images: Sequence[Dataset],
) -> Dataset:
    """The TID 1500 root container: rows 1-4, 6 (only with findings) and 12."""
    context = _observation_context(result)
    procedure = procedure_reported(modality)
    root: Dataset
    if groups:
        root = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=procedure,
            imaging_measurements=list(groups),
            title=codes.cid7021.ImagingMeasurementReport,
            referenced_images=list(key_images),
        )[0]
    else:
        # highdicom's MeasurementReport insists on at least one group; build rows 1-4 the same way.
        # Row 6 is left out: an empty container has no Content Sequence, which highdicom's own
        # reader cannot parse, and row 12 below satisfies "at least one of rows 6, 10 and 12".
        root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
        content = hd.sr.ContentSequence()
        content.extend(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH))
        content.extend(context)
        content.append(
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
        root.ContentSequence = content
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = [_text(codes.DCM.Comment, AI_NOTICE), *(_text(codes.DCM.Comment, note) for note in notes)]
    if not groups:
        items.append(_text(codes.DCM.Finding, NO_FINDINGS))
    evaluations.ContentSequence = hd.sr.ContentSequence(items)
    root.ContentSequence.append(evaluations)
    return root


def build_report(
    volume: Volume,
    result: InferenceResult,
    sources: Sequence[Dataset],
    *,
    seg: Dataset | None,
    uid: Callable[[str], str],
    tracking_uid: Callable[[Finding], str],
    previous: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for ``result``; ``seg`` is required when a segmentation result has findings (a boxes
    result has none), ``uid(kind)`` makes UIDs, ``tracking_uid(finding)`` the finding's Tracking UID."""
    if result.findings and seg is None and result.label_map is not None:
        raise EncodingError("findings need the SEG their groups reference")
    algorithm = result.algorithm
    algorithm_id = algorithm_identification(result)
    evidence = list(sources) if seg is None else [*sources, seg]
    groups = [
        _measurement_group(finding, volume=volume, seg=seg, tracking_uid=tracking_uid(finding),
                           algorithm_id=algorithm_id)
        for finding in result.findings
    ]
    notes = [source_series_text(volume, sources[0]), _provenance_text(result)]
    by_uid = {str(header.SOPInstanceUID): header for header in sources}
    key_uids = dict.fromkeys(volume.sources[f.outline.slice_index].sop_instance_uid for f in result.findings)
    key_images = [header for uid in key_uids if (header := by_uid.get(uid)) is not None
                  and _describable(header)]
    if result.findings:
        notes.insert(1, _score_text(result))
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=_root(result, volume.modality, groups, notes, key_images),
            series_instance_uid=uid("sr-series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uid("sr-instance"),
            instance_number=1,
            manufacturer=algorithm.source,
            is_complete=False,
            is_final=False,
            is_verified=False,
            previous_versions=[previous] if previous is not None else None,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # the library\'s text may quote header values (PHI): name the error type only
        raise EncodingError(f"highdicom rejected the SR: {type(exc).__name__}") from exc
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.ManufacturerModelName = algorithm.name
    sr.add_new(_SOFTWARE_VERSIONS, "LO", [algorithm.version, f"dicom-second-reader {__version__}"])
    return sr
