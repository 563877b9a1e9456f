"""Prometheus metrics (reader.metrics) at /metrics of a real ``reader serve`` process.

A synthetic CT series (tests/reliability.py) is sent with DCMTK ``storescu`` to a node with the fast
fixture model and a destination nobody listens on (so sends are retried). The exposition is read
with httpx and parsed with prometheus_client's own parser; then a real Prometheus server (Debian
package ``prometheus``) scrapes the node every second and its query API must return the values.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from reader.assemble import CompletionTracker
from reader.config import load_config
from reader.jobs import SeriesStatus
from reader.metrics import MAX_CALLING_AES, OTHER, PROTOCOL_DIMSE, PROTOCOL_STOW, STAGES, NodeMetrics
from reader.scp import StorageSCP
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import LOCALHOST, free_port, require_tool, storescu, wait_until
from tests.reliability import MODEL_NAME, MODEL_VERSION, Study, serve_config, write_fixture_model, write_study

pytestmark = pytest.mark.integration

CALLING_AE = "METRICSSCU"
SLICES = 12
TIMEOUT_S = 30.0
PROCESSED_S = 120.0  # the fixture model reads a 12-slice series in about a second
PROMETHEUS_START_S = 60.0
PROMETHEUS_STOP_S = 15.0
SCRAPED_S = 60.0  # a few 1 s scrape intervals, with room for a loaded machine


def samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], metric: str, /, **labels: str) -> float:
    """The value of the one sample named ``metric`` whose labels include ``labels``."""
    matching = [s for s in found if s.name == metric and labels.items() <= s.labels.items()]
    assert len(matching) == 1, f"{metric}{labels}: {matching}"
    return matching[0].value


def test_exposition_counts_events_with_bounded_labels() -> None:
    """A NodeMetrics registry exposes every metric by its Prometheus name (units, ``_total``),
    counts what it is told, and caps the distinct calling AE titles (the rest count as _other)."""
    metrics = NodeMetrics()
    metrics.instance_received(PROTOCOL_DIMSE, "CT1 ", 1000)
    metrics.instance_received(PROTOCOL_DIMSE, "CT1", 500)
    metrics.instance_received(PROTOCOL_STOW, "pacs", 10)
    for n in range(MAX_CALLING_AES + 5):
        metrics.association_accepted(f"AE{n}")
    metrics.association_rejected("calling_ae_not_allowed")
    metrics.instance_refused("out_of_resources")
    metrics.series_completed(1.5)
    for status in (SeriesStatus.DONE, SeriesStatus.DONE, SeriesStatus.SKIPPED, SeriesStatus.FAILED):
        metrics.series_finished(status)
    metrics.stage_seconds("inference", 0.3)
    metrics.send_settled("PACS@127.0.0.1:104", "sent")
    metrics.send_retry("PACS@127.0.0.1:104")
    metrics.model_loaded("blob", name="m", version="1", weights_sha256="ab" * 32,
                         provider="CPUExecutionProvider", precision="fp32")
    metrics.watch(lambda: {"collecting": 2, "queued": 1}, Path.cwd(), 1234)

    body, media_type = metrics.exposition("")
    assert media_type.startswith("text/plain; version=0.0.4")
    found = samples(body.decode())
    assert value(found, "reader_instances_received_total", protocol="dimse", calling_ae="CT1") == 2
    assert value(found, "reader_received_bytes_total", protocol="dimse", calling_ae="CT1") == 1500
    assert value(found, "reader_instances_received_total", protocol="stow-rs", calling_ae="pacs") == 1
    places = MAX_CALLING_AES - 2  # "CT1" and "pacs" took two of the places
    others = MAX_CALLING_AES + 5 - places
    assert value(found, "reader_associations_accepted_total", calling_ae=OTHER) == others
    accepted = {s.labels["calling_ae"] for s in found if s.name == "reader_associations_accepted_total"}
    assert len(accepted) == places + 1
    assert value(found, "reader_associations_rejected_total", reason="calling_ae_not_allowed") == 1
    assert value(found, "reader_instances_refused_total", reason="out_of_resources") == 1
    assert value(found, "reader_series_completed_total") == 1
    assert value(found, "reader_series_processed_total") == 2
    assert value(found, "reader_series_skipped_total") == 1
    assert value(found, "reader_series_failed_total") == 1
    assert value(found, "reader_stage_seconds_count", stage="completion_wait") == 1
    assert value(found, "reader_stage_seconds_bucket", stage="inference", le="0.5") == 1
    assert {s.labels["stage"] for s in found if s.name == "reader_stage_seconds_count"} == set(STAGES)
    assert value(found, "reader_sends_total", target="PACS@127.0.0.1:104", outcome="sent") == 1
    assert value(found, "reader_send_retries_total", target="PACS@127.0.0.1:104") == 1
    assert value(found, "reader_model_info", model="blob", name="m", provider="CPUExecutionProvider") == 1
    assert value(found, "reader_queue_depth", stage="collecting") == 2
    assert value(found, "reader_disk_free_bytes") > 0
    assert value(found, "reader_disk_min_free_bytes") == 1234

    openmetrics, media_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert media_type.startswith("application/openmetrics-text")
    assert openmetrics.rstrip().endswith(b"# EOF")


@dataclass(frozen=True)
class Sent:
    """The running node and the study sent to it."""

    node: ReaderNode
    study: Study


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sent]:
    """A node that received one study with storescu and processed it; its results wait for a
    destination that does not answer."""
    model_dir = write_fixture_model(tmp_path_factory.mktemp("model"))
    study = write_study(tmp_path_factory.mktemp("study"), SLICES)
    node = ReaderNode(tmp_path_factory.mktemp("node"), config_text=serve_config(model_dir),
                      destinations=[f"PACS@{LOCALHOST}:{free_port()}"])
    try:
        done = storescu(LOCALHOST, node.port, node.ae_title, list(study.files), calling_ae=CALLING_AE)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: bool(node.events("series.processed")), PROCESSED_S, "series.processed")
        wait_until(lambda: bool(node.events("send.retry_scheduled")), PROCESSED_S, "a send retried")
        yield Sent(node, study)
    finally:
        node.stop()


def test_metrics_endpoint_serves_what_the_node_did_without_patient_data(sent: Sent) -> None:
    """GET /metrics (no token on loopback) counts the instances and bytes by calling AE, the
    accepted association, the completed and processed series, each stage's latency, the send
    retries, queue depths, free disk and the model; no UID or patient name appears in it."""
    answer = httpx.get(f"{sent.node.web_url}/metrics", timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(answer.text)
    labels = {"protocol": "dimse", "calling_ae": CALLING_AE}
    assert value(found, "reader_instances_received_total", **labels) == SLICES
    stored = sent.node.data_dir / "incoming" / sent.study.study_uid / sent.study.series_uid
    assert value(found, "reader_received_bytes_total", **labels) == sum(
        f.stat().st_size for f in stored.glob("*.dcm"))  # the bytes stored as received
    assert value(found, "reader_associations_accepted_total", calling_ae=CALLING_AE) == 1
    assert value(found, "reader_series_completed_total") == 1
    assert value(found, "reader_series_processed_total") == 1
    assert value(found, "reader_series_failed_total") == 0
    for stage in STAGES:
        assert value(found, "reader_stage_seconds_count", stage=stage) >= 1, stage
    assert value(found, "reader_send_retries_total") >= 1
    assert value(found, "reader_queue_depth", stage="sending") >= 1
    assert value(found, "reader_queue_depth", stage="collecting") == 0
    assert value(found, "reader_disk_free_bytes") > 0
    assert value(found, "reader_model_info", model="blob", name=MODEL_NAME, version=MODEL_VERSION) == 1
    for private in (sent.study.study_uid, sent.study.series_uid, *sent.study.sop_uids, "Synthetic", "SYNTH"):
        assert private not in answer.text


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus server and its HTTP API."""

    process: subprocess.Popen[bytes]
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` evaluates to now."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=TIMEOUT_S)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def ready(self) -> bool:
        """Prometheus answers /-/ready with 200."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=TIMEOUT_S).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def prometheus(sent: Sent, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus scraping the node's /metrics every second."""
    exe = require_tool("prometheus")
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": "reader", "metrics_path": "/metrics",
                                  "static_configs": [{"targets": [f"{LOCALHOST}:{sent.node.web_port}"]}]}]}
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen([exe, f"--config.file={config_file}",
                                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address={LOCALHOST}:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(process, f"http://{LOCALHOST}:{port}")
    try:
        wait_until(server.ready, PROMETHEUS_START_S, "prometheus ready")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(PROMETHEUS_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PROMETHEUS_STOP_S)


def test_prometheus_scrapes_the_node_and_returns_its_values(sent: Sent, prometheus: Prometheus) -> None:
    """A real Prometheus scraping the node every second reports the target up, and its query API
    returns the instances received by calling AE, the processed series, the model's info and a
    latency quantile computed from the stage histogram."""

    def scalar(promql: str) -> float | None:
        result = prometheus.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    wait_until(lambda: scalar('up{job="reader"}') == 1.0, SCRAPED_S, "the node's target up")
    wait_until(lambda: scalar(f'reader_instances_received_total{{calling_ae="{CALLING_AE}"}}') == SLICES,
               SCRAPED_S, f"reader_instances_received_total = {SLICES} in Prometheus")
    assert scalar("reader_series_processed_total") == 1.0
    (model,) = prometheus.query("reader_model_info")
    assert model["metric"]["name"] == MODEL_NAME and model["metric"]["model"] == "blob"
    assert len(model["metric"]["weights_sha256"]) == 64
    median = scalar('histogram_quantile(0.5, reader_stage_seconds_bucket{stage="inference"})')
    assert median is not None and 0 < median < PROCESSED_S
    assert (scalar('reader_queue_depth{stage="sending"}') or 0) >= 1


def test_stow_rs_instances_are_counted_by_caller(sent: Sent) -> None:
    """An instance POSTed by STOW-RS counts under protocol "stow-rs" and the caller's name (the
    node has no callers configured: "anonymous"), beside the C-STOREd ones."""
    boundary = "metrics-test-boundary"
    part = sent.study.files[0].read_bytes()
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    answer = httpx.post(f"{sent.node.web_url}/dicom-web/studies", content=body, timeout=TIMEOUT_S,
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                 f'boundary="{boundary}"'})
    assert answer.status_code == 200, answer.text
    found = samples(httpx.get(f"{sent.node.web_url}/metrics", timeout=TIMEOUT_S).text)
    stow = {"protocol": "stow-rs", "calling_ae": "anonymous"}
    assert value(found, "reader_instances_received_total", **stow) == 1
    assert value(found, "reader_received_bytes_total", **stow) == len(part)
    assert value(found, "reader_instances_received_total", protocol="dimse", calling_ae=CALLING_AE) == SLICES


def test_rejected_associations_are_counted_by_reason(tmp_path: Path) -> None:
    """Real associations to a listener with an allow-list and max_associations = 1: the one
    accepted counts by calling AE; a caller off the list counts as calling_ae_not_allowed, and a
    second concurrent association (rejected by pynetdicom itself) as too_many_associations."""
    config_file = tmp_path / "reader.toml"
    config_file.write_text('routes = []\n\n[node]\nmax_associations = 1\n\n'
                           '[security]\nallowed_callers = ["MODALITY"]\n', encoding="utf-8")
    config = replace(load_config(config_file, {"bind_address": LOCALHOST, "data_dir": tmp_path / "data"}),
                     port=0)  # any free port (the flag refuses 0)
    metrics = NodeMetrics()
    scp = StorageSCP(config, Spool(config.data_dir), CompletionTracker(config.completion), metrics=metrics)
    scp.start()

    def associate(calling_ae: str) -> Association:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.network_timeout = TIMEOUT_S
        ae.add_requested_context(Verification)
        return ae.associate(LOCALHOST, scp.port, ae_title=config.ae_title)

    try:
        first = associate("MODALITY")
        assert first.is_established
        try:
            assert associate("STRANGER").is_rejected
            assert associate("MODALITY").is_rejected
        finally:
            first.release()
    finally:
        scp.stop()
    found = samples(metrics.exposition("")[0].decode())
    assert value(found, "reader_associations_accepted_total", calling_ae="MODALITY") == 1
    assert value(found, "reader_associations_rejected_total", reason="calling_ae_not_allowed") == 1
    assert value(found, "reader_associations_rejected_total", reason="too_many_associations") == 1
