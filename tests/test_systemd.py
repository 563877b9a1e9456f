"""The systemd unit as a new user follows it: deploy/reader.service's install steps, then its ExecStart.

No systemd runs here, so the install steps in the unit's header comment are played into a temporary
root: every absolute path gets the root as prefix and nothing else changes. ``install`` and ``cp``
run as written (less ``-o``/``-g``: the user ``reader`` is not added to the test machine); the
``bootstrap`` step is replaced by a link to the virtualenv running the tests; ``useradd`` and
``systemctl`` are not run. The node then starts as the unit's ExecStart, User (its environment),
WorkingDirectory, UMask and Environment say, answers DCMTK's echoscu and exits 0 on SIGTERM.
``systemd-analyze verify`` checks the unit with the same prefix.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reader.cli import EXIT_CONFIG, EXIT_OK
from reader.config import bundled_models_dir, load_config
from tests.peers import LOCALHOST, echoscu, free_port, missing, require_tool, wait_until

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "reader.service"
EXAMPLE = REPO / "deploy" / "reader.example.toml"
GUIDE = REPO / "README.md"  # its "### systemd" section
CONFIG = "/etc/reader/reader.toml"  # where the install steps put the example configuration
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's PATH for services
_START_S = 60.0
_STOP_S = 60.0
_RUN_S = 120.0


def _unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file: key -> values in order (systemd keys such as Environment repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not parsed here: {raw}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}= should be given once, got {values}"
    return values[0]


def _install_steps() -> list[str]:
    """The command lines of the unit's header comment (lines indented by three spaces after '#')."""
    steps = []
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            steps.append(line[4:].strip())
    assert steps, "deploy/reader.service: no install steps in its header comment"
    return steps


def _guide_steps() -> list[str]:
    """The command lines of the first ```sh block in the README's "### systemd" section."""
    section = GUIDE.read_text(encoding="utf-8").split("\n### systemd\n", 1)[-1]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, "README.md: no ```sh block with the install steps under ### systemd"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


@dataclass(frozen=True)
class Installed:
    """The temporary root the install steps filled, and the unit's settings read from the file."""

    root: Path
    user: str
    home: str
    service: dict[str, list[str]]

    def path(self, absolute: str) -> Path:
        """``absolute`` under the temporary root: the prefix is the only change."""
        assert absolute.startswith("/"), absolute
        return self.root / absolute.lstrip("/")

    def arg(self, arg: str) -> str:
        """A command-line argument with its absolute path (if it is one) mapped under the root."""
        return os.fspath(self.path(arg)) if arg.startswith("/") else arg

    def command(self) -> list[str]:
        """ExecStart, word-split as systemd does (no shell), paths mapped."""
        return [self.arg(a) for a in shlex.split(_one(self.service, "ExecStart"))]

    def environment(self) -> dict[str, str]:
        """What systemd gives the service: its PATH, the User='s variables and Environment=.

        PYTHONPATH stands in for the editable install ``scripts/bootstrap runtime`` makes in
        /opt/reader/.venv (``reader`` imported from /opt/reader): the borrowed virtualenv's own
        install points at the checkout it was made in.
        """
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "USER": self.user, "LOGNAME": self.user,
               "HOME": self.arg(self.home), "SHELL": "/usr/sbin/nologin"}
        for assignments in self.service.get("Environment", []):
            for item in shlex.split(assignments):
                name, _, value = item.partition("=")
                env[name] = self.arg(value)
        env["PYTHONPATH"] = os.fspath(self.path("/opt/reader"))
        return env

    def start(self, log_path: Path) -> subprocess.Popen[bytes]:
        """The node as the unit starts it; stdout and stderr (the journal) go to ``log_path``."""
        with log_path.open("ab") as log:
            return subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                cwd=self.path(_one(self.service, "WorkingDirectory")),
                umask=int(_one(self.service, "UMask"), 8),
            )


def _without_owner(argv: list[str]) -> list[str]:
    """``install`` arguments less ``-o USER`` / ``-g GROUP`` (no such user on the test machine)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-o", "-g"):
            skip = True
        else:
            out.append(a)
    return out


def _venv() -> Path:
    """The virtualenv running the tests, with the ``reader`` console script bootstrap installs."""
    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix) or not (prefix / "bin" / "reader").is_file():
        missing(f"tests must run from the virtualenv scripts/bootstrap makes (with bin/reader), not {prefix}")
    return prefix


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The unit's install steps, played into a fresh temporary root."""
    root = tmp_path_factory.mktemp("root")
    unit = _unit()
    service = unit["Service"]
    user = _one(service, "User")
    home = ""
    (root / "etc/systemd/system").mkdir(parents=True)  # what a Debian system with systemd has
    for step in _install_steps():
        argv = shlex.split(step)
        mapped = [argv[0], *(os.fspath(root / a.lstrip("/")) if a.startswith("/") else a for a in argv[1:])]
        if argv[0] == "useradd":
            assert argv[-1] == user == _one(service, "Group"), step
            home = argv[argv.index("--home-dir") + 1]
        elif argv[0] == "install":
            subprocess.run(_without_owner(mapped), cwd=REPO, check=True)
        elif argv[0] == "cp":
            subprocess.run(mapped, cwd=REPO, check=True)
        elif argv == ["/opt/reader/scripts/bootstrap", "runtime"]:
            assert (root / "opt/reader/scripts/bootstrap").is_file(), "bootstrap runs from the copy"
            (root / "opt/reader/.venv").symlink_to(_venv(), target_is_directory=True)
        elif argv[0] == "systemctl":
            assert argv[1:] in (["daemon-reload"], ["enable", "--now", "reader"]), step
        else:
            pytest.fail(f"install step this test does not know how to play: {step}")
    assert home, "no useradd step"
    yield Installed(root, user, home, service)


def _listen_on_loopback(config: Path) -> int:
    """The operator's edit of the installed file for this test: an ephemeral port on 127.0.0.1."""
    text = config.read_text(encoding="utf-8")
    port = free_port()
    text, n_port = re.subn(r"(?m)^port = 11112\b", f"port = {port}", text)
    text, n_bind = re.subn(r'(?m)^bind_address = "0\.0\.0\.0"', f'bind_address = "{LOCALHOST}"', text)
    assert (n_port, n_bind) == (1, 1), "deploy/reader.example.toml: [node] port / bind_address lines changed"
    config.write_text(text, encoding="utf-8")
    return port


def _events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the node exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_install_steps_in_the_unit_and_in_systemd_md_are_the_same() -> None:
    """The README's systemd section shows exactly the install steps of the unit's header comment."""
    assert _guide_steps() == _install_steps()


def test_unit_passes_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit, ExecStart found under the installed prefix, no warning."""
    exe = require_tool("systemd-analyze")
    text = UNIT.read_text(encoding="utf-8")
    for prefix in ("/opt/reader", "/etc/reader", "/var/lib/reader"):
        text = text.replace(prefix, os.fspath(installed.path(prefix)))
    unit = tmp_path / "reader.service"
    unit.write_text(text, encoding="utf-8")
    done = subprocess.run([exe, "verify", os.fspath(unit)], capture_output=True, text=True,
                          timeout=_RUN_S, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_unit_does_not_restart_on_a_configuration_error_nor_for_ever() -> None:
    """Exit 2 (configuration error) is never restarted; other failures restart until the start limit."""
    unit = _unit()
    service = unit["Service"]
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "RestartPreventExitStatus").split() == [str(EXIT_CONFIG)]
    burst = int(_one(unit["Unit"], "StartLimitBurst"))
    interval = int(_one(unit["Unit"], "StartLimitIntervalSec"))
    restart = int(_one(service, "RestartSec"))
    assert burst * restart < interval, "restarts must be able to reach the start limit within its interval"
    assert _one(service, "ReadWritePaths") == _one(service, "WorkingDirectory") == "/var/lib/reader"


def test_service_starts_as_execstart_says_answers_echo_and_exits_0_on_sigterm(
        installed: Installed, tmp_path: Path) -> None:
    """Installed as the unit's header says and started as its ExecStart says, the node resolves the
    bundled model from /opt/reader, keeps its data in /var/lib/reader, answers C-ECHO and exits 0."""
    config = installed.path(CONFIG)
    port = _listen_on_loopback(config)
    env = installed.environment()
    python = installed.path("/opt/reader/.venv/bin/python")
    probe = "import sys, pathlib, reader.config as c; print(c.load_config(pathlib.Path(sys.argv[1])).model(" \
            "'lung-lesion-unet').path)"
    resolved = subprocess.run([os.fspath(python), "-c", probe, os.fspath(config)], env=env,
                              cwd=installed.path(_one(installed.service, "WorkingDirectory")),
                              capture_output=True, text=True, timeout=_RUN_S, check=True)
    assert Path(resolved.stdout.strip()) == installed.path("/opt/reader/models/lung-lesion-unet").resolve()

    log_path = tmp_path / "journal.log"
    process = installed.start(log_path)
    try:
        wait_until(lambda: _listening(process, port, log_path), _START_S, f"the node on {LOCALHOST}:{port}")
        echo = echoscu(LOCALHOST, port, "SECONDREADER")
        assert echo.returncode == 0, echo.stdout + echo.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(_STOP_S) == EXIT_OK, log_path.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(_STOP_S)
    events = {e.get("event"): e for e in _events(log_path)}
    data_dir = installed.path("/var/lib/reader")
    assert events["model.loaded"]["name"] == "lung-lesion-unet"
    assert events["node.started"]["data_dir"] == os.fspath(data_dir)
    assert events["node.no_destinations"]["results_dir"].startswith(os.fspath(data_dir))
    assert "node.stopped" in events
    assert sorted(p.name for p in config.parent.iterdir()) == ["reader.toml"], "nothing written beside it"


def test_model_path_that_does_not_exist_exits_2_with_one_line(installed: Installed, tmp_path: Path) -> None:
    """The old example's relative model path, copied to /etc/reader, names a missing folder: the node
    prints one line naming it and exits 2 (which the unit does not restart), before any port opens."""
    config = installed.path(CONFIG)
    original = config.read_text(encoding="utf-8")
    try:
        broken = original.replace('path = "bundled:lung-lesion-unet"', 'path = "../models/lung-lesion-unet"')
        assert broken != original
        config.write_text(broken, encoding="utf-8")
        log_path = tmp_path / "journal.log"
        process = installed.start(log_path)
        try:
            code = process.wait(_RUN_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(_STOP_S)
    finally:
        config.write_text(original, encoding="utf-8")
    lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert code == EXIT_CONFIG
    missing_dir = installed.path("/etc/models/lung-lesion-unet")
    assert len(lines) == 1 and lines[0].startswith("reader: configuration error: models"), lines
    assert os.fspath(missing_dir) in lines[0]


def test_example_config_copied_anywhere_resolves_the_bundled_model(tmp_path: Path) -> None:
    """The example loads from a copy in an unrelated folder: its model is the bundled package, and no
    destination is configured (results stay in the data dir)."""
    folder = tmp_path / "some" / "unrelated" / "place"
    folder.mkdir(parents=True)
    copy = folder / "reader.toml"
    copy.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config(copy)
    path = cfg.model(cfg.routes[0].model).path
    assert path == bundled_models_dir() / "lung-lesion-unet"
    assert (path / "model.toml").is_file()
    assert cfg.destinations == ()
    assert cfg.data_dir == folder.resolve() / "reader-data"


def test_example_destination_is_a_valid_commented_out_example(tmp_path: Path) -> None:
    """Uncommenting the example's [[destinations]] table (as the README's systemd section says) gives
    one destination."""
    text = EXAMPLE.read_text(encoding="utf-8")
    block = re.search(r"(?m)^# \[\[destinations\]\].*\n(?:# (?:ae_title|host|port) = .*\n){3}", text)
    assert block, "deploy/reader.example.toml: no commented-out [[destinations]] example"
    uncommented = re.sub(r"(?m)^# ", "", block.group(0))
    copy = tmp_path / "reader.toml"
    copy.write_text(text.replace(block.group(0), uncommented), encoding="utf-8")
    (destination,) = load_config(copy).destinations
    assert (destination.ae_title, destination.port) == ("ORTHANC", 4242)
