"""What the RIS and webhooks are told about one processed study: :class:`StudyReport`.

Built once by the pipeline from what it already has (the source header, the findings, the flag
decision and the result objects); :mod:`reader.notify.hl7` and :mod:`reader.notify.webhook` render it.
Patient identity (:class:`PatientIdentity`) is kept *as received* (PS3.3 C.7.1.1 Patient Module) and
goes to HL7 only: it never appears in a ``repr``, in logs or in webhook events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydicom import Dataset

from reader.findings import AlgorithmIdentity, Finding
from reader.flag import FlagDecision
from reader.results.wording import finding_label, score_percent, volume_mm3

__all__ = ["AI_PENDING_REVIEW", "PatientIdentity", "ResultObject", "StudyReport", "findings_summary"]

AI_PENDING_REVIEW = "AI-generated result pending review by a radiologist; not for diagnosis"
_SUMMARY_FINDINGS_MAX = 10  # findings named in the one-line summary; the SR has all of them


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class PatientIdentity:
    """Patient ID, Issuer of Patient ID, Patient's Name (PN), Birth Date (DA) and Sex as received."""

    patient_id: str = field(repr=False)
    issuer_of_patient_id: str = field(repr=False)
    name: str = field(repr=False)  # DICOM PN, e.g. "Doe^John" (family^given^middle^prefix^suffix)
    birth_date: str = field(repr=False)  # DICOM DA, YYYYMMDD, or ""
    sex: str = field(repr=False)  # M, F, O or ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PatientIdentity:
        """The identity in a source header (Patient Module, PS3.3 C.7.1.1)."""
        return cls(
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex"),
        )


@dataclass(frozen=True)
class ResultObject:
    """One derived object sent to the PACS: its kind (``SR``, ``SEG``, ``KOS``) and UIDs."""

    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def from_dataset(cls, kind: str, ds: Dataset) -> ResultObject:
        """The UIDs of an encoded object."""
        return cls(kind, str(ds.SOPClassUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


@dataclass(frozen=True)
class StudyReport:
    """One processed series, as the worklist integrations see it."""

    study_instance_uid: str
    series_instance_uid: str  # the source series that was read
    accession_number: str  # as received; "" when the source had none
    patient: PatientIdentity  # HL7 only
    modality: str
    decision: FlagDecision
    findings: tuple[Finding, ...]
    algorithm: AlgorithmIdentity
    result_version: int
    objects: tuple[ResultObject, ...]  # SR always, SEG with findings, KOS when flagged
    processed_at: datetime  # timezone-aware; when the result was produced

    def __post_init__(self) -> None:
        if self.processed_at.tzinfo is None:
            raise ValueError("processed_at must be timezone-aware")
        if self.result_version < 1:
            raise ValueError(f"result_version must be >= 1, got {self.result_version}")

    @classmethod
    def build(
        cls,
        *,
        source: Dataset,
        series_instance_uid: str,
        decision: FlagDecision,
        findings: Sequence[Finding],
        algorithm: AlgorithmIdentity,
        result_version: int,
        objects: Sequence[tuple[str, Dataset]],
        processed_at: datetime | None = None,
    ) -> StudyReport:
        """A report from one source header and the encoded objects as ``(kind, dataset)`` pairs."""
        return cls(
            study_instance_uid=_text(source, "StudyInstanceUID"),
            series_instance_uid=series_instance_uid,
            accession_number=_text(source, "AccessionNumber"),
            patient=PatientIdentity.from_dataset(source),
            modality=_text(source, "Modality"),
            decision=decision,
            findings=tuple(findings),
            algorithm=algorithm,
            result_version=result_version,
            objects=tuple(ResultObject.from_dataset(kind, ds) for kind, ds in objects),
            processed_at=processed_at or datetime.now(UTC),
        )

    @property
    def flagged(self) -> bool:
        """True when the study is flagged for radiologist review."""
        return self.decision.flagged

    def object(self, kind: str) -> ResultObject | None:
        """The result object of a kind (``SR``, ``SEG``, ``KOS``), if there is one."""
        return next((o for o in self.objects if o.kind == kind), None)

    def summary(self) -> str:
        """The short findings summary: state, rule and findings (no patient data)."""
        return findings_summary(self.decision, self.findings)


def _finding_text(finding: Finding, triggering: bool) -> str:
    mark = ", meets the rule" if triggering else ""
    concept, percent = score_percent(finding)
    volume = "" if finding.volume_mm3 is None else f", volume {volume_mm3(finding.volume_mm3):.0f} mm3"
    return f"{finding_label(finding)}{volume}, {concept.meaning.lower()} {percent:.0f} %{mark}"


def findings_summary(decision: FlagDecision, findings: Sequence[Finding]) -> str:
    """One line, e.g. ``Flagged for review (rule: score >= 0.8): 1 finding. finding 1: ...``."""
    head = "Flagged for review" if decision.flagged else "Reviewed, no flag"
    count = f"{len(findings)} finding{'' if len(findings) == 1 else 's'}" if findings else "no findings"
    triggering = set(decision.triggering_findings)
    shown = [_finding_text(f, f.number in triggering) for f in findings[:_SUMMARY_FINDINGS_MAX]]
    more = len(findings) - len(shown)
    if more > 0:
        shown.append(f"{more} more in the SR")
    details = "".join(f" {text}." for text in shown)
    return f"{head} (rule: {decision.rule}): {count}.{details}"
