"""Node configuration: frozen, typed, validated once at start-up.

A TOML file (``deploy/reader.example.toml`` documents every key) plus command-line overrides give
one :class:`NodeConfig`. Any invalid key raises :class:`reader.errors.ConfigError` naming the key
and the problem, before a port opens. Durations are :class:`datetime.timedelta`, paths
:class:`pathlib.Path`; the file spells units in key names (``grace_seconds``).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from reader.access import AccessPolicy, AllowedCaller, is_loopback, parse_network
from reader.dicomweb import Credential, CredentialError, StowAuth, StowDestination
from reader.errors import ConfigError
from reader.flag import FlagRule, parse_flag_rule
from reader.notify.hl7 import MllpEndpoint
from reader.notify.webhook import WebhookEndpoint
from reader.passwords import WebUser, read_users
from reader.send import Destination, validate_ae_title
from reader.study import DEFAULT_LUNG_KERNELS, SeriesPreference
from reader.tls import TlsClientConfig, TlsServerConfig, client_context, server_context

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_PROVIDERS",
    "AnyDestination",
    "AuditCollector",
    "AuditConfig",
    "ClusterConfig",
    "CompletionConfig",
    "Device",
    "InferenceConfig",
    "ModelRef",
    "NodeConfig",
    "RetentionConfig",
    "Role",
    "Route",
    "SecurityConfig",
    "SendingConfig",
    "Source",
    "WebCaller",
    "WebConfig",
    "WebTlsConfig",
    "bundled_models_dir",
    "default_config",
    "load_config",
    "redact_url",
]

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DATABASE_URL_ENV = "READER_DATABASE_URL"  # overrides [cluster] database (the Kubernetes overlay sets it)
DEFAULT_MODEL = "lung-lesion-unet"
BUNDLED_PREFIX = "bundled:"  # a model path "bundled:NAME" names the package models/NAME of this checkout

AnyDestination = Destination | StowDestination
"""Where results go: a C-STORE SCP (``reader.send``) or a DICOMweb service (STOW-RS, ``reader.dicomweb``)."""


def bundled_models_dir() -> Path:
    """The ``models/`` folder of the checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class CompletionConfig:
    """When a series counts as complete (see ``reader.assemble``)."""

    grace: timedelta = timedelta(seconds=1.5)  # after the last association that carried it is released
    idle_timeout: timedelta = timedelta(seconds=30)  # since its last instance, associations still open


@dataclass(frozen=True)
class SendingConfig:
    """Retry schedule of C-STORE to destinations: exponential backoff with jitter, then parked."""

    retry_initial: timedelta = timedelta(seconds=5)
    retry_max: timedelta = timedelta(minutes=10)
    max_attempts: int = 20
    association_timeout: timedelta = timedelta(seconds=30)


@dataclass(frozen=True)
class RetentionConfig:
    """How long the node keeps what it has finished with (``reader.retention``); ``None``: for ever.

    Ages count from the moment a piece of data stopped being needed: received instances from
    their series' results being delivered or parked (or the series skipped or failed), results
    from their last send settling, settled state from its last change.
    """

    enabled: bool = True  # False: no sweeps at all (an interrupted ``reader purge`` is still completed)
    instances: timedelta | None = timedelta(hours=24)
    results: timedelta | None = timedelta(days=30)
    history: timedelta | None = timedelta(days=90)
    disk_margin_bytes: int = 1024 * 1024 * 1024  # sweep by age order while free < watermark + margin
    sweep_interval: timedelta = timedelta(minutes=10)


@dataclass(frozen=True)
class InferenceConfig:
    """onnxruntime execution providers, tried in this order, and whether fp16 graphs may be used."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    fp16: bool = True


@dataclass(frozen=True)
class ModelRef:
    """A model package folder (``models/MANIFEST.md``) known by a name that routes refer to."""

    name: str
    path: Path


@dataclass(frozen=True)
class Route:
    """A declarative routing rule: every given criterion must hold for the series to match.

    Criteria read the series header (PS3.3 C.7.3.1 General Series, C.7.6.2 Image Plane): Modality,
    SOP Class UID, Body Part Examined, Series Description (a regular expression, searched
    case-insensitively), number of instances and Slice Thickness ranges (inclusive).
    """

    name: str
    model: str
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    series_description: re.Pattern[str] | None = None
    min_instances: int | None = None
    max_instances: int | None = None
    min_slice_thickness_mm: float | None = None
    max_slice_thickness_mm: float | None = None
    flag: FlagRule = field(default_factory=FlagRule.any_finding)  # docs/worklist.md
    # "study": one result per study, from the series ``prefer`` ranks first (reader.study);
    # "series": every matching series is read on its own.
    read: Literal["study", "series"] = "study"
    prefer: SeriesPreference = field(default_factory=lambda: SeriesPreference.of(DEFAULT_LUNG_KERNELS))


@dataclass(frozen=True)
class Source:
    """A PACS the node reads studies back from (``reader backfill --from NAME``): a Query/Retrieve
    SCP (PS3.4 Annex C, Study Root) that knows the node's AE title as a C-MOVE destination."""

    name: str
    ae_title: str = ""  # DIMSE sources: the PACS's Query/Retrieve SCP
    host: str = ""
    port: int = 0
    url: str = ""  # DICOMweb sources: the root of QIDO-RS and WADO-RS (then retrieve is "get")
    hold_ttl: timedelta = timedelta(hours=24)  # how long the node waits for a study's missing instances
    # "move": C-MOVE to the node's AE title (the PACS connects to the node); "get": C-GET (or, for a
    # DICOMweb source, WADO-RS) to the backfill, which stores each series to the node itself
    retrieve: Literal["move", "get"] = "move"


@dataclass(frozen=True)
class Hl7Target:
    """A RIS/worklist receiving an HL7 v2.5.1 ORU^R01 per processed study (docs/worklist.md)."""

    endpoint: MllpEndpoint
    receiving_application: str
    receiving_facility: str
    send_negative: bool = True  # also report studies reviewed without a flag


@dataclass(frozen=True)
class WebhookTarget:
    """A URL receiving a signed JSON event per processed study (docs/worklist.md)."""

    endpoint: WebhookEndpoint
    send_negative: bool = True


@dataclass(frozen=True)
class WorklistConfig:
    """Flag delivery beyond the PACS: HL7 to the RIS, webhooks, and what counts as STAT."""

    sending_application: str = "SECONDREADER"
    sending_facility: str = "RADIOLOGY"
    hl7: tuple[Hl7Target, ...] = ()
    webhooks: tuple[WebhookTarget, ...] = ()
    stat_accession_prefixes: tuple[str, ...] = ()  # plus C-STORE Priority HIGH (PS3.7 9.1.1.1.5)


@dataclass(frozen=True)
class WebCaller:
    """A caller of the HTTP API (STOW-RS), known by the SHA-256 of its bearer token.

    Only the digest is kept: the token itself stays in the file it was read from.
    """

    name: str
    token_sha256: bytes

    def __post_init__(self) -> None:
        if len(self.token_sha256) != hashlib.sha256().digest_size:
            raise ValueError("token_sha256 must be a SHA-256 digest (32 bytes)")


@dataclass(frozen=True)
class SecurityConfig:
    """Who may associate (``reader.access``), TLS on the listening port (``reader.tls``), and who
    may call the HTTP API (``web_callers``; none: every caller, allowed on a loopback bind only).

    ``tls`` None serves plain DICOM; otherwise the port speaks only TLS (PS3.15 B.9).
    """

    access: AccessPolicy = field(default_factory=AccessPolicy)
    tls: TlsServerConfig | None = None
    web_callers: tuple[WebCaller, ...] = ()


@dataclass(frozen=True)
class WebTlsConfig:
    """HTTPS on the web port: our certificate (with its chain) and its unencrypted private key (PEM)."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class WebConfig:
    """The node's HTTP server (``reader.web``): health probes and STOW-RS.

    ``port`` 0 takes any free port (the bound one is logged as ``web.listening``). A bind address
    other than loopback needs ``tls`` and at least one ``[[security.web_callers]]``. ``users``
    (read from ``users_file``, ``reader.passwords``) may sign in to the status pages, as may the
    web callers with their token; with either, every page needs a sign-in.
    """

    bind_address: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 1024**3  # a larger STOW-RS body is refused (413); held in memory while parsed
    tls: WebTlsConfig | None = None
    users: tuple[WebUser, ...] = ()
    users_file: Path | None = None

    @property
    def loopback(self) -> bool:
        """True when the server listens on a loopback address only."""
        return is_loopback(self.bind_address)


@dataclass(frozen=True)
class AuditCollector:
    """A syslog collector (an ATNA audit record repository) receiving the audit messages: RFC 5424
    over TCP with octet counting (RFC 6587), or over TLS (RFC 5425) when ``tls`` is given."""

    host: str
    port: int
    tls: TlsClientConfig | None = None

    @property
    def key(self) -> str:
        """``HOST:PORT``: names the collector's outbox folder and its log events."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (``reader.audit``): DICOM PS3.15 A.5 messages to a local file and collectors.

    ``file`` None: ``<data_dir>/audit/audit.log``. ``source_id`` None: the node's AE title.
    """

    enabled: bool = True
    file: Path | None = None
    collectors: tuple[AuditCollector, ...] = ()
    source_id: str | None = None  # AuditSourceID of every message
    enterprise_site: str | None = None  # AuditEnterpriseSiteID, e.g. the hospital
    retry_max: timedelta = timedelta(seconds=30)  # longest wait between tries of a collector that is down


class Role(StrEnum):
    """What one ``reader serve`` process does (``--role``; README "Cluster").

    ``all``: the whole node in one process (the default); ``receiver``: the DICOM listener and
    STOW-RS, series completion, dispatch of sends and retention; ``worker``: claims complete series,
    reads them (load, infer, encode), writes the results and queues and dispatches their sends.
    """

    ALL = "all"
    RECEIVER = "receiver"
    WORKER = "worker"


_DEVICE = re.compile(r"(?:cpu|cuda:(0|[1-9][0-9]{0,3}))")


@dataclass(frozen=True)
class Device:
    """Where a worker runs its models: the CPU, or one CUDA GPU by its index (``--device``).

    ``cuda:N`` asks onnxruntime for its CUDA execution provider on GPU ``N`` (provider option
    ``device_id``), with the CPU provider as the fallback; ``cpu`` asks for the CPU provider only.
    """

    kind: Literal["cpu", "cuda"]
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda") or self.index < 0 or (self.kind == "cpu" and self.index):
            raise ValueError(f"not a device: {self.kind}:{self.index}")

    @classmethod
    def parse(cls, text: str, key: str = "--device") -> Device:
        """``"cpu"`` or ``"cuda:N"`` (N ≥ 0); anything else raises ConfigError naming ``key``."""
        match = _DEVICE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(key, f'must be "cpu" or "cuda:N" (N a GPU index, 0 or more), got {text!r}')
        return cls("cpu") if match.group(1) is None else cls("cuda", int(match.group(1)))

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def providers(self) -> tuple[str, ...]:
        """The onnxruntime execution providers to ask for, in order."""
        if self.kind == "cpu":
            return ("CPUExecutionProvider",)
        return ("CUDAExecutionProvider", "CPUExecutionProvider")

    @property
    def provider_options(self) -> Mapping[str, Mapping[str, str]]:
        """Options per provider: the GPU index for CUDA."""
        return {} if self.kind == "cpu" else {"CUDAExecutionProvider": {"device_id": str(self.index)}}


@dataclass(frozen=True)
class ClusterConfig:
    """Several processes sharing one state database and one storage folder (README "Cluster").

    ``database`` None: the single node's SQLite file ``<data_dir>/state.db``; otherwise
    ``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (environment variable
    ``READER_DATABASE_URL`` overrides it). Its password is never shown: see :func:`redact_url`.
    ``storage`` is the folder every process mounts; when set it is the data dir. ``lease``: how long
    a claimed job or send stays ours without renewal; ``poll_interval``: how often idle workers look
    at the queue. ``reuse_port``: the DICOM listener binds with SO_REUSEPORT, so that several
    receivers share the port and the kernel spreads the associations between them.
    """

    database: str | None = None
    storage: Path | None = None
    lease: timedelta = timedelta(seconds=60)
    poll_interval: timedelta = timedelta(seconds=0.05)
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.database is not None:
            _database_url(self.database, "cluster.database")
        if self.lease <= timedelta(0):
            raise ConfigError("cluster.lease_seconds", "must be positive")
        if self.poll_interval <= timedelta(0):
            raise ConfigError("cluster.poll_interval_seconds", "must be positive")
        if self.storage is not None and not self.storage.is_absolute():
            raise ConfigError("cluster.storage", f"must be an absolute path, got {self.storage}")

    def __repr__(self) -> str:
        return (f"ClusterConfig(database={self.database_redacted!r}, storage={self.storage!r}, "
                f"lease={self.lease!r}, poll_interval={self.poll_interval!r}, "
                f"reuse_port={self.reuse_port!r})")

    @property
    def database_redacted(self) -> str | None:
        """``database`` with its password replaced by ``***``, fit for logs and pages."""
        return None if self.database is None else redact_url(self.database)


def redact_url(url: str) -> str:
    """``url`` with the password of its user information replaced by ``***`` (the user name stays).

    Everything between the user name's ``:`` and the last ``@`` goes, so that a password holding
    ``/`` or ``@`` unescaped is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0 or ":" not in rest[:at]:
        return url
    return f"{scheme}://{rest[:at].partition(':')[0]}:***@{rest[at + 1:]}"


def _database_url(value: Any, key: str) -> str:
    """A database URL: ``sqlite:///PATH`` or ``postgresql://...``; ConfigError otherwise."""
    url = _str(value, key)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ConfigError(key, "a SQLite URL is sqlite:///PATH (three slashes, then the file)")
        return url
    if scheme == "postgresql":
        parts = urlsplit(url)
        if not parts.hostname and "unix_sock=" not in parts.query:  # pg8000: ?unix_sock=/run/...
            raise ConfigError(key, f"names no host: {redact_url(url)}")
        return url
    raise ConfigError(key, f"must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB, "
                           f"got {redact_url(url)!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``reader serve`` needs; built by :func:`load_config` or :func:`default_config`."""

    ae_title: str = "SECONDREADER"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("reader-data")
    destinations: tuple[AnyDestination, ...] = ()
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    sending: SendingConfig = field(default_factory=SendingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    models: tuple[ModelRef, ...] = ()
    routes: tuple[Route, ...] = ()
    max_associations: int = 16
    min_free_disk_bytes: int = 512 * 1024 * 1024  # below it C-STORE answers Out of Resources
    max_pdu_bytes: int = 1024 * 1024  # largest PDU we tell peers to send us (PS3.8 D.1); 0 = no limit
    acse_timeout: timedelta = timedelta(seconds=30)  # A-ASSOCIATE-RQ and A-RELEASE wait (accepting)
    dimse_timeout: timedelta = timedelta(seconds=60)  # wait for the next DIMSE message
    network_timeout: timedelta = timedelta(seconds=60)  # idle association, TLS handshake, stalled reads
    security: SecurityConfig = field(default_factory=SecurityConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)
    web: WebConfig | None = None  # None: no HTTP server (a configuration file turns it on by default)
    audit: AuditConfig = field(default_factory=AuditConfig)
    sources: tuple[Source, ...] = ()  # PACS to read studies back from (reader.backfill)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # README "Cluster"

    def source(self, name: str) -> Source:
        """The source named ``name`` (case-insensitive); raises KeyError."""
        for s in self.sources:
            if s.name.casefold() == name.casefold():
                return s
        raise KeyError(name)

    def model(self, name: str) -> ModelRef:
        """The model named ``name``; routes are checked against the models at load time."""
        for ref in self.models:
            if ref.name == name:
                return ref
        raise KeyError(name)


def default_config() -> NodeConfig:
    """Built-in defaults: AE SECONDREADER on port 11112, ./reader-data, the bundled CT model."""
    model = ModelRef(DEFAULT_MODEL, bundled_models_dir() / DEFAULT_MODEL)
    route = Route(name="ct-chest", model=DEFAULT_MODEL, modalities=("CT",), min_instances=16)
    return NodeConfig(models=(model,), routes=(route,), web=WebConfig())


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Read ``path`` (TOML) over the defaults, then apply command-line ``overrides``.

    ``overrides`` keys: ae_title, port, data_dir, bind_address, destinations (list of
    ``AE@HOST:PORT``, or a DICOMweb URL without authentication), web_port (turns the HTTP server
    on; 0: any free port). Relative paths in the file are relative to the file's folder; a model
    path ``"bundled:NAME"`` is the package ``NAME`` in :func:`bundled_models_dir`, wherever the
    file sits.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc
        base = path.resolve().parent
    config = _from_mapping(raw, base)
    return _apply_overrides(config, overrides or {})


def _from_mapping(raw: Mapping[str, Any], base: Path) -> NodeConfig:
    defaults = default_config()
    _known(raw, "", {"node", "completion", "sending", "inference", "models", "routes", "destinations",
                     "security", "hl7", "webhooks", "priority", "web", "audit", "sources", "retention",
                     "cluster"})
    node = _table(raw, "node")
    _known(node, "node.", {"ae_title", "bind_address", "port", "data_dir", "max_associations",
                           "min_free_disk_mb", "max_pdu_bytes", "acse_timeout_seconds",
                           "dimse_timeout_seconds", "network_timeout_seconds"})
    models = _models(raw, base) if "models" in raw else defaults.models
    routes = _routes(raw, models) if "routes" in raw else defaults.routes
    security = _security(_table(raw, "security"), base)
    web = _web(_table(raw, "web"), base)
    cluster = _cluster(_table(raw, "cluster"), base)
    data_dir = _path(node.get("data_dir", str(defaults.data_dir)), "node.data_dir", base)
    if cluster.storage is not None:
        if "data_dir" in node and data_dir.resolve() != cluster.storage.resolve():
            raise ConfigError("cluster.storage", f"is the data dir when set, and node.data_dir names another "
                                                 f"folder ({data_dir}): give one of them")
        data_dir = cluster.storage
    config = NodeConfig(
        ae_title=_ae_title(node.get("ae_title", defaults.ae_title), "node.ae_title"),
        bind_address=_str(node.get("bind_address", defaults.bind_address), "node.bind_address"),
        port=_port(node.get("port", defaults.port), "node.port"),
        data_dir=data_dir,
        max_associations=_int(node.get("max_associations", defaults.max_associations),
                              "node.max_associations", 1, 1000),
        min_free_disk_bytes=_int(node.get("min_free_disk_mb", defaults.min_free_disk_bytes // 2**20),
                                 "node.min_free_disk_mb", 0, 2**30) * 2**20,
        max_pdu_bytes=_max_pdu(node.get("max_pdu_bytes", defaults.max_pdu_bytes), "node.max_pdu_bytes"),
        acse_timeout=_seconds(node.get("acse_timeout_seconds", defaults.acse_timeout.total_seconds()),
                              "node.acse_timeout_seconds", 1, 3600),
        dimse_timeout=_seconds(node.get("dimse_timeout_seconds", defaults.dimse_timeout.total_seconds()),
                               "node.dimse_timeout_seconds", 1, 3600),
        network_timeout=_seconds(node.get("network_timeout_seconds",
                                          defaults.network_timeout.total_seconds()),
                                 "node.network_timeout_seconds", 1, 3600),
        security=security,
        web=web,
        destinations=_destinations(_list(raw.get("destinations", []), "destinations"), "destinations", base),
        completion=_completion(_table(raw, "completion")),
        sending=_sending(_table(raw, "sending")),
        retention=_retention(_table(raw, "retention")),
        inference=_inference(_table(raw, "inference")),
        models=models,
        routes=routes,
        worklist=_worklist(raw, base),
        audit=_audit(_table(raw, "audit"), base),
        sources=_sources(raw),
        cluster=cluster,
    )
    _check_web_exposure(config)
    return config


def _apply_overrides(config: NodeConfig, overrides: Mapping[str, Any]) -> NodeConfig:
    changes: dict[str, Any] = {}
    if overrides.get("ae_title") is not None:
        changes["ae_title"] = _ae_title(overrides["ae_title"], "--ae-title")
    if overrides.get("port") is not None:
        changes["port"] = _port(_flag_int(overrides["port"]), "--port")
    if overrides.get("bind_address") is not None:
        changes["bind_address"] = _str(overrides["bind_address"], "--bind")
    if overrides.get("data_dir") is not None:
        changes["data_dir"] = Path(overrides["data_dir"])
        if config.cluster.storage is not None:  # the flag names the shared storage too
            changes["cluster"] = replace(config.cluster, storage=changes["data_dir"].resolve())
    if overrides.get("destinations"):
        changes["destinations"] = _destinations(list(overrides["destinations"]), "--send-to", Path.cwd())
    if overrides.get("web_port") is not None:
        changes["web"] = replace(config.web or WebConfig(),
                                 port=_int(_flag_int(overrides["web_port"]), "--web-port", 0, 65535))
    return replace(config, **changes)


def _cluster(t: Mapping[str, Any], base: Path) -> ClusterConfig:
    """``[cluster]``; the environment's ``READER_DATABASE_URL`` (when not empty) wins over ``database``."""
    _known(t, "cluster.", {"database", "storage", "lease_seconds", "poll_interval_seconds", "reuse_port"})
    d = ClusterConfig()
    env = os.environ.get(DATABASE_URL_ENV, "")
    database = _database_url(env, DATABASE_URL_ENV) if env else t.get("database")  # checked by ClusterConfig
    return ClusterConfig(
        database=database,
        storage=_opt_path(t.get("storage"), "cluster.storage", base),
        lease=_seconds(t.get("lease_seconds", d.lease.total_seconds()), "cluster.lease_seconds", 1, 86400),
        poll_interval=_seconds(t.get("poll_interval_seconds", d.poll_interval.total_seconds()),
                               "cluster.poll_interval_seconds", 0.001, 60),
        reuse_port=_bool(t.get("reuse_port", d.reuse_port), "cluster.reuse_port"),
    )


def _web(t: Mapping[str, Any], base: Path) -> WebConfig | None:
    _known(t, "web.", {"enabled", "bind_address", "port", "max_request_mb", "tls", "users_file"})
    if not _bool(t.get("enabled", True), "web.enabled"):
        return None
    d = WebConfig()
    tls_table = _table(t, "tls")
    _known(tls_table, "web.tls.", {"certificate", "private_key"})
    tls = None
    if tls_table:
        for required in ("certificate", "private_key"):
            if required not in tls_table:
                raise ConfigError(f"web.tls.{required}", "is required in [web.tls]")
        tls = WebTlsConfig(_path(tls_table["certificate"], "web.tls.certificate", base),
                           _path(tls_table["private_key"], "web.tls.private_key", base))
        try:  # a bad file fails now, not in the server thread
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certificate,
                                                                                 tls.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("web.tls", f"cannot load the certificate and key: {exc}") from exc
    users_file, users = _web_users(t, base)
    return WebConfig(
        bind_address=_str(t.get("bind_address", d.bind_address), "web.bind_address"),
        port=_int(t.get("port", d.port), "web.port", 0, 65535),
        max_request_bytes=_int(t.get("max_request_mb", d.max_request_bytes // 2**20), "web.max_request_mb",
                               1, 2**20) * 2**20,
        tls=tls,
        users=users,
        users_file=users_file,
    )


def _web_users(t: Mapping[str, Any], base: Path) -> tuple[Path | None, tuple[WebUser, ...]]:
    if "users_file" not in t:
        return None, ()
    path = _path(t["users_file"], "web.users_file", base)
    try:
        users = read_users(path)
    except OSError as exc:
        raise ConfigError("web.users_file", f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError("web.users_file", str(exc)) from exc
    if not users:
        raise ConfigError("web.users_file", f"{path} lists no user")
    return path, users


def _check_web_exposure(config: NodeConfig) -> None:
    """Beyond loopback the HTTP server speaks HTTPS only and admits only callers with a token."""
    web = config.web
    if web is None or web.loopback:
        return
    if web.tls is None:
        raise ConfigError("web.bind_address", f"{web.bind_address} is not loopback: needs [web.tls]")
    if not config.security.web_callers:
        raise ConfigError("web.bind_address",
                          f"{web.bind_address} is not loopback: needs [[security.web_callers]]")


_MIN_TOKEN_CHARS = 16


def _web_caller(entry: Any, key: str, base: Path) -> WebCaller:
    if not isinstance(entry, Mapping):
        raise ConfigError(key, "must be a table with name and token_file or token_sha256")
    _known(entry, key + ".", {"name", "token_file", "token_sha256"})
    name = _str(entry.get("name"), key + ".name")
    if ("token_file" in entry) == ("token_sha256" in entry):
        raise ConfigError(key, "needs exactly one of token_file and token_sha256")
    if "token_file" in entry:
        path = _path(entry["token_file"], key + ".token_file", base)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(key + ".token_file", f"cannot read {path}: {exc}") from exc
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(key + ".token_file",
                              f"the token must have at least {_MIN_TOKEN_CHARS} characters")
        return WebCaller(name, hashlib.sha256(token.encode()).digest())
    text = _str(entry["token_sha256"], key + ".token_sha256")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ConfigError(key + ".token_sha256", "must be 64 hexadecimal digits (a SHA-256 digest)")
    return WebCaller(name, bytes.fromhex(text))


def _audit(t: Mapping[str, Any], base: Path) -> AuditConfig:
    _known(t, "audit.", {"enabled", "file", "collectors", "source_id", "enterprise_site",
                         "retry_max_seconds"})
    d = AuditConfig()
    collectors = []
    for i, entry in enumerate(_list(t.get("collectors", []), "audit.collectors")):
        key = f"audit.collectors[{i}]"
        c = _entry(entry, key, {"host", "port", "tls", "ca_certificates", "certificate", "private_key",
                                "server_name"})
        collectors.append(AuditCollector(host=_str(c.get("host"), key + ".host"),
                                         port=_port(c.get("port"), key + ".port"),
                                         tls=_client_tls(c, key, base)))
    keys = [c.key for c in collectors]
    if len(set(keys)) != len(keys):
        raise ConfigError("audit.collectors", "names a collector (host and port) twice")
    return AuditConfig(
        enabled=_bool(t.get("enabled", d.enabled), "audit.enabled"),
        file=_opt_path(t.get("file"), "audit.file", base),
        collectors=tuple(collectors),
        source_id=_str(t["source_id"], "audit.source_id") if "source_id" in t else None,
        enterprise_site=(_str(t["enterprise_site"], "audit.enterprise_site") if "enterprise_site" in t
                         else None),
        retry_max=_seconds(t.get("retry_max_seconds", d.retry_max.total_seconds()),
                           "audit.retry_max_seconds", 0.1, 3600),
    )


def _completion(t: Mapping[str, Any]) -> CompletionConfig:
    _known(t, "completion.", {"grace_seconds", "idle_timeout_seconds"})
    d = CompletionConfig()
    grace = _seconds(t.get("grace_seconds", d.grace.total_seconds()), "completion.grace_seconds", 0, 3600)
    idle = _seconds(t.get("idle_timeout_seconds", d.idle_timeout.total_seconds()),
                    "completion.idle_timeout_seconds", 1, 86400)
    if idle < grace:
        raise ConfigError("completion.idle_timeout_seconds", "must not be shorter than grace_seconds")
    return CompletionConfig(grace=grace, idle_timeout=idle)


def _sending(t: Mapping[str, Any]) -> SendingConfig:
    _known(t, "sending.", {"retry_initial_seconds", "retry_max_seconds", "max_attempts",
                           "association_timeout_seconds"})
    d = SendingConfig()
    initial = _seconds(t.get("retry_initial_seconds", d.retry_initial.total_seconds()),
                       "sending.retry_initial_seconds", 0.01, 86400)
    maximum = _seconds(t.get("retry_max_seconds", d.retry_max.total_seconds()),
                       "sending.retry_max_seconds", 0.01, 7 * 86400)
    if maximum < initial:
        raise ConfigError("sending.retry_max_seconds", "must not be shorter than retry_initial_seconds")
    return SendingConfig(
        retry_initial=initial,
        retry_max=maximum,
        max_attempts=_int(t.get("max_attempts", d.max_attempts), "sending.max_attempts", 1, 10000),
        association_timeout=_seconds(t.get("association_timeout_seconds",
                                           d.association_timeout.total_seconds()),
                                     "sending.association_timeout_seconds", 1, 3600),
    )


def _retention(t: Mapping[str, Any]) -> RetentionConfig:
    _known(t, "retention.", {"enabled", "instances_hours", "results_days", "history_days", "disk_margin_mb",
                             "sweep_minutes"})
    d = RetentionConfig()

    def age(key: str, default: timedelta | None, unit: timedelta) -> timedelta | None:
        """A number of ``unit`` (fractions allowed); 0 keeps for ever."""
        value = t.get(key, 0 if default is None else default / unit)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError("retention." + key, "must be a number (0 = keep for ever)")
        if not 0 <= value <= 100 * 365 * timedelta(days=1) / unit:
            raise ConfigError("retention." + key, f"must be between 0 and 100 years, got {value}")
        return None if value == 0 else unit * value

    margin = t.get("disk_margin_mb", d.disk_margin_bytes // 2**20)
    minutes = t.get("sweep_minutes", d.sweep_interval / timedelta(minutes=1))
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not 0.001 <= minutes <= 1440:
        raise ConfigError("retention.sweep_minutes", f"must be minutes from 0.001 to 1440, got {minutes}")
    return RetentionConfig(
        enabled=_bool(t.get("enabled", d.enabled), "retention.enabled"),
        instances=age("instances_hours", d.instances, timedelta(hours=1)),
        results=age("results_days", d.results, timedelta(days=1)),
        history=age("history_days", d.history, timedelta(days=1)),
        disk_margin_bytes=_int(margin, "retention.disk_margin_mb", 0, 2**30) * 2**20,
        sweep_interval=timedelta(minutes=minutes),
    )


def _inference(t: Mapping[str, Any]) -> InferenceConfig:
    _known(t, "inference.", {"providers", "fp16"})
    d = InferenceConfig()
    providers = tuple(_str(p, f"inference.providers[{i}]")
                      for i, p in enumerate(_list(t.get("providers", list(d.providers)),
                                                  "inference.providers")))
    if not providers:
        raise ConfigError("inference.providers", "must name at least one execution provider")
    fp16 = t.get("fp16", d.fp16)
    if not isinstance(fp16, bool):
        raise ConfigError("inference.fp16", "must be true or false")
    return InferenceConfig(providers=providers, fp16=fp16)


def _models(raw: Mapping[str, Any], base: Path) -> tuple[ModelRef, ...]:
    models = _table(raw, "models")
    refs = []
    for name, entry in models.items():
        key = f"models.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(key, "must be a table with a path")
        _known(entry, key + ".", {"path"})
        if "path" not in entry:
            raise ConfigError(key + ".path", "is required")
        refs.append(ModelRef(name=name, path=_model_path(entry["path"], key + ".path", base)))
    return tuple(refs)


def _model_path(value: Any, key: str, base: Path) -> Path:
    """``"bundled:NAME"``: the package shipped with this checkout; anything else a path (see _path)."""
    text = _str(value, key)
    if not text.startswith(BUNDLED_PREFIX):
        return _path(text, key, base)
    name = text.removeprefix(BUNDLED_PREFIX)
    if name in {"", ".", ".."} or "/" in name or "\\" in name:
        raise ConfigError(key, f"{BUNDLED_PREFIX!r} takes the name of a folder in {bundled_models_dir()}, "
                               f"got {name!r}")
    return bundled_models_dir() / name


def _routes(raw: Mapping[str, Any], models: Sequence[ModelRef]) -> tuple[Route, ...]:
    names = {m.name for m in models}
    routes = []
    for i, entry in enumerate(_list(raw["routes"], "routes")):
        key = f"routes[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(key, "must be a table")
        _known(entry, key + ".", {"name", "model", "modalities", "sop_classes", "body_parts",
                                  "series_description", "min_instances", "max_instances",
                                  "min_slice_thickness_mm", "max_slice_thickness_mm", "flag", "read",
                                  "prefer"})
        model = _str(entry.get("model"), key + ".model")
        if model not in names:
            raise ConfigError(key + ".model", f"no model named {model!r} in [models]")
        pattern = entry.get("series_description")
        compiled = None
        if pattern is not None:
            try:
                compiled = re.compile(_str(pattern, key + ".series_description"), re.IGNORECASE)
            except re.error as exc:
                raise ConfigError(key + ".series_description", f"not a valid regular expression: {exc}") \
                    from exc
        read = _str(entry.get("read", "study"), key + ".read")
        if read not in ("study", "series"):
            raise ConfigError(key + ".read", f'must be "study" or "series", got {read!r}')
        routes.append(Route(
            read="study" if read == "study" else "series",
            prefer=_preference(entry, key),
            name=_str(entry.get("name", f"route-{i}"), key + ".name"),
            model=model,
            modalities=_strs(entry.get("modalities", []), key + ".modalities", upper=True),
            sop_classes=_strs(entry.get("sop_classes", []), key + ".sop_classes"),
            body_parts=_strs(entry.get("body_parts", []), key + ".body_parts", upper=True),
            series_description=compiled,
            min_instances=_opt_int(entry.get("min_instances"), key + ".min_instances"),
            max_instances=_opt_int(entry.get("max_instances"), key + ".max_instances"),
            min_slice_thickness_mm=_opt_float(entry.get("min_slice_thickness_mm"),
                                              key + ".min_slice_thickness_mm"),
            max_slice_thickness_mm=_opt_float(entry.get("max_slice_thickness_mm"),
                                              key + ".max_slice_thickness_mm"),
            flag=parse_flag_rule(_table(entry, "flag"), key + ".flag") if "flag" in entry
            else FlagRule.any_finding(),
        ))
    return tuple(routes)


def _preference(entry: Mapping[str, Any], key: str) -> SeriesPreference:
    """``[routes.prefer]``: ``kernels``, regular expressions in order of preference."""
    prefer = _table(entry, "prefer")
    _known(prefer, key + ".prefer.", {"kernels"})
    patterns = _strs(prefer.get("kernels", list(DEFAULT_LUNG_KERNELS)), key + ".prefer.kernels")
    try:
        return SeriesPreference.of(patterns)
    except re.error as exc:
        raise ConfigError(key + ".prefer.kernels", f"not a valid regular expression: {exc}") from exc


def _worklist(raw: Mapping[str, Any], base: Path) -> WorklistConfig:
    d = WorklistConfig()
    hl7 = _table(raw, "hl7")
    _known(hl7, "hl7.", {"sending_application", "sending_facility", "endpoints"})
    priority = _table(raw, "priority")
    _known(priority, "priority.", {"stat_accession_prefixes"})
    return WorklistConfig(
        sending_application=_str(hl7.get("sending_application", d.sending_application),
                                 "hl7.sending_application"),
        sending_facility=_str(hl7.get("sending_facility", d.sending_facility), "hl7.sending_facility"),
        hl7=tuple(_hl7_target(e, f"hl7.endpoints[{i}]")
                  for i, e in enumerate(_list(hl7.get("endpoints", []), "hl7.endpoints"))),
        webhooks=tuple(_webhook_target(e, f"webhooks[{i}]", base)
                       for i, e in enumerate(_list(raw.get("webhooks", []), "webhooks"))),
        stat_accession_prefixes=_strs(priority.get("stat_accession_prefixes", []),
                                      "priority.stat_accession_prefixes"),
    )


def _sources(raw: Mapping[str, Any]) -> tuple[Source, ...]:
    """``[[sources]]``: name and either ae_title, host, port (DIMSE) or url (DICOMweb);
    hold_ttl_seconds, retrieve; names unique (case-insensitive)."""
    sources: list[Source] = []
    for i, value in enumerate(_list(raw.get("sources", []), "sources")):
        key = f"sources[{i}]"
        t = _entry(value, key, {"name", "ae_title", "host", "port", "url", "hold_ttl_seconds", "retrieve"})
        url = _str(t["url"], key + ".url") if "url" in t else ""
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(key + ".url", f"must be an http:// or https:// URL, got {url!r}")
        retrieve = _str(t.get("retrieve", "get" if url else "move"), key + ".retrieve")
        if retrieve not in ("move", "get") or (url and retrieve == "move"):
            raise ConfigError(key + ".retrieve",
                              f'must be "move" or "get" ("get" with a url), got {retrieve!r}')
        if url and any(k in t for k in ("ae_title", "host", "port")):
            raise ConfigError(key + ".url", "a source has either a url (DICOMweb) or ae_title, host, port")
        source = Source(
            name=_str(t.get("name"), key + ".name"),
            ae_title="" if url else _ae_title(t.get("ae_title"), key + ".ae_title"),
            host="" if url else _str(t.get("host"), key + ".host"),
            port=0 if url else _port(t.get("port"), key + ".port"),
            url=url,
            hold_ttl=_seconds(t.get("hold_ttl_seconds", Source.hold_ttl.total_seconds()),
                              key + ".hold_ttl_seconds", 60, 30 * 86400),
            retrieve="get" if retrieve == "get" else "move",
        )
        if any(s.name.casefold() == source.name.casefold() for s in sources):
            raise ConfigError(key + ".name", f"another source is named {source.name!r}")
        sources.append(source)
    return tuple(sources)


def _entry(value: Any, key: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a table")
    _known(value, key + ".", keys)
    return value


def _hl7_target(value: Any, key: str) -> Hl7Target:
    t = _entry(value, key, {"host", "port", "receiving_application", "receiving_facility",
                            "timeout_seconds", "transient_ack_codes", "send_negative"})
    timeout = _seconds(t.get("timeout_seconds", 30), key + ".timeout_seconds", 0.1, 600)
    mllp = MllpEndpoint(
        host=_str(t.get("host"), key + ".host"), port=_port(t.get("port"), key + ".port"),
        timeout_s=timeout.total_seconds(),
        transient_ack_codes=frozenset(_strs(t.get("transient_ack_codes", ["AR", "CE"]),
                                            key + ".transient_ack_codes", upper=True)),
    )
    return Hl7Target(
        mllp,
        receiving_application=_str(t.get("receiving_application", "RIS"), key + ".receiving_application"),
        receiving_facility=_str(t.get("receiving_facility", "RADIOLOGY"), key + ".receiving_facility"),
        send_negative=_bool(t.get("send_negative", True), key + ".send_negative"),
    )


def _webhook_target(value: Any, key: str, base: Path) -> WebhookTarget:
    t = _entry(value, key, {"url", "secret_env", "secret_file", "timeout_seconds", "send_negative"})
    timeout = _seconds(t.get("timeout_seconds", 30), key + ".timeout_seconds", 0.1, 600)
    try:
        hook = WebhookEndpoint(url=_str(t.get("url"), key + ".url"), secret=_secret(t, key, base),
                               timeout_s=timeout.total_seconds())
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from exc
    return WebhookTarget(hook, send_negative=_bool(t.get("send_negative", True), key + ".send_negative"))


def _secret(t: Mapping[str, Any], key: str, base: Path) -> bytes:
    """A webhook secret from an environment variable or a file, never from the config itself."""
    if ("secret_env" in t) == ("secret_file" in t):
        raise ConfigError(key + ".secret_env", "give exactly one of secret_env and secret_file")
    if "secret_env" in t:
        name = _str(t["secret_env"], key + ".secret_env")
        value = os.environ.get(name)
        if not value:
            raise ConfigError(key + ".secret_env", f"environment variable {name} is not set")
        return value.encode()
    path = _path(t["secret_file"], key + ".secret_file", base)
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key + ".secret_file", f"cannot read {path}: {exc.strerror}") from exc


def _destinations(values: list[Any], key: str, base: Path) -> tuple[AnyDestination, ...]:
    """Every destination, each once: two entries that a send ticket would name alike are refused."""
    parsed = tuple(_destination(d, f"{key}[{i}]", base) for i, d in enumerate(values))
    seen: dict[str, int] = {}
    for i, dest in enumerate(parsed):
        name = dest.key if isinstance(dest, StowDestination) else str(dest)
        if name in seen:
            raise ConfigError(f"{key}[{i}]", f"repeats {key}[{seen[name]}] ({name})")
        seen[name] = i
    return parsed


def _destination(value: Any, key: str, base: Path) -> AnyDestination:
    if isinstance(value, str):
        try:
            if "://" in value:
                return StowDestination(url=value)
            return Destination.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from exc
    if isinstance(value, Mapping) and "url" in value:
        return _stow_destination(value, key, base)
    if isinstance(value, Mapping):
        _known(value, key + ".", {"ae_title", "host", "port", "tls", "certificate", "private_key",
                                  "ca_certificates", "server_name"})
        return Destination(
            ae_title=_ae_title(value.get("ae_title"), key + ".ae_title"),
            host=_str(value.get("host"), key + ".host"),
            port=_port(value.get("port"), key + ".port"),
            tls=_client_tls(value, key, base),
        )
    raise ConfigError(key, "must be 'AE@HOST:PORT', a DICOMweb URL, or a table with ae_title, host, "
                           "port or with url")


_STOW_KEYS = {"url", "auth", "username", "password_env", "password_file", "token_env", "token_file",
              "ca_certificates", "timeout_seconds"}


def _stow_destination(t: Mapping[str, Any], key: str, base: Path) -> StowDestination:
    """A DICOMweb destination (``reader.dicomweb``); its credential is read once here, so a missing
    one fails at start, and again at every attempt."""
    _known(t, key + ".", _STOW_KEYS)
    auth_text = _str(t.get("auth", "none"), key + ".auth")
    try:
        auth = StowAuth(auth_text)
    except ValueError as exc:
        raise ConfigError(key + ".auth", f'must be "none", "basic" or "bearer", got {auth_text!r}') from exc
    kind = {StowAuth.BASIC: "password", StowAuth.BEARER: "token"}.get(auth)
    for other in ("password", "token"):
        if other != kind:
            given = sorted(k for k in (f"{other}_env", f"{other}_file") if k in t)
            if given:
                raise ConfigError(f"{key}.{given[0]}", f'is not used with auth = "{auth}"')
    if "username" in t and auth is not StowAuth.BASIC:
        raise ConfigError(key + ".username", 'is only used with auth = "basic"')
    secret = _credential(t, key, kind, base) if kind is not None else None
    timeout = _seconds(t.get("timeout_seconds", 60), key + ".timeout_seconds", 0.1, 3600)
    try:
        destination = StowDestination(
            url=_str(t.get("url"), key + ".url"), auth=auth,
            username=_str(t.get("username"), key + ".username") if auth is StowAuth.BASIC else "",
            secret=secret,
            ca_certificates=_opt_path(t.get("ca_certificates"), key + ".ca_certificates", base),
            timeout_s=timeout.total_seconds(),
        )
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from exc
    if destination.ca_certificates is not None and not destination.ca_certificates.is_file():
        raise ConfigError(key + ".ca_certificates", f"{destination.ca_certificates} is not a file")
    return destination


def _credential(t: Mapping[str, Any], key: str, kind: str, base: Path) -> Credential:
    """Where a DICOMweb password or token is read from: ``<kind>_env`` or ``<kind>_file``."""
    env_key, file_key = f"{kind}_env", f"{kind}_file"
    if (env_key in t) == (file_key in t):
        raise ConfigError(f"{key}.{env_key}", f"give exactly one of {env_key} and {file_key}")
    credential = (Credential(env=_str(t[env_key], f"{key}.{env_key}")) if env_key in t
                  else Credential(file=_path(t[file_key], f"{key}.{file_key}", base)))
    try:
        credential.read()
    except CredentialError as exc:
        raise ConfigError(f"{key}.{env_key if env_key in t else file_key}", str(exc)) from exc
    return credential


def _client_tls(t: Mapping[str, Any], key: str, base: Path) -> TlsClientConfig | None:
    """A destination's TLS settings; the files are loaded once here so a bad one fails at start."""
    enabled = _bool(t.get("tls", False), key + ".tls")
    extra = sorted(k for k in ("certificate", "private_key", "ca_certificates", "server_name") if k in t)
    if not enabled:
        if extra:
            raise ConfigError(f"{key}.{extra[0]}", "is only used with tls = true")
        return None
    tls = TlsClientConfig(
        ca_certificates=_opt_path(t.get("ca_certificates"), key + ".ca_certificates", base),
        certificate=_opt_path(t.get("certificate"), key + ".certificate", base),
        private_key=_opt_path(t.get("private_key"), key + ".private_key", base),
        server_name=_str(t["server_name"], key + ".server_name") if "server_name" in t else None,
    )
    client_context(tls, key=key)
    return tls


def _security(t: Mapping[str, Any], base: Path) -> SecurityConfig:
    _known(t, "security.", {"allowed_callers", "tls", "web_callers"})
    callers = []
    for i, entry in enumerate(_list(t.get("allowed_callers", []), "security.allowed_callers")):
        key = f"security.allowed_callers[{i}]"
        if isinstance(entry, str):
            entry = {"ae_title": entry}  # noqa: PLW2901 - a bare AE title is the short form of the table
        if not isinstance(entry, Mapping):
            raise ConfigError(key, "must be a table with ae_title and optional addresses, or an AE title")
        _known(entry, key + ".", {"ae_title", "addresses"})
        networks = []
        for j, text in enumerate(_strs(entry.get("addresses", []), key + ".addresses")):
            try:
                networks.append(parse_network(text))
            except ValueError as exc:
                raise ConfigError(f"{key}.addresses[{j}]",
                                  f"{text!r} is not an IP address or network (CIDR): {exc}") from exc
        callers.append(AllowedCaller(_ae_title(entry.get("ae_title"), key + ".ae_title"), tuple(networks)))
    tls_table = _table(t, "tls")
    _known(tls_table, "security.tls.", {"enabled", "certificate", "private_key", "ca_certificates",
                                        "require_client_certificate"})
    tls = None
    if _bool(tls_table.get("enabled", False), "security.tls.enabled"):
        for required in ("certificate", "private_key"):
            if required not in tls_table:
                raise ConfigError(f"security.tls.{required}", "is required when enabled = true")
        tls = TlsServerConfig(
            certificate=_path(tls_table["certificate"], "security.tls.certificate", base),
            private_key=_path(tls_table["private_key"], "security.tls.private_key", base),
            ca_certificates=_opt_path(tls_table.get("ca_certificates"), "security.tls.ca_certificates", base),
            require_client_certificate=_bool(tls_table.get("require_client_certificate", False),
                                             "security.tls.require_client_certificate"),
        )
        server_context(tls)
    web_callers = tuple(_web_caller(e, f"security.web_callers[{i}]", base)
                        for i, e in enumerate(_list(t.get("web_callers", []), "security.web_callers")))
    names = [c.name for c in web_callers]
    if len(set(names)) != len(names):
        raise ConfigError("security.web_callers", "names must be unique")
    return SecurityConfig(access=AccessPolicy(tuple(callers)), tls=tls, web_callers=web_callers)


def _known(table: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
    for k in table:
        if k not in keys:
            raise ConfigError(prefix + k, f"unknown key (known: {', '.join(sorted(keys))})")


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a table")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, "must be a list")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a non-empty string")
    return value


def _strs(value: Any, key: str, *, upper: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else _list(value, key)
    return tuple(_str(v, key).upper() if upper else _str(v, key) for v in items)


def _ae_title(value: Any, key: str) -> str:
    try:
        return validate_ae_title(_str(value, key))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from exc


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, "must be an integer")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def _max_pdu(value: Any, key: str) -> int:
    size = _int(value, key, 0, 2**32 - 1)
    if 0 < size < 4096:
        raise ConfigError(key, f"must be 0 (no limit) or at least 4096 bytes, got {size}")
    return size


def _opt_int(value: Any, key: str) -> int | None:
    return None if value is None else _int(value, key, 0, 1_000_000)


def _opt_float(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a number")
    return float(value)


def _port(value: Any, key: str) -> int:
    return _int(value, key, 1, 65535)


def _flag_int(value: Any) -> Any:
    """A command-line flag's digits as an int (argparse gives text); anything else as it is, for
    the checks to refuse. Files are typed: a port in TOML is a number, never a string."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _seconds(value: Any, key: str, low: float, high: float) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a number of seconds")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high} seconds, got {value}")
    return timedelta(seconds=value)


def _path(value: Any, key: str, base: Path) -> Path:
    p = Path(_str(value, key)).expanduser()
    return p if p.is_absolute() else base / p


def _opt_path(value: Any, key: str, base: Path) -> Path | None:
    return None if value is None else _path(value, key, base)
