"""The findings as a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report (PS3.16).

Content tree (PS3.16 TID 1500 rows in brackets)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")              [1], CID 7021 title
      language en-US (TID 1204), observation context (TID 1001)        [2, 3]
        device observer = the algorithm (TID 1002/1004)
      Procedure reported, from the modality (CID 100)                  [4]
      CONTAINER Imaging Measurements (only when there are findings)    [6]
        one TID 1411 Volumetric ROI group per finding                  [8]
          Tracking Identifier "finding <n>" + Tracking UID (TID 4108)
          Finding category (CID 7150), Finding (CID 7151), Finding site
          Algorithm Identification (TID 4019)
          Referenced Segment: SEG instance + segment number + source series
          Volume (mm3), Long axis (mm), Certainty of Finding (%)     (TID 1419)
      CONTAINER Qualitative Evaluations                                [12]
        TEXT Comment: AI-generated result, requires review
        TEXT Finding: "No findings detected by the algorithm"  (negative studies only)

A negative study has no row 6 (TID 1500 needs at least one of rows 6, 10 and 12; an empty row 6
container would lack the Content Sequence that readers such as highdicom expect) and states the
negative result in row 12. The optional Image Library (row 5, TID 1600) is left out: the evidence
sequence already lists every source image, and building 64 library entries tripled encoding time.
The document is PARTIAL, UNVERIFIED and PRELIMINARY: AI output for review.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from reader.errors import EncodingError
from reader.findings import Finding, InferenceResult
from reader.results.seg import coded
from reader.results.uids import device_observer_uid
from reader.volume import Volume

__all__ = [
    "AI_NOTICE",
    "NO_FINDINGS",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "build_report",
    "procedure_reported",
]

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "AI second reader SR - for review"
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
_IMAGING_PROCEDURE = PydicomCode("363679005", "SCT", "Imaging procedure")


def procedure_reported(modality: str) -> PydicomCode:
    """The Procedure Reported code (TID 1500 row 4) for a source modality."""
    return _PROCEDURES.get(modality, _IMAGING_PROCEDURE)


def _observation_context(result: InferenceResult) -> hd.sr.ObservationContext:
    """TID 1001 with the algorithm as device observer (TID 1004)."""
    algorithm = result.algorithm
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(algorithm.name, algorithm.version, algorithm.source),
        name=algorithm.name,
        manufacturer_name=algorithm.source,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _measurement_group(
    finding: Finding,
    *,
    volume: Volume,
    seg: Dataset,
    segment_number: int,
    tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group: the finding, its SEG segment and its measurements (TID 1419)."""
    finding_class = finding.finding_class
    site = finding_class.site
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=finding.volume_mm3,
            unit=codes.UCUM.CubicMillimeter,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.SCT.LongAxis,  # CID 7470 Linear Measurements: the longest diameter
            value=finding.longest_diameter_mm,
            unit=codes.UCUM.Millimeter,
            algorithm_id=algorithm_id,
        ),
        # The model's maximum probability inside the component, uncalibrated, as a CAD certainty
        # (DCM 111012 "Certainty of Finding", in percent as in the CAD templates, e.g. TID 4104).
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(finding.score * 100.0, 2),
            unit=codes.UCUM.Percent,
            algorithm_id=algorithm_id,
        ),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"finding {finding.number}"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        finding_category=coded(finding_class.category),
        finding_type=coded(finding_class.property_type),
        finding_sites=None if site is None else [hd.sr.FindingSite(anatomic_location=coded(site))],
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _text(name: PydicomCode, value: str) -> hd.sr.TextContentItem:
    """A TEXT item CONTAINed by its parent (TID 1500 row 14)."""
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _root(
    result: InferenceResult,
    modality: str,
    groups: Sequence[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations],
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
    items = [_text(codes.DCM.Comment, AI_NOTICE)]
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
    numbers: Mapping[int, int],
    uid: Callable[[str], str],
    previous: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for ``result``; ``seg`` is required when there are findings, ``uid(kind)`` makes UIDs."""
    if result.findings and seg is None:
        raise EncodingError("findings need the SEG their groups reference")
    algorithm = result.algorithm
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=coded(algorithm.family),
        manufacturer=algorithm.source,
    )
    groups = []
    evidence = list(sources)
    if seg is not None:
        evidence.append(seg)
        groups = [
            _measurement_group(
                finding,
                volume=volume,
                seg=seg,
                segment_number=numbers[finding.finding_class.label],
                tracking_uid=uid(f"finding-{finding.number}"),
                algorithm_id=algorithm_id,
            )
            for finding in result.findings
        ]
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=_root(result, volume.modality, groups),
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
    sr.SoftwareVersions = algorithm.version
    return sr
