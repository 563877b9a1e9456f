"""The prepared GPU training round (models/training/gpu_round.sh) stops at once, before spending
device time, when what it needs did not travel with it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "models" / "training" / "gpu_round.sh"


def _round(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The round from the repository root, with ``PYTHON=false`` so that nothing could train."""
    return subprocess.run(
        [str(SCRIPT)],
        check=False,
        cwd=SCRIPT.parents[2],
        env={**env, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_round_refuses_to_start_without_the_real_training_host(tmp_path: Path) -> None:
    """Without the real host's npz (synth.py --split real) the round exits with status 2, names
    the missing file, and writes nothing to $OUT: a device call that forgot its carry costs
    seconds, not the minutes of building caches first."""
    out = tmp_path / "out"
    done = _round({**os.environ, "OUT": str(out), "REAL_CACHE": str(tmp_path / "no-real")})
    assert done.returncode == 2
    assert "ct-A0001-5mm-lung-kernel.npz" in done.stderr
    assert not out.exists()


def test_round_needs_an_out_folder() -> None:
    """Without $OUT (the folder the device tool brings back) the round exits non-zero at once."""
    done = _round({k: v for k, v in os.environ.items() if k != "OUT"})
    assert done.returncode != 0
    assert "OUT" in done.stderr
