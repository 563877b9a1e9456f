"""A Docker engine and Docker Compose for the container tests (tests/test_containers.py).

Nothing here fakes Docker: :func:`docker_engine` uses the engine that answers on ``DOCKER_HOST`` (or
the default socket) and, where none does and we are root, starts Debian's ``dockerd`` (package
``docker.io``) itself and stops it at the end of the session. Compose is the binary that
``scripts/bootstrap dev`` installs into ``.cache/bin/docker-compose`` (pinned, sha256-checked).
No registry is reachable here, so base images are local stand-ins made by ``scripts/local-base-images``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import free_port, missing, wait_until

__all__ = ["REPO", "Compose", "DockerEngine", "docker_engine", "published"]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_BINARY = REPO / ".cache" / "bin" / "docker-compose"
_ENGINE_START_S = 60.0
_ENGINE_STOP_S = 30.0
_BUILD_S = 1200.0
_CALL_S = 120.0
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


@dataclass(frozen=True)
class DockerEngine:
    """A Docker engine that answers, and the ``docker`` client to reach it."""

    docker: str
    env: dict[str, str]

    def run(
        self, *args: str, timeout: float = _CALL_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS``; raise AssertionError with its output when ``check`` and it fails."""
        done = subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done

    def answers(self) -> bool:
        """True when the engine answers ``docker info``."""
        return self.run("info", "--format", "{{.ServerVersion}}", timeout=30, check=False).returncode == 0

    def base_images(self) -> None:
        """Make the local stand-ins of the base images the Dockerfiles name (kept once made)."""
        if shutil.which("debootstrap", path=_SBIN_PATH) is None:
            missing("program 'debootstrap' not found: install the Debian package 'debootstrap'")
        done = subprocess.run([str(REPO / "scripts" / "local-base-images")], capture_output=True, text=True,
                              timeout=_BUILD_S, env=self.env, check=False)
        if done.returncode != 0:
            raise AssertionError(
                f"scripts/local-base-images failed ({done.returncode}):\n{done.stderr[-3000:]}")


@dataclass(frozen=True)
class Compose:
    """``docker compose -p PROJECT -f FILE`` with the environment (ports) given."""

    engine: DockerEngine
    project: str
    file: Path
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout: float = _CALL_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one compose command; raise AssertionError with its output when ``check`` and it fails."""
        command = [str(COMPOSE_BINARY), "-p", self.project, "-f", str(self.file), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**self.engine.env, **self.env}, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    @staticmethod
    def binary() -> Path:
        """The pinned compose binary; fail under CI (skip elsewhere) when bootstrap has not installed it."""
        if not os.access(COMPOSE_BINARY, os.X_OK):
            missing(f"Docker Compose missing at {COMPOSE_BINARY}: run scripts/bootstrap dev")
        return COMPOSE_BINARY


def _client() -> str:
    path = shutil.which("docker")
    if path is None:
        missing("program 'docker' not found: install the Debian package 'docker.io'")
    return path


def _start_daemon(log_dir: Path) -> subprocess.Popen[bytes]:
    dockerd = shutil.which("dockerd", path=_SBIN_PATH)
    if dockerd is None:
        missing("program 'dockerd' not found: install the Debian package 'docker.io'")
    if os.geteuid() != 0:
        missing("no Docker engine answers and starting dockerd needs root")
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "dockerd.log").open("ab") as log:
        return subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A Docker engine for the session: the running one, else a ``dockerd`` started (and stopped) here."""
    engine = DockerEngine(_client(), {**os.environ, "DOCKER_CLI_HINTS": "false"})
    daemon: subprocess.Popen[bytes] | None = None
    if not engine.answers():
        daemon = _start_daemon(REPO / "test-artifacts" / "docker")
        wait_until(engine.answers, _ENGINE_START_S, "dockerd to answer `docker info`")
    try:
        yield engine
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(_ENGINE_STOP_S)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(_ENGINE_STOP_S)


def published(ports: Sequence[str]) -> dict[str, str]:
    """Unused loopback ports for the named compose variables (``PACS_DICOM_PORT`` ...)."""
    chosen: dict[str, str] = {}
    for name in ports:
        port = free_port()
        while str(port) in chosen.values():
            port = free_port()
        chosen[name] = str(port)
    return chosen
