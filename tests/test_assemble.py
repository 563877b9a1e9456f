"""Series completion: released associations plus a short grace, or an idle timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest

from reader.assemble import CompleteSeries, CompletionTracker
from reader.config import CompletionConfig


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tracker(clock: FakeClock) -> CompletionTracker:
    return CompletionTracker(CompletionConfig(grace=timedelta(seconds=2), idle_timeout=timedelta(seconds=30)),
                             clock=clock)


def test_series_completes_grace_after_release() -> None:
    """A series is complete the grace period after its association is released, not before."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "se")
    clock.now += 10
    assert t.pop_complete() == []  # association still open, idle timeout not reached
    t.association_ended(1)
    clock.now += 1.9
    assert t.pop_complete() == []
    clock.now += 0.2
    assert t.pop_complete() == [CompleteSeries("st", "se")]
    assert t.tracked() == 0


def test_open_association_completes_after_idle_timeout() -> None:
    """A sender that keeps its association open still gets its series completed after the idle timeout."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "se")
    clock.now += 29.9
    assert t.pop_complete() == []
    clock.now += 0.2
    assert t.pop_complete() == [CompleteSeries("st", "se")]


def test_series_split_over_associations_waits_for_all() -> None:
    """With two associations carrying one series, releasing one does not complete it."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "se")
    t.instance_stored(2, "st", "se")
    t.association_ended(1)
    clock.now += 5
    assert t.pop_complete() == []
    t.association_ended(2)
    clock.now += 2.1
    assert t.pop_complete() == [CompleteSeries("st", "se")]


def test_new_instance_restarts_the_grace() -> None:
    """An instance arriving on a new association during the grace keeps the series collecting."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "se")
    t.association_ended(1)
    clock.now += 1.5
    t.instance_stored(2, "st", "se")
    t.association_ended(2)
    clock.now += 1.5
    assert t.pop_complete() == []
    clock.now += 0.6
    assert t.pop_complete() == [CompleteSeries("st", "se")]


def test_series_of_other_studies_are_independent() -> None:
    """Completion of one study's series does not depend on another study's activity."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "a")
    t.association_ended(1)
    t.instance_stored(2, "other", "b")
    clock.now += 2.5
    assert t.pop_complete() == [CompleteSeries("st", "a")]


def test_a_study_completes_with_its_last_series() -> None:
    """A series whose study has another series still arriving waits for it; then both complete
    together, so a study read chooses among all of its series."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "a")
    t.association_ended(1)
    t.instance_stored(2, "st", "b")
    clock.now += 2.5
    assert t.pop_complete() == []
    t.association_ended(2)
    clock.now += 1.0
    assert t.pop_complete() == []
    clock.now += 1.1
    assert sorted(t.pop_complete()) == [CompleteSeries("st", "a"), CompleteSeries("st", "b")]


def test_stat_series_come_first_and_say_so() -> None:
    """A series with an instance stored at C-STORE Priority HIGH is reported STAT, ahead of routine ones."""
    clock = FakeClock()
    t = _tracker(clock)
    t.instance_stored(1, "st", "routine")
    t.instance_stored(2, "st", "urgent", stat=True)
    t.instance_stored(2, "st", "urgent")
    t.association_ended(1)
    t.association_ended(2)
    clock.now += 2.5
    assert t.pop_complete() == [CompleteSeries("st", "urgent", stat=True), CompleteSeries("st", "routine")]


def test_the_recorder_sees_each_instance_before_it_is_tracked_and_can_refuse_it() -> None:
    """In a cluster every stored instance is recorded in the shared state (``recorder``) with its
    wall-clock time before it is tracked; when recording fails, the error reaches the caller (which
    refuses the instance) and nothing is tracked. The complete series carries that time."""
    recorded: list[tuple[str, str, float, bool]] = []
    failing = False

    def record(study: str, series: str, at: float, stat: bool) -> None:
        if failing:
            raise OSError("database down")
        recorded.append((study, series, at, stat))

    clock = FakeClock()
    config = CompletionConfig(grace=timedelta(seconds=2), idle_timeout=timedelta(seconds=30))
    tracker = CompletionTracker(config, clock=clock, recorder=record)
    tracker.instance_stored(1, "1.1", "1.1.1", stat=True)
    assert [(s, r, stat) for s, r, _, stat in recorded] == [("1.1", "1.1.1", True)]
    failing = True
    with pytest.raises(OSError, match="database down"):
        tracker.instance_stored(2, "1.2", "1.2.1")
    tracker.association_ended(1)
    tracker.association_ended(2)
    clock.now += 10
    complete = tracker.pop_complete()
    assert [c.series_uid for c in complete] == ["1.1.1"]
    assert complete[0].last_arrival == recorded[0][2]
