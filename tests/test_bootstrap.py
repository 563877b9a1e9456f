"""``scripts/bootstrap runtime``: pip runs only when the virtualenv is not current, and nothing it
prints reaches stdout (``scripts/serve`` execs the node right after it).

The script runs from a copy of the repository's ``scripts/bootstrap`` and ``pyproject.toml`` in a
temporary folder whose ``.venv/bin/python`` is a stand-in that records its arguments and prints
like pip does: no package is installed and nothing is fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 60

_FAKE_PYTHON = """#!/bin/sh
echo "$*" >>"$(dirname "$0")/../calls"
case "$*" in
  *" show "*) exit 1 ;;  # no other onnxruntime wheel, no pylibjpeg-libjpeg installed
esac
echo "Successfully installed something (pip's stdout)"
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "bootstrap", root / "scripts" / "bootstrap")
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", _FAKE_PYTHON), ("reader", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root


def _bootstrap(root: Path, flavour: str = "cpu") -> tuple[str, str, list[str]]:
    """Run bootstrap runtime; return its stdout, its stderr and the pip calls it made."""
    calls = root / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "READER_ONNXRUNTIME": flavour}
    done = subprocess.run([str(root / "scripts" / "bootstrap"), "runtime"], capture_output=True, text=True,
                          env=env, timeout=_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    made = calls.read_text().splitlines() if calls.exists() else []
    return done.stdout, done.stderr, made


def test_second_start_skips_pip_and_nothing_goes_to_stdout(tmp_path: Path) -> None:
    """The first run installs (pip's output on stderr, none on stdout) and records a stamp; a second
    run with the same pyproject.toml and onnxruntime wheel calls pip not at all."""
    root = _checkout(tmp_path)
    stdout, stderr, calls = _bootstrap(root)
    assert stdout == ""
    assert "Successfully installed" in stderr
    assert any("install -q -e .[cpu]" in c for c in calls), calls
    assert (root / ".venv" / ".bootstrap-stamp").read_text().startswith("runtime pyproject=")
    stdout, stderr, calls = _bootstrap(root)
    assert (stdout, stderr, calls) == ("", "", [])


def test_a_changed_pyproject_or_wheel_installs_again(tmp_path: Path) -> None:
    """pip runs again when pyproject.toml changes or the other onnxruntime wheel is chosen, and a
    runtime start after a dev install (which covers runtime) does not."""
    root = _checkout(tmp_path)
    _bootstrap(root)
    with (root / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert any("install -q -e .[cpu]" in c for c in _bootstrap(root)[2])
    assert any("install -q -e .[gpu]" in c for c in _bootstrap(root, flavour="gpu")[2])
    stamp = root / ".venv" / ".bootstrap-stamp"
    stamp.write_text(stamp.read_text().replace("runtime ", "dev ", 1))
    assert _bootstrap(root, flavour="gpu")[2] == []
