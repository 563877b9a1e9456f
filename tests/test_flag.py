"""Second-reader flag rules (reader.flag): any-of thresholds, class filter, TOML parsing."""

from __future__ import annotations

import tomllib
from dataclasses import replace

import pytest

from reader.errors import ConfigError
from reader.findings import Finding, FindingClass
from reader.flag import FlagDecision, FlagRule, FlagState, decide, parse_flag_rule
from tests.results_helpers import LESION, MASS, SQUARE


def finding(number: int, score: float, diameter_mm: float, finding_class: FindingClass = LESION) -> Finding:
    """A finding with the given score and longest diameter (other measures are irrelevant here)."""
    return Finding(
        number=number,
        finding_class=finding_class,
        score=score,
        voxel_count=10,
        volume_mm3=12.5,
        longest_diameter_mm=diameter_mm,
        centroid_mm=(0.0, 0.0, 0.0),
        slice_indices=(3,),
        outline=SQUARE,
    )


def test_any_threshold_triggers() -> None:
    """A finding triggers by score alone or by diameter alone; one meeting neither does not."""
    rule = FlagRule(min_score=0.8, min_diameter_mm=10.0)
    findings = (finding(1, 0.9, 4.0), finding(2, 0.5, 12.0), finding(3, 0.5, 4.0))
    decision = decide(rule, findings)
    assert decision.state is FlagState.FLAGGED
    assert decision.flagged
    assert decision.triggering_findings == (1, 2)
    assert decision.rule == "score >= 0.8 or longest diameter >= 10 mm"


def test_thresholds_are_inclusive() -> None:
    """A score or diameter exactly at the threshold triggers."""
    assert decide(FlagRule(min_score=0.8), [finding(1, 0.8, 1.0)]).flagged
    assert decide(FlagRule(min_diameter_mm=6.0), [finding(1, 0.1, 6.0)]).flagged


def test_no_trigger_is_reviewed_no_flag() -> None:
    """Findings below every threshold, or no findings at all, give *reviewed, no flag*."""
    rule = FlagRule(min_score=0.95)
    for findings in ((finding(1, 0.9, 30.0),), ()):
        decision = decide(rule, findings)
        assert decision.state is FlagState.REVIEWED_NO_FLAG
        assert not decision.flagged
        assert decision.triggering_findings == ()


def test_labels_limit_the_counted_classes() -> None:
    """With labels, only findings of those classes (case-insensitive Segment Label) can trigger."""
    rule = FlagRule(min_score=0.5, labels=("lung LESION",))
    findings = (finding(1, 0.99, 50.0, MASS), finding(2, 0.6, 3.0))
    assert decide(rule, findings).triggering_findings == (2,)
    assert decide(rule, findings[:1]).state is FlagState.REVIEWED_NO_FLAG
    assert rule.describe() == "score >= 0.5 (classes: lung LESION)"


def test_any_finding_rule_flags_every_finding() -> None:
    """FlagRule.any_finding flags a study with even a weak finding, and not one without findings."""
    rule = FlagRule.any_finding()
    assert decide(rule, [finding(4, 0.01, 0.5)]).triggering_findings == (4,)
    assert not decide(rule, []).flagged


def test_decision_record_round_trips() -> None:
    """as_record gives JSON-ready data that from_record turns back into an equal decision."""
    decision = decide(FlagRule(min_diameter_mm=5.0), [finding(2, 0.3, 7.0), finding(1, 0.9, 9.0)])
    record = decision.as_record()
    assert record == {"state": "flagged", "rule": "longest diameter >= 5 mm", "triggering_findings": [1, 2]}
    assert FlagDecision.from_record(record) == decision


def test_inconsistent_decision_is_refused() -> None:
    """A flagged decision without triggering findings (or the reverse) cannot be constructed."""
    with pytest.raises(ValueError, match="triggering"):
        FlagDecision(FlagState.FLAGGED, "rule")
    with pytest.raises(ValueError, match="triggering"):
        FlagDecision(FlagState.REVIEWED_NO_FLAG, "rule", (1,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs min_score or min_diameter_mm"),
        ({"min_score": 1.5}, "between 0 and 1"),
        ({"min_score": float("nan")}, "between 0 and 1"),
        ({"min_diameter_mm": 0.0}, "positive"),
        ({"min_score": 0.5, "labels": (" ",)}, "non-empty"),
    ],
)
def test_invalid_rule_is_refused(kwargs: dict[str, object], message: str) -> None:
    """FlagRule is valid when constructed or raises ValueError saying why."""
    with pytest.raises(ValueError, match=message):
        FlagRule(**kwargs)  # type: ignore[arg-type]


def test_parse_documented_toml_example() -> None:
    """The [routes.flag] example of docs/worklist.md parses into the rule it describes."""
    raw = tomllib.loads(
        """
        [[routes]]
        name = "chest-ct"
        model = "lung-lesion-unet"
        [routes.flag]
        min_score = 0.8
        min_diameter_mm = 8
        labels = ["Lung lesion"]
        """
    )
    rule = parse_flag_rule(raw["routes"][0]["flag"], "routes[0].flag")
    assert rule == FlagRule(min_score=0.8, min_diameter_mm=8.0, labels=("Lung lesion",))
    assert parse_flag_rule({"min_score": 0}, "routes[1].flag") == FlagRule.any_finding()


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"min_scor": 0.5}, "routes[0].flag.min_scor", "unknown key"),
        ({"min_score": 1.5}, "routes[0].flag.min_score", "between 0 and 1, got 1.5"),
        ({"min_score": True}, "routes[0].flag.min_score", "must be a number"),
        ({"min_score": "0.5"}, "routes[0].flag.min_score", "must be a number"),
        ({"min_diameter_mm": -2}, "routes[0].flag.min_diameter_mm", "greater than 0"),
        ({"labels": ["Lung lesion"]}, "routes[0].flag", "needs min_score or min_diameter_mm"),
        ({"min_score": 0.5, "labels": [3]}, "routes[0].flag.labels", "list of non-empty strings"),
    ],
)
def test_parse_errors_name_the_key(table: dict[str, object], key: str, problem: str) -> None:
    """Each invalid flag table raises ConfigError naming the exact key and the problem."""
    with pytest.raises(ConfigError) as caught:
        parse_flag_rule(table, "routes[0].flag")
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_parse_refuses_a_non_table() -> None:
    """A flag value that is not a table is a ConfigError on the table's own key."""
    with pytest.raises(ConfigError) as caught:
        parse_flag_rule(0.5, "routes[0].flag")  # type: ignore[arg-type]
    assert caught.value.key == "routes[0].flag"


def test_finding_order_does_not_matter() -> None:
    """Triggering finding numbers are sorted whatever order the findings come in."""
    findings = [finding(3, 0.9, 1.0), replace(finding(1, 0.9, 1.0), number=1)]
    assert decide(FlagRule(min_score=0.5), findings).triggering_findings == (1, 3)
