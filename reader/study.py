"""Study reading: which one of a study's series a route reads.

A CT study often holds several reconstructions of one acquisition (a lung kernel and a soft-tissue
kernel, thin and thick slices). A route with ``read = "study"`` reads one of them, so the study
gets one result: the series its :class:`SeriesPreference` ranks first among the study's series the
same route matches. The order is, in turn:

1. the Convolution Kernel (0018,1210, PS3.3 C.8.2.1): the first of the preference's ``kernels``
   patterns it matches (regular expressions, whole value, case-insensitive); unmatched kernels
   come after every matched one;
2. the thinnest Slice Thickness (0018,0050); a series without one comes last;
3. the most instances (frames for a multi-frame series);
4. ties: the lowest Series Number (0020,0011), then the lowest Series Instance UID (as text), so a
   study whose series nothing else tells apart is still read exactly once, and always the same one.

The other series are recorded as skipped with a reason naming the series read
(:func:`describe_series`). A better series arriving later is read as the study's next result
version, superseding the earlier one (``reader.pipeline``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reader.assemble imports reader.config, which imports this module
    from reader.assemble import SeriesSummary

__all__ = ["DEFAULT_LUNG_KERNELS", "SeriesPreference", "choose_series", "describe_series", "study_result_key"]

# Sharp (lung) reconstruction kernels of common vendors, best first. Philips: L, YA, YB, YC;
# Siemens: B/Br/I/Ir 60-89 (e.g. B70f, Br64, I70f) and Bl (lung) 5x-6x; GE: LUNG, BONEPLUS, BONE;
# Canon/Toshiba: FC5x, FC8x. A site adds its own with ``[routes.prefer] kernels``.
DEFAULT_LUNG_KERNELS: tuple[str, ...] = (
    r"L", r"Y[ABC]", r"LUNG", r"(B|BR|I|IR)[6-8]\d.*", r"BL[5-6]\d.*", r"BONEPLUS", r"BONE", r"FC[58]\d",
)


@dataclass(frozen=True)
class SeriesPreference:
    """Which series of a study to read: kernel patterns in order of preference (see the module)."""

    kernels: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(cls, patterns: Sequence[str]) -> SeriesPreference:
        """Compile ``patterns`` (whole-value, case-insensitive); raises re.error for a bad one."""
        return cls(tuple(re.compile(p, re.IGNORECASE) for p in patterns))

    def rank(self, s: SeriesSummary) -> tuple[int, float, int, int, str]:
        """The sort key of a series: lower is better."""
        kernel = next((i for i, p in enumerate(self.kernels) if p.fullmatch(s.kernel)), len(self.kernels))
        thickness = s.slice_thickness_mm if s.slice_thickness_mm is not None else float("inf")
        number = s.series_number if s.series_number is not None else 2**31
        return kernel, thickness, -s.instance_count, number, s.series_uid


def choose_series(preference: SeriesPreference, candidates: Sequence[SeriesSummary]) -> SeriesSummary:
    """The series ``preference`` ranks first among ``candidates`` (at least one)."""
    if not candidates:
        raise ValueError("no series to choose from")
    return min(candidates, key=preference.rank)


def describe_series(s: SeriesSummary) -> str:
    """``series 1.2.3 (number 2, kernel L, 5.0 mm, 64 instances)``: what was read, for a reason text."""
    parts = []
    if s.series_number is not None:
        parts.append(f"number {s.series_number}")
    parts.append(f"kernel {s.kernel}" if s.kernel else "no kernel")
    if s.slice_thickness_mm is not None:
        parts.append(f"{s.slice_thickness_mm:g} mm")
    parts.append(f"{s.instance_count} instances")
    return f"series {s.series_uid} ({', '.join(parts)})"


def study_result_key(study_uid: str, route_name: str) -> str:
    """The key of a study's result lineage for one route: its versions
    (``JobStore.study_result_version``) and what supersedes what among its send tickets (result
    files stay under the series read).

    ``<study UID>-<8 hex digits of the route name>``: digits, dots and a dash, so it is a safe file
    name, and two routes reading the same study keep separate lineages.
    """
    return f"{study_uid}-{hashlib.sha256(route_name.encode()).hexdigest()[:8]}"
