"""Second-reader flagging: a declarative rule per route decides whether a study is *flagged*.

A :class:`FlagRule` looks at the findings of one result (``reader.findings.Finding``). A finding
*triggers* the rule when it is of a counted class (``labels``: Segment Labels, i.e.
``FindingClass.name``, compared case-insensitively; empty means every class) **and** meets **any**
of the given thresholds::

    score >= min_score            (the model's maximum probability in the finding, 0..1)
    longest_diameter_mm >= min_diameter_mm

At least one threshold is required (``min_score = 0.0`` flags every reported finding). The study is
*flagged* when at least one finding triggers; otherwise it is *reviewed, no flag*. The
:class:`FlagDecision` records the state, the rule that made it (as text) and the triggering finding
numbers (``Finding.number``, the TID 1500 tracking identifier "finding <n>").

TOML form, a ``flag`` sub-table of a ``[[routes]]`` entry (parsed by :func:`parse_flag_rule`)::

    [[routes]]
    name = "chest-ct"
    model = "lung-lesion-unet"
    [routes.flag]
    min_score = 0.8          # optional, 0..1
    min_diameter_mm = 8.0    # optional, > 0
    labels = ["Lung lesion"] # optional, default: every finding class
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reader.errors import ConfigError
from reader.findings import Finding

__all__ = ["FlagDecision", "FlagRule", "FlagState", "decide", "parse_flag_rule"]

_KEYS = frozenset({"min_score", "min_diameter_mm", "labels"})


class FlagState(enum.StrEnum):
    """The outcome recorded with a job and sent to the RIS and webhooks."""

    FLAGGED = "flagged"
    REVIEWED_NO_FLAG = "reviewed_no_flag"


@dataclass(frozen=True)
class FlagRule:
    """Any-of thresholds over findings of the counted classes; see the module docstring."""

    min_score: float | None = None
    min_diameter_mm: float | None = None
    labels: tuple[str, ...] = ()  # Segment Labels (FindingClass.name); empty: every class

    def __post_init__(self) -> None:
        if self.min_score is None and self.min_diameter_mm is None:
            raise ValueError("a flag rule needs min_score or min_diameter_mm (or both)")
        score = self.min_score
        if score is not None and not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise ValueError(f"min_score must be between 0 and 1, got {self.min_score}")
        if self.min_diameter_mm is not None and not (
            math.isfinite(self.min_diameter_mm) and self.min_diameter_mm > 0.0
        ):
            raise ValueError(f"min_diameter_mm must be a positive number, got {self.min_diameter_mm}")
        if any(not label.strip() for label in self.labels):
            raise ValueError("labels must be non-empty strings")

    @classmethod
    def any_finding(cls) -> FlagRule:
        """The rule that flags every reported finding (the model's own thresholds already applied)."""
        return cls(min_score=0.0)

    def counts(self, finding: Finding) -> bool:
        """True when the finding's class is one the rule looks at."""
        if not self.labels:
            return True
        name = finding.finding_class.name.casefold()
        return any(name == label.casefold() for label in self.labels)

    def triggers(self, finding: Finding) -> bool:
        """True when the finding is counted and meets at least one threshold."""
        if not self.counts(finding):
            return False
        by_score = self.min_score is not None and finding.score >= self.min_score
        by_size = self.min_diameter_mm is not None and finding.longest_diameter_mm >= self.min_diameter_mm
        return by_score or by_size

    def describe(self) -> str:
        """The rule as one line, e.g. ``score >= 0.8 or longest diameter >= 8 mm (classes: Lung lesion)``."""
        if self.min_score == 0.0 and self.min_diameter_mm is None and not self.labels:
            return "any finding the model reports"
        parts = []
        if self.min_score is not None:
            parts.append(f"score >= {self.min_score:g}")
        if self.min_diameter_mm is not None:
            parts.append(f"longest diameter >= {self.min_diameter_mm:g} mm")
        text = " or ".join(parts)
        return f"{text} (classes: {', '.join(self.labels)})" if self.labels else text


@dataclass(frozen=True)
class FlagDecision:
    """What :func:`decide` concluded: the state, the rule as text and the triggering finding numbers."""

    state: FlagState
    rule: str
    triggering_findings: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if (self.state is FlagState.FLAGGED) != bool(self.triggering_findings):
            raise ValueError("a flagged decision needs triggering findings, an unflagged one none")

    @property
    def flagged(self) -> bool:
        """True when the study is flagged for radiologist review."""
        return self.state is FlagState.FLAGGED

    def as_record(self) -> dict[str, Any]:
        """JSON-ready form for the job ticket (``reader.jobs``); :meth:`from_record` reads it back."""
        return {
            "state": self.state.value,
            "rule": self.rule,
            "triggering_findings": list(self.triggering_findings),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FlagDecision:
        """The decision written by :meth:`as_record`; raises KeyError/ValueError on a malformed record."""
        return cls(
            state=FlagState(record["state"]),
            rule=str(record["rule"]),
            triggering_findings=tuple(int(n) for n in record["triggering_findings"]),
        )


def decide(rule: FlagRule, findings: Iterable[Finding]) -> FlagDecision:
    """Apply ``rule`` to the findings of one result."""
    triggering = tuple(sorted(f.number for f in findings if rule.triggers(f)))
    state = FlagState.FLAGGED if triggering else FlagState.REVIEWED_NO_FLAG
    return FlagDecision(state=state, rule=rule.describe(), triggering_findings=triggering)


def parse_flag_rule(table: Mapping[str, Any], key_prefix: str) -> FlagRule:
    """The :class:`FlagRule` of a TOML table whose key is ``key_prefix`` (e.g. ``routes[0].flag``).

    Raises :class:`~reader.errors.ConfigError` naming the offending key, e.g.
    ``routes[0].flag.min_score: must be between 0 and 1, got 1.5``.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(key_prefix, "must be a table")
    for key in table:
        if key not in _KEYS:
            raise ConfigError(f"{key_prefix}.{key}", f"unknown key (known: {', '.join(sorted(_KEYS))})")
    min_score = _number(table.get("min_score"), f"{key_prefix}.min_score")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"{key_prefix}.min_score", f"must be between 0 and 1, got {min_score:g}")
    min_diameter = _number(table.get("min_diameter_mm"), f"{key_prefix}.min_diameter_mm")
    if min_diameter is not None and min_diameter <= 0.0:
        raise ConfigError(f"{key_prefix}.min_diameter_mm", f"must be greater than 0, got {min_diameter:g}")
    if min_score is None and min_diameter is None:
        raise ConfigError(
            key_prefix, "needs min_score or min_diameter_mm (min_score = 0.0 flags every finding)"
        )
    return FlagRule(
        min_score=min_score,
        min_diameter_mm=min_diameter,
        labels=_labels(table.get("labels", []), f"{key_prefix}.labels"),
    )


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, "must be a number")
    return float(value)


def _labels(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(key, "must be a list of non-empty strings (finding class names)")
    return tuple(items)
