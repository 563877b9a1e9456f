"""The node's container image and the compose demo stack (deploy/compose.yaml), for real.

The images are built from this checkout by a real Docker engine (tests/containers.py) on local
stand-ins of their base images (scripts/local-base-images: no registry here), the stack is brought
up with Docker Compose, the sample CT study (Lung-PET-CT-Dx, TCIA, CC BY 4.0: Li P. et al. 2020,
https://doi.org/10.7937/TCIA.2020.NNC20461) is sent to its PACS with DCMTK storescu, and the node's
results are looked for in that PACS; then the stack is brought down with its volumes.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest

from tests.containers import REPO, Compose, DockerEngine, docker_engine, published
from tests.peers import LOCALHOST, require_data, storescu, wait_until

__all__ = ["docker_engine"]

pytestmark = [pytest.mark.integration, pytest.mark.containers]

NODE_IMAGE = "dicom-second-reader:0.1.0"
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SAMPLE_SERIES = ("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel", "lung-pet-ct-dx/ct-A0001-5mm-standard-kernel")
ARTIFACTS = REPO / "test-artifacts" / "containers"
_BUILD_S = 1500.0
_UP_S = 600.0
_RESULTS_S = 900.0
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> bytes:
    with _opener.open(url, timeout=30) as response:
        body: bytes = response.read()
        return body


def _json(url: str) -> Any:
    return json.loads(_get(url))


@pytest.fixture(scope="module")
def stack(docker_engine: DockerEngine) -> Iterator[Compose]:
    """The demo stack's images built from this checkout, and a compose project for it on free ports."""
    Compose.binary()
    docker_engine.base_images()
    ports = published(["PACS_DICOM_PORT", "PACS_HTTP_PORT", "READER_DICOM_PORT", "VIEWER_PORT",
                       "PROMETHEUS_PORT"])
    project = f"srtest{uuid.uuid4().hex[:8]}"
    compose = Compose(docker_engine, project, COMPOSE_FILE, {"BIND": LOCALHOST, **ports})
    compose("build", timeout=_BUILD_S)
    try:
        yield compose
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        logs = compose("logs", "--no-color", "--timestamps", check=False)
        (ARTIFACTS / "compose.log").write_text(logs.stdout + logs.stderr, encoding="utf-8")
        compose("down", "--volumes", "--remove-orphans", "--timeout", "60", timeout=300, check=False)


def test_node_image_runs_as_a_user_with_its_model_and_the_cpu_runtime(stack: Compose) -> None:
    """The node's image runs as uid 10001, keeps its data dir on a volume, checks readiness on
    /readyz, carries the bundled model, and has the CPU onnxruntime only (never both wheels)."""
    engine = stack.engine
    config = json.loads(engine.run("image", "inspect", NODE_IMAGE).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert "/var/lib/reader" in config["Volumes"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    probe = ("import importlib.metadata as m, reader.config as c; "
             "names = [d.metadata['Name'] for d in m.distributions()]; "
             "print(sorted(n for n in names if 'onnxruntime' in n)); "
             "print((c.bundled_models_dir() / 'lung-lesion-unet' / 'model.toml').is_file())")
    done = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python3", NODE_IMAGE, "-c", probe)
    assert done.stdout.split("\n")[:2] == ["['onnxruntime']", "True"], done.stdout
    who = engine.run("run", "--rm", "--network", "none", "--entrypoint", "id", NODE_IMAGE).stdout
    assert who.startswith("uid=10001(reader)"), who


def test_compose_demo_stack_returns_sr_and_seg_for_a_study_sent_to_its_pacs(stack: Compose) -> None:
    """`docker compose up` starts the PACS, the node, the viewer and Prometheus (healthy); the sample
    study sent to the PACS with storescu is routed to the node, whose SR, SEG and KOS come back into
    the PACS; the viewer serves OHIF and the PACS's DICOMweb through its proxy; Prometheus has
    scraped the node's instance count; `down` removes the stack."""
    series = [require_data(s) for s in SAMPLE_SERIES]
    first = min(series[0].iterdir())
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    stack("up", "--detach", "--wait", "--wait-timeout", str(int(_UP_S)), timeout=_UP_S + 60)
    env = stack.env
    pacs = f"http://{LOCALHOST}:{env['PACS_HTTP_PORT']}"

    sent = storescu(LOCALHOST, int(env["PACS_DICOM_PORT"]), "ORTHANC", series)
    assert sent.returncode == 0, sent.stderr[-2000:]

    def modalities() -> set[str]:
        found = _json(f"{pacs}/studies?expand")
        wanted = [s for s in found if s["MainDicomTags"].get("StudyInstanceUID") == study_uid]
        if not wanted:
            return set()
        return {_json(f"{pacs}/series/{sid}")["MainDicomTags"].get("Modality", "")
                for sid in wanted[0]["Series"]}

    wait_until(lambda: {"CT", "SR", "SEG", "KO"} <= modalities(), _RESULTS_S,
               "the node's SR, SEG and KOS in the compose PACS")

    viewer = f"http://{LOCALHOST}:{env['VIEWER_PORT']}"
    assert b"<title>" in _get(f"{viewer}/") and b"dataSources" in _get(f"{viewer}/app-config.js")
    listed = _json(f"{viewer}/dicom-web/studies/{study_uid}/series")
    assert {"SR", "SEG"} <= {s["00080060"]["Value"][0] for s in listed}

    prometheus = f"http://{LOCALHOST}:{env['PROMETHEUS_PORT']}/api/v1/query?query="

    def scraped() -> float:
        answer = _json(prometheus + "sum(reader_instances_received_total)")["data"]["result"]
        return float(answer[0]["value"][1]) if answer else 0.0

    wait_until(lambda: scraped() >= 128, 120, "Prometheus to scrape the node's 128 received instances")

    stack("down", "--volumes", "--timeout", "60", timeout=300)
    left = stack("ps", "--all", "--quiet").stdout.split()
    assert left == [], left
