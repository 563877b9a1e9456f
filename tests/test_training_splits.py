"""The training data generator keeps its splits apart (models/training/synth.py).

Settings are chosen on the validation split and the test split is measured once, so a seed shared
between splits would leak a case from one into another.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "training"))

import synth

LARGEST_TRAINING = (2000, 1000)  # --phantoms, --real-copies the command line allows


def _real_seeds(plan: synth.SplitPlan, copies: int) -> set[int]:
    return {plan.real_seed + k for k in range(copies)}


def test_split_seeds_are_disjoint_even_for_the_largest_training_split() -> None:
    """Phantom seeds and real-copy seeds of train (at the largest size allowed), of the focus
    cache, of the hard-negative hosts, of both validation sets and of both test sets never meet, so
    no held-out case is a training case and no held-out set shares a case with another."""
    train_phantoms = set(range(1000, 1000 + LARGEST_TRAINING[0]))
    train_real = _real_seeds(synth.TRAIN, LARGEST_TRAINING[1])
    for plan in (synth.FOCUS, synth.HARD):
        phantoms, real = set(plan.phantom_seeds), _real_seeds(plan, plan.real_instances)
        assert not phantoms & train_phantoms and not real & train_real, plan.name
        assert not phantoms & train_real and not real & train_phantoms, plan.name
        train_phantoms |= phantoms
        train_real |= real
    held_out = {
        plan.name: (set(plan.phantom_seeds), _real_seeds(plan, plan.real_instances))
        for plan in (synth.VALIDATION, synth.VALIDATION2, synth.TEST, synth.TEST2)
    }
    for phantoms, real in held_out.values():
        assert not phantoms & train_phantoms
        assert not real & train_real
        assert not real & train_phantoms and not phantoms & train_real
    names = sorted(held_out)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not held_out[a][0] & held_out[b][0], (a, b)
            assert not held_out[a][1] & held_out[b][1], (a, b)
            assert not held_out[a][0] & held_out[b][1] and not held_out[a][1] & held_out[b][0], (a, b)


def test_validation_uses_the_held_out_hosts_not_the_training_series() -> None:
    """Both validation sets, like both test sets, copy the standard-kernel series; training, the
    focus cache and the hard-negative hosts copy the lung-kernel one."""
    assert synth.VALIDATION.real_series == synth.TEST.real_series != synth.TRAIN.real_series
    assert synth.FOCUS.real_series == synth.HARD.real_series == synth.TRAIN.real_series
    assert synth.TEST2.real_series == synth.VALIDATION2.real_series == synth.TEST.real_series


@pytest.mark.parametrize(
    "argv", [["--phantoms", str(LARGEST_TRAINING[0] + 1)], ["--real-copies", str(LARGEST_TRAINING[1] + 1)]]
)
def test_command_line_refuses_training_seeds_that_reach_held_out_ones(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """synth.py exits with a usage error, before writing anything, when --phantoms or --real-copies
    would draw training seeds from the validation or test range."""
    monkeypatch.setattr(sys, "argv", ["synth.py", "--out", str(tmp_path), "--split", "train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        synth.main()
    assert exit_info.value.code == 2
    assert not any(tmp_path.iterdir())
