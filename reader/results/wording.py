"""What our objects call a finding and how they round its numbers: the words a radiologist reads.

- **Nodule or mass.** The Fleischner Society glossary (Hansell et al., Radiology 2008) calls a
  rounded opacity up to 3 cm a *nodule* and a larger one a *mass*. A finding whose class is one of
  the two (SNOMED CT 27925004 "Nodule", 4147007 "Mass") is named by its longest diameter, so a
  96 mm lesion is never coded "Nodule". Other classes keep their own Segmented Property Type.
- **Rounding.** Measurements carry what the voxel grid supports: volumes to 1 mm3, lengths to
  0.1 mm, scores to whole percent.
- **The score.** With a package calibration, the SR reports the *calibrated* score, the
  probability that a finding reported at that raw score is a true lesion, as measured on the
  package's validation set (``models/MANIFEST.md``); without one, the raw score is reported as
  what it is, the model's maximum output in the finding, never as a certainty.
- **Labels.** ``"Finding 2: nodule 14.3 mm, left lung"``: a number that matches the SEG segment,
  the SR group and the KOS key image, the type, the size and the side where it is known.
"""

from __future__ import annotations

from reader.findings import Code, Finding

__all__ = [
    "CALIBRATED_SCORE",
    "CODING_SCHEME",
    "MASS",
    "MASS_ABOVE_MM",
    "NODULE",
    "RAW_SCORE",
    "finding_label",
    "finding_site",
    "finding_type",
    "length_mm",
    "score_percent",
    "volume_mm3",
]

NODULE = Code("27925004", "SCT", "Nodule")
MASS = Code("4147007", "SCT", "Mass")
MASS_ABOVE_MM = 30.0  # Fleischner glossary: a mass is larger than 3 cm
_LESION_TYPES = frozenset({(NODULE.scheme, NODULE.value), (MASS.scheme, MASS.value)})
_LUNG = Code("39607008", "SCT", "Lung")

# This project's private coding scheme (PS3.16 8.2: designators beginning "99" are private) for the
# two score concepts no standard context group names; the Code Meaning says what each is.
CODING_SCHEME = "99SECONDREADER"
CALIBRATED_SCORE = Code("CALPROB", CODING_SCHEME, "Probability of a true lesion (calibrated)")
RAW_SCORE = Code("RAWSCORE", CODING_SCHEME, "Model output, maximum in finding (not calibrated)")
_LABEL_MAX = 64  # Segment Label and Tracking Identifier are LO


def finding_type(finding: Finding) -> Code:
    """The finding's type (CID 7151): nodule up to 30 mm, mass above, for lesion classes."""
    own = finding.finding_class.property_type
    if (own.scheme, own.value) not in _LESION_TYPES:
        return own
    return MASS if finding.longest_diameter_mm > MASS_ABOVE_MM else NODULE


def finding_site(finding: Finding) -> Code | None:
    """Where it lies: the side the anatomy told, else the class's own site (e.g. "Lung")."""
    return finding.site or finding.finding_class.site


def length_mm(value: float) -> float:
    """A length rounded to 0.1 mm."""
    return round(value, 1)


def volume_mm3(value: float) -> float:
    """A volume rounded to 1 mm3."""
    return float(round(value))


def score_percent(finding: Finding) -> tuple[Code, float]:
    """The score concept and its value in whole percent: calibrated when the package has a
    calibration, else the raw model output named as such."""
    if finding.calibrated_score is not None:
        return CALIBRATED_SCORE, float(round(finding.calibrated_score * 100.0))
    return RAW_SCORE, float(round(finding.score * 100.0))


def finding_label(finding: Finding) -> str:
    """``"Finding 2: nodule 14.3 mm, left lung"`` (at most 64 characters)."""
    kind = finding_type(finding).meaning.lower()
    site = finding_site(finding)
    where = "" if site is None or site == _LUNG else f", {site.meaning.lower()}"
    text = f"Finding {finding.number}: {kind} {length_mm(finding.longest_diameter_mm):.1f} mm{where}"
    return text if len(text) <= _LABEL_MAX else text[: _LABEL_MAX - 3] + "..."
