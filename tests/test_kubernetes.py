"""deploy/kubernetes: each form renders with ``kubectl kustomize`` and every object it renders is valid.

Built-in kinds are validated by kubernetes-validate against the Kubernetes API of
:data:`KUBERNETES_VERSION` in strict mode (an unknown or misspelt field fails). The custom resources
(ServiceMonitor, ScaledObject, TriggerAuthentication) have no schema there: :data:`CRD_SCHEMAS` is a
structural check of the fields we set, written from their CRDs (prometheus-operator's
monitoring.coreos.com/v1 ServiceMonitor, KEDA's keda.sh/v1alpha1), closed to fields it does not list.
Then the tests assert what matters to a site: probes, GPUs, the Secret, images, the single node.
Offline and without a cluster: kubectl only renders.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import sqlalchemy as sa
import yaml

from reader.config import load_config
from reader.jobs import JobStore
from reader.spool import Spool
from tests.peers import require_tool
from tests.tls_certs import make_pki

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"  # the API the manifests are checked against (schemas ship in the package)
FORMS = ("base", "overlays/gpu", "overlays/cluster")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
DATABASE_SECRET = "reader-database"
KEDA_QUERY = "SELECT count(*) FROM jobs"  # the ScaledObject's, run below on the real schema
SECRETS_MOUNT = "/etc/reader-secrets"  # where the Deployment mounts the web server's Secrets
_RENDER_TIMEOUT_S = 60

_NAME = {"type": "string", "minLength": 1}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}


def _closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}
    return _closed({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                    "metadata": metadata, "spec": spec}, "apiVersion", "kind", "metadata", "spec")


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _resource("monitoring.coreos.com/v1", "ServiceMonitor", _closed({
        "selector": _closed({"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                            "matchLabels"),
        "endpoints": {"type": "array", "minItems": 1, "items": _closed({
            "port": _NAME, "path": {"type": "string", "pattern": "^/"},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "scheme": {"enum": ["http", "https"]},
            "tlsConfig": _closed({
                "ca": _closed({"secret": _closed({"name": _NAME, "key": _NAME}, "name", "key")}, "secret"),
                "serverName": _NAME})}, "port")},
    }, "selector", "endpoints")),
    "ScaledObject": _resource("keda.sh/v1alpha1", "ScaledObject", _closed({
        "scaleTargetRef": _closed({"name": _NAME, "kind": _NAME, "apiVersion": _NAME}, "name"),
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "triggers": {"type": "array", "minItems": 1, "items": _closed({
            "type": _NAME,
            # KEDA reads trigger metadata as strings only: an unquoted number is refused
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "authenticationRef": _closed({"name": _NAME, "kind": {"enum": ["TriggerAuthentication"]}},
                                         "name"),
        }, "type", "metadata")},
    }, "scaleTargetRef", "triggers")),
    "TriggerAuthentication": _resource("keda.sh/v1alpha1", "TriggerAuthentication", _closed({
        "secretTargetRef": {"type": "array", "minItems": 1, "items": _closed(
            {"parameter": _NAME, "name": _NAME, "key": _NAME}, "parameter", "name", "key")},
    }, "secretTargetRef")),
}


@functools.cache
def _render_text(form: str) -> str:
    kubectl = require_tool("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE / form)], capture_output=True, text=True,
                          timeout=_RENDER_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"kubectl kustomize {form} failed: {done.stderr}"
    return done.stdout


def render(form: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize deploy/kubernetes/<form>`` renders (fresh copies)."""
    return [o for o in yaml.safe_load_all(_render_text(form)) if o]


def validate(obj: dict[str, Any]) -> None:
    """Raise unless ``obj`` is valid: Kubernetes' schema, or ours for the custom resources."""
    if obj["kind"] in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("form", FORMS)
def test_every_rendered_object_validates(form: str) -> None:
    """Each form renders, and every object in it passes strict validation (Kubernetes or CRD schema)."""
    objects = render(form)
    assert objects
    for obj in objects:
        try:
            validate(obj)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{form}: {exc.message}: add a structural schema to CRD_SCHEMAS")


def test_the_validators_refuse_a_misspelt_or_mistyped_field() -> None:
    """The checks have teeth: a misspelt Deployment field, an unquoted KEDA value and an unknown
    ScaledObject field each fail validation."""
    objects = render("overlays/cluster")
    deployment = one(objects, "Deployment", "reader-worker")
    c = container(deployment)
    c["livenesProbe"] = c.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = one(objects, "ScaledObject", "reader-worker")
    scaled["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = one(render("overlays/cluster"), "ScaledObject", "reader-worker")
    scaled["spec"]["scaleTargetref"] = scaled["spec"].pop("scaleTargetRef")
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.parametrize("form", FORMS)
def test_probes_ask_healthz_and_readyz_on_the_http_port(form: str) -> None:
    """Every pod's liveness and startup probes GET /healthz, its readiness probe /readyz, over HTTPS
    on the port named ``http`` (8080)."""
    for name, deployment in deployments(render(form)).items():
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == 8080, name
        for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/healthz"),
                            ("readinessProbe", "/readyz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}, (name, probe)


@pytest.mark.parametrize("form", FORMS)
def test_the_configmap_is_a_valid_reader_toml_matching_the_ports(form: str, tmp_path: Path) -> None:
    """The ConfigMap's reader.toml loads with the node's own config loader, and listens where the
    containers and Services expect it: DICOM on every address at the port ``dicom`` (11112), and,
    once the node has an HTTP server, that server on a non-loopback address at the port ``http``."""
    objects = render(form)
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    # The Secrets' files, where the Deployment mounts them, made here: a certificate and a token.
    pki = make_pki(tmp_path / "pki")
    secrets = tmp_path / "secrets"
    (secrets / "web-tls").mkdir(parents=True)
    shutil.copy(pki.server_cert, secrets / "web-tls" / "tls.crt")
    shutil.copy(pki.server_key, secrets / "web-tls" / "tls.key")
    (secrets / "web-callers").mkdir()
    (secrets / "web-callers" / "pacs").write_text("a-token-of-sixteen-characters-or-more", encoding="utf-8")
    text = config_map["data"]["reader.toml"]
    assert SECRETS_MOUNT in text
    path = tmp_path / "reader.toml"
    path.write_text(text.replace(SECRETS_MOUNT, secrets.as_posix()), encoding="utf-8")
    config = load_config(path)
    assert config.bind_address == "0.0.0.0"
    assert config.port == 11112
    assert one(objects, "Service", "reader-dicom")["spec"]["ports"][0]["port"] == config.port
    for name, deployment in deployments(objects).items():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes, name
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert ports.get("dicom", config.port) == config.port, name
    web = config.web
    assert web is not None
    assert web.port == 8080
    assert not web.loopback, "probes and Prometheus reach the pod's address, not its loopback"
    assert web.tls is not None and config.security.web_callers, "anywhere but loopback: HTTPS and callers"
    for name, deployment in deployments(objects).items():
        probes = [container(deployment)[p] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
        assert {p["httpGet"]["scheme"] for p in probes} == {"HTTPS"}, name
        mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert {f"{SECRETS_MOUNT}/web-tls", f"{SECRETS_MOUNT}/web-callers"} <= mounts, name


def test_images_carry_the_project_version() -> None:
    """The CPU image is dicom-second-reader:<version>, the CUDA image <version>-cuda: base and the
    cluster's receivers run the first, the gpu overlay and the cluster's workers the second."""
    expected = {
        ("base", "reader"): f"dicom-second-reader:{VERSION}",
        ("overlays/gpu", "reader"): f"dicom-second-reader:{VERSION}-cuda",
        ("overlays/cluster", "reader-receiver"): f"dicom-second-reader:{VERSION}",
        ("overlays/cluster", "reader-worker"): f"dicom-second-reader:{VERSION}-cuda",
    }
    found = {(form, name): container(d)["image"]
             for form in FORMS for name, d in deployments(render(form)).items()}
    assert found == expected


def test_gpu_pods_request_a_gpu_on_gpu_nodes_and_others_none() -> None:
    """The gpu overlay's node and the cluster's workers request and limit one nvidia.com/gpu, select
    GPU nodes and tolerate their taint; base's node and the receivers ask for no GPU."""
    cluster = deployments(render("overlays/cluster"))
    gpu = [deployments(render("overlays/gpu"))["reader"], cluster["reader-worker"]]
    cpu = [deployments(render("base"))["reader"], cluster["reader-receiver"]]
    for deployment in gpu:
        resources = container(deployment)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert resources["limits"]["nvidia.com/gpu"] == 1
        pod = deployment["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for deployment in cpu:
        resources = container(deployment)["resources"]
        assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
        assert "nodeSelector" not in deployment["spec"]["template"]["spec"]


def test_single_node_base_is_one_locked_down_pod() -> None:
    """base is today's node: one Deployment, 1 replica, Recreate, ``reader serve`` on the config and
    the data dir volume, uid 10001, non-root, read-only root, no privilege, and no custom resource."""
    objects = render("base")
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment"}
    (deployment,) = deployments(objects).values()
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    c = container(deployment)
    assert [*c["command"], *c["args"]] == ["reader", "serve", "--config", "/etc/reader/reader.toml",
                                           "--data-dir", "/var/lib/reader"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/etc/reader": "config", "/var/lib/reader": "data", "/tmp": "tmp",
                      f"{SECRETS_MOUNT}/web-tls": "web-tls", f"{SECRETS_MOUNT}/web-callers": "web-callers"}
    claim = {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
    one(objects, "PersistentVolumeClaim", claim)
    assert {o["kind"] for o in render("overlays/gpu")} == {o["kind"] for o in objects}


def test_the_database_secret_is_referenced_never_inlined() -> None:
    """No form renders a Secret or a connection string: the cluster's pods take READER_DATABASE_URL
    from the Secret reader-database, and KEDA's TriggerAuthentication reads the same Secret key."""
    for form in FORMS:
        text = _render_text(form)
        assert not re.search(r"postgres(ql)?://", text), form
        assert "Secret" not in {o["kind"] for o in render(form)}, form
    objects = render("overlays/cluster")
    for name, deployment in deployments(objects).items():
        env = {e["name"]: e for e in container(deployment)["env"]}
        assert env["READER_DATABASE_URL"] == {
            "name": "READER_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": DATABASE_SECRET, "key": "url"}}}, name
    auth = one(objects, "TriggerAuthentication", DATABASE_SECRET)
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "connection", "name": DATABASE_SECRET, "key": "url"}]


def test_cluster_runs_receivers_and_keda_scaled_gpu_workers() -> None:
    """The cluster overlay: receivers (``--role receiver``) behind the DICOM Service, workers
    (``--role worker --device cuda:0``) without a replica count, scaled by one KEDA postgresql trigger
    on queued jobs, all on one ReadWriteMany data dir."""
    objects = render("overlays/cluster")
    found = deployments(objects)
    assert set(found) == {"reader-receiver", "reader-worker"}
    receiver, worker = found["reader-receiver"], found["reader-worker"]
    assert container(receiver)["args"][:3] == ["serve", "--role", "receiver"]
    assert container(worker)["args"][:5] == ["serve", "--role", "worker", "--device", "cuda:0"]
    assert "replicas" not in worker["spec"]
    assert "dicom" not in {p["name"] for p in container(worker)["ports"]}
    dicom = one(objects, "Service", "reader-dicom")
    assert dicom["spec"]["selector"] == receiver["spec"]["selector"]["matchLabels"]
    assert one(objects, "PersistentVolumeClaim", "reader-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    scaled = one(objects, "ScaledObject", "reader-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "reader-worker"}
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["authenticationRef"] == {"name": DATABASE_SECRET}
    assert trigger["metadata"]["query"] == KEDA_QUERY
    # the query is kept in one place: no other file under deploy/ restates it
    holders = [p for p in (ROOT / "deploy").rglob("*")
               if p.is_file() and "FROM jobs" in p.read_text(errors="replace")]
    assert holders == [KUSTOMIZE / "overlays" / "cluster" / "scaledobject.yaml"]


def test_the_keda_query_counts_the_queued_jobs_of_the_real_schema(postgres: str, tmp_path: Path) -> None:
    """The ScaledObject's query runs on a PostgreSQL holding the node's schema and counts the jobs
    queued there (and claimed ones, being read), so KEDA scales on what the node really queued."""
    spool = Spool(tmp_path / "data")
    jobs = JobStore.open(spool, postgres)
    try:
        queued = [jobs.enqueue_if_changed("1.2.3", f"1.2.3.{n}", (f"1.2.3.{n}.1",)) for n in range(3)]
        first = queued[0]
        assert first is not None
        assert jobs.claim_job(first, 60.0)
        with jobs.database.transaction(write=False) as conn:
            assert conn.execute(sa.text(KEDA_QUERY)).scalar() == 3
    finally:
        jobs.close()


def test_servicemonitor_scrapes_metrics_on_the_http_service() -> None:
    """The ServiceMonitor selects the Service reader-http (which has a port ``http`` and selects every
    pod of the node) and scrapes /metrics there."""
    objects = render("overlays/cluster")
    monitor = one(objects, "ServiceMonitor", "reader")
    selected = [o for o in objects if o["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["reader-http"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == ["http"]
    assert selected[0]["spec"]["selector"] == {"app.kubernetes.io/name": "dicom-second-reader"}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
