"""Configuration: defaults, file + flag overrides, one clear error per invalid key."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from reader.config import (
    DATABASE_URL_ENV,
    ClusterConfig,
    Device,
    Role,
    bundled_models_dir,
    default_config,
    load_config,
    redact_url,
)
from reader.errors import ConfigError
from reader.web.pages import _settings

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "reader.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reader.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_operator_interface() -> None:
    """Without a file the node is SECONDREADER on 11112 with ./reader-data and a CT route."""
    cfg = load_config(None)
    assert (cfg.ae_title, cfg.port, cfg.data_dir) == ("SECONDREADER", 11112, Path.cwd() / "reader-data")
    assert cfg.routes[0].modalities == ("CT",)
    assert cfg.model(cfg.routes[0].model).path.name == "lung-lesion-unet"
    assert cfg.completion.grace < timedelta(seconds=60)


def test_example_config_in_deploy_is_valid() -> None:
    """The documented example configuration loads without error; it names no live destination."""
    cfg = load_config(EXAMPLE)
    assert cfg.destinations == ()


def test_flags_override_the_file(tmp_path: Path) -> None:
    """Command-line flags win over the file's values."""
    path = _write(tmp_path, '[node]\nae_title = "FILEAE"\nport = 104\n')
    cfg = load_config(path, {"ae_title": "FLAGAE", "port": "4242", "destinations": ["PACS@127.0.0.1:4243"]})
    assert (cfg.ae_title, cfg.port) == ("FLAGAE", 4242)
    assert cfg.destinations[0].ae_title == "PACS"
    assert cfg.destinations[0].port == 4243


def test_durations_are_timedeltas(tmp_path: Path) -> None:
    """Seconds in the file become timedelta in the config object."""
    path = _write(tmp_path, "[completion]\ngrace_seconds = 1.5\nidle_timeout_seconds = 20\n")
    cfg = load_config(path)
    assert cfg.completion.grace == timedelta(seconds=1.5)
    assert cfg.completion.idle_timeout == timedelta(seconds=20)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nprt = 1\n", "node.prt"),
        ('[node]\nae_title = "THIS_TITLE_IS_FAR_TOO_LONG"\n', "node.ae_title"),
        ("[completion]\ngrace_seconds = -1\n", "completion.grace_seconds"),
        ("[completion]\ngrace_seconds = 10\nidle_timeout_seconds = 5\n", "completion.idle_timeout_seconds"),
        ('destinations = ["nonsense"]\n', "destinations[0]"),
        ('[models.m]\npath = "x"\n[[routes]]\nmodel = "other"\n', "routes[0].model"),
        ('[models.m]\npath = "x"\n[[routes]]\nmodel = "m"\nseries_description = "("\n',
         "routes[0].series_description"),
        ("[inference]\nproviders = []\n", "inference.providers"),
        ('[models.m]\npath = "bundled:"\n', "models.m.path"),
        ('[models.m]\npath = "bundled:../m"\n', "models.m.path"),
        ("not toml at all [", "--config"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """Every invalid entry raises ConfigError naming exactly the offending key."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert info.value.key == key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[node]\nport = "104"\n', "node.port"),
        ('[node]\nmax_associations = "4"\n', "node.max_associations"),
        ('[web]\nport = "8080"\n', "web.port"),
        ('[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = "104"\n', "destinations[0].port"),
    ],
)
def test_numbers_in_the_file_refuse_strings(tmp_path: Path, text: str, key: str) -> None:
    """A number written as a string in the file (``port = "104"``) is refused like any other
    mistyped number, naming the key: only command-line flags arrive as text."""
    with pytest.raises(ConfigError, match="must be an integer") as info:
        load_config(_write(tmp_path, text))
    assert info.value.key == key


def test_invalid_flag_names_the_flag() -> None:
    """An invalid port flag is reported as --port."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"port": "eleven"})
    assert info.value.key == "--port"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """A model path in the file is relative to the file, not to the working directory."""
    path = _write(tmp_path, '[models.m]\npath = "pkg"\n[[routes]]\nmodel = "m"\n')
    assert load_config(path).model("m").path == tmp_path / "pkg"


def test_bundled_model_path_does_not_depend_on_the_config_folder(tmp_path: Path) -> None:
    """A model path "bundled:NAME" is models/NAME of this checkout, wherever the file sits."""
    path = _write(tmp_path, '[models.m]\npath = "bundled:lung-lesion-unet"\n[[routes]]\nmodel = "m"\n')
    assert load_config(path).model("m").path == bundled_models_dir() / "lung-lesion-unet"


def test_default_config_is_frozen() -> None:
    """Config objects cannot be changed after start-up."""
    cfg = default_config()
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_readme_configuration_table_is_one_table() -> None:
    """The README's configuration reference is one unbroken Markdown table (a blank line inside it,
    as once before the ``[routes.flag]`` row, splits it and the rest renders as text), and it names
    ``[routes.flag]``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n### Configuration reference\n", 1)[1].split("\n### ", 1)[0]
    lines = section.splitlines()
    first = lines.index("| key | default | meaning |")
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    table, rest = lines[first:end], lines[end:]
    assert not any(line.startswith("|") for line in rest), "the configuration table is split"
    assert any(line.startswith("| `[routes.flag]`") for line in table)


def test_cluster_defaults_to_the_single_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``[cluster]`` the node keeps its own SQLite state in the data dir: no database URL, no
    shared storage, a 60 s lease, a 0.05 s poll and a port of its own."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    cluster = load_config(None).cluster
    assert cluster == ClusterConfig()
    assert (cluster.database, cluster.storage, cluster.reuse_port) == (None, None, False)
    assert (cluster.lease, cluster.poll_interval) == (timedelta(seconds=60), timedelta(seconds=0.05))


def test_cluster_table_is_typed_and_storage_becomes_the_data_dir(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``[cluster]`` gives the database URL, durations as timedelta, reuse_port, and a storage folder
    (relative to the file like every path) that becomes the data dir; ``--data-dir`` moves both."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    path = _write(tmp_path, '[cluster]\ndatabase = "postgresql://reader:s3cret@db.example:5432/reader"\n'
                            'storage = "shared"\nlease_seconds = 30\npoll_interval_seconds = 0.2\n'
                            "reuse_port = true\n")
    cfg = load_config(path)
    assert cfg.cluster.database == "postgresql://reader:s3cret@db.example:5432/reader"
    assert cfg.cluster.storage == tmp_path / "shared" and cfg.data_dir == tmp_path / "shared"
    assert (cfg.cluster.lease, cfg.cluster.poll_interval) == (timedelta(seconds=30), timedelta(seconds=0.2))
    assert cfg.cluster.reuse_port is True
    moved = load_config(path, {"data_dir": str(tmp_path / "elsewhere")})
    assert moved.data_dir == moved.cluster.storage == tmp_path / "elsewhere"
    sqlite = load_config(_write(tmp_path, f'[cluster]\ndatabase = "sqlite:///{tmp_path}/state.db"\n'))
    assert sqlite.cluster.database == f"sqlite:///{tmp_path}/state.db"


def test_database_url_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``READER_DATABASE_URL`` overrides ``[cluster] database`` (the Kubernetes overlay sets it from a
    secret), with or without a file, and is checked like the key."""
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://reader:pw@postgres:5432/reader")
    path = _write(tmp_path, '[cluster]\ndatabase = "sqlite:////var/lib/reader/state.db"\n')
    assert load_config(path).cluster.database == "postgresql://reader:pw@postgres:5432/reader"
    assert load_config(None).cluster.database == "postgresql://reader:pw@postgres:5432/reader"
    monkeypatch.setenv(DATABASE_URL_ENV, "mysql://reader:pw@db/reader")
    with pytest.raises(ConfigError) as bad:
        load_config(None)
    assert bad.value.key == DATABASE_URL_ENV and "pw" not in bad.value.problem


@pytest.mark.parametrize(("text", "key"), [
    ('database = "mysql://u:topsecret@db/reader"', "cluster.database"),
    ('database = "sqlite://state.db"', "cluster.database"),
    ('database = "postgresql:///reader"', "cluster.database"),
    ('database = ""', "cluster.database"),
    ("lease_seconds = 0", "cluster.lease_seconds"),
    ("poll_interval_seconds = -1", "cluster.poll_interval_seconds"),
    ('reuse_port = "yes"', "cluster.reuse_port"),
    ("storage = 3", "cluster.storage"),
    ("workers = 2", "cluster.workers"),
])
def test_invalid_cluster_keys_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           text: str, key: str) -> None:
    """Each invalid ``[cluster]`` value is one ConfigError naming its key; a refused URL's password is
    not repeated in the message."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    with pytest.raises(ConfigError) as bad:
        load_config(_write(tmp_path, f"[cluster]\n{text}\n"))
    assert bad.value.key == key
    assert "topsecret" not in str(bad.value)


def test_storage_and_a_different_data_dir_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[cluster] storage`` is the data dir: a file that also names another ``node.data_dir`` is refused;
    the same folder twice is accepted."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    with pytest.raises(ConfigError) as bad:
        load_config(_write(tmp_path, '[node]\ndata_dir = "a"\n[cluster]\nstorage = "b"\n'))
    assert bad.value.key == "cluster.storage"
    same = load_config(_write(tmp_path, f'[node]\ndata_dir = "{tmp_path}/b"\n[cluster]\nstorage = "b"\n'))
    assert same.data_dir == tmp_path / "b"


def test_cluster_config_checks_itself() -> None:
    """A ClusterConfig built in code is validated too: an unknown scheme, a non-positive lease or a
    relative storage path raise ConfigError."""
    with pytest.raises(ConfigError):
        ClusterConfig(database="redis://cache/0")
    with pytest.raises(ConfigError):
        ClusterConfig(lease=timedelta(0))
    with pytest.raises(ConfigError):
        ClusterConfig(storage=Path("relative"))


def test_database_password_is_redacted_wherever_the_config_is_shown() -> None:
    """The database password appears neither in the ClusterConfig's repr (logs), nor in the
    configuration page's rows, nor in :func:`redact_url`'s output; the user and host stay visible."""
    url = "postgresql://reader:p%40ss/w0rd@db.example:5432/reader"
    config = replace(default_config(), cluster=ClusterConfig(database=url))
    rows = dict(_settings(config))
    assert rows["cluster.database"] == "postgresql://reader:***@db.example:5432/reader"
    assert "w0rd" not in repr(config) and "w0rd" not in repr(rows)
    assert config.cluster.database_redacted == rows["cluster.database"]
    assert redact_url("postgresql://reader@db/reader") == "postgresql://reader@db/reader"
    assert redact_url("sqlite:////srv/state.db") == "sqlite:////srv/state.db"


@pytest.mark.parametrize(("text", "device"), [
    ("cpu", Device("cpu")), ("cuda:0", Device("cuda", 0)), ("CUDA:3", Device("cuda", 3)),
])
def test_device_parses_cpu_and_cuda_n(text: str, device: Device) -> None:
    """``--device`` reads ``cpu`` and ``cuda:N``; CUDA gets its GPU index as provider option, then CPU."""
    assert Device.parse(text) == device
    assert str(device) == text.lower()
    if device.kind == "cuda":
        assert device.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
        assert device.provider_options == {"CUDAExecutionProvider": {"device_id": str(device.index)}}
    else:
        assert (device.providers, device.provider_options) == (("CPUExecutionProvider",), {})


@pytest.mark.parametrize("text", ["gpu", "cuda", "cuda:", "cuda:-1", "cuda:01", "cuda:1x", "cpu:0", ""])
def test_device_refuses_anything_else(text: str) -> None:
    """Anything but ``cpu`` or ``cuda:N`` (N ≥ 0) is a ConfigError naming ``--device``."""
    with pytest.raises(ConfigError) as bad:
        Device.parse(text)
    assert bad.value.key == "--device" and "cuda:N" in bad.value.problem


def test_roles_are_all_receiver_worker() -> None:
    """The three roles of ``reader serve --role``, as their command-line spelling."""
    assert [str(r) for r in Role] == ["all", "receiver", "worker"]
    assert Role("receiver") is Role.RECEIVER
