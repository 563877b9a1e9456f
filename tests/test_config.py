"""Configuration: defaults, file + flag overrides, one clear error per invalid key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from reader.config import bundled_models_dir, default_config, load_config
from reader.errors import ConfigError

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
