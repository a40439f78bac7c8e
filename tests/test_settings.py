"""Configuration: file, environment, flags; one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.foundation.errors import ConfigError
from dicom_node.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_file_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'ae_title = "FROM_FILE"\nport = 1104\ndata_dir = "/srv/a"\n'
                          'allowed_calling_aes = ["PACS"]\n')
    s = load_settings(cfg, env={})
    assert (s.ae_title, s.port, str(s.data_dir), s.allowed_calling_aes) == ("FROM_FILE", 1104, "/srv/a", ("PACS",))
    s = load_settings(cfg, env={"DICOM_NODE_DATA_DIR": "/srv/b", "DICOM_NODE_PORT": "2104"})
    assert (str(s.data_dir), s.port) == ("/srv/b", 2104)
    s = load_settings(None, env={"DICOM_NODE_CONFIG": str(cfg)},
                      overrides={"port": 3104, "ae_title": "FLAG", "data_dir": "/srv/c"})
    assert (s.port, s.ae_title, str(s.data_dir)) == (3104, "FLAG", "/srv/c")


@pytest.mark.parametrize("text, message", [
    ("port = \"eleven\"\n", "port: expected an integer, got 'eleven'"),
    ("port = 70000\n", "port: expected an integer from 0 to 65535, got 70000"),
    ("ae_title = \"THIS_TITLE_IS_FAR_TOO_LONG\"\n", "ae_title: expected an AE title"),
    ("allowed_calling_aes = \"PACS\\\\X\"\n", "allowed_calling_aes[0]: expected an AE title"),
    ("colour = \"blue\"\n", "colour: expected no such key (known keys:"),
    ("log_level = \"LOUD\"\n", "log_level: expected one of DEBUG, INFO, WARNING, ERROR"),
    ("min_free_mb = -1\n", "min_free_mb: expected an integer number of MiB >= 0"),
    ("port = [\n", "(syntax): expected valid TOML"),
])
def test_each_mistake_is_one_line_naming_key_and_expectation(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert message in str(info.value)
    assert str(cfg) in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reports_bad_configuration_in_one_line_and_exits_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, "max_associations = 0\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(cfg), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dicom-node: configuration in {cfg}: max_associations: expected an integer from 1 to 1000, got 0"]


def test_unusable_data_directory_is_reported_with_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(blocker / "x"),
                             "twin", "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot use data directory" in result.stderr and "--data-dir" in result.stderr


# ---------------------------------------------------------------- each key declared once
@pytest.mark.parametrize("text, message", [
    ("network_timeout_s = 0\n", "network_timeout_s: expected a number of seconds > 0, got 0"),
    ("stable_after = 90000\n", "stable_after: expected a number of seconds > 0 (at most 86400)"),
    ("bind_address = \"here\"\n", "bind_address: expected an IP address such as 0.0.0.0"),
    ("workers = 33\n", "workers: expected an integer from 0 to 32, got 33"),
    ("fast_receive = \"maybe\"\n", "fast_receive: expected true or false, got 'maybe'"),
    ("backend = \"cloud\"\n", "backend: expected \"local\" or \"triton\", got 'cloud'"),
    ("backend = \"triton\"\n", "triton_url: expected HOST:PORT (backend = \"triton\" needs it)"),
    ("triton_url = \"no port\"\n", "triton_url: expected HOST:PORT of Triton's gRPC endpoint"),
    ("train_device = \"tpu\"\n", "train_device: expected auto, cpu or cuda[:N], got 'tpu'"),
    ("train_at = \"25:00\"\n", "train_at: expected a local time HH:MM or HH:MM:SS (24 h)"),
    ("train_nice = 20\n", "train_nice: expected an integer from 0 to 19, got 20"),
    ("train_patch_size = 8.5\n", "train_patch_size: expected an integer, got 8.5"),
    ("send_backoff_initial_s = 10\nsend_backoff_max_s = 5\n",
     "send_backoff_initial_s: expected at most send_backoff_max_s, got 10.0"),
    ("tls_cert = \"/c.pem\"\n", "tls_key: expected a PEM file path (tls_cert, tls_key and tls_ca"),
    ("max_memory_gb = -1\n", "max_memory_gb: expected a number of GB >= 0 (0 = derived"),
    ("allowed_calling_aes = [\"OK\", \"\"]\n", "allowed_calling_aes[1]: expected an AE title"),
    ("destinations = 3\n", "destinations: expected an array of tables ([[destinations]]), got 3"),
    ("[[destinations]]\nae_title = \"P\"\nhost = \"h\"\nport = 0\n",
     "destinations[0].port: expected an integer from 1 to 65535, got 0"),
])
def test_messages_come_from_each_keys_one_declaration(tmp_path: Path, text: str,
                                                      message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def test_settings_made_in_code_are_checked_like_the_file() -> None:
    from dicom_node.settings import Settings

    with pytest.raises(ConfigError, match="max_associations: expected an integer from 1 to 1000"):
        Settings(max_associations=0)
    with pytest.raises(ConfigError, match="require_called_ae: expected true or false"):
        Settings(require_called_ae="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="port: expected an integer from 0 to 65535"):
        Settings().replace(port=True)


def test_every_key_is_declared_once_and_reads_back_its_default(tmp_path: Path) -> None:
    """Each field but ``config_path`` carries its Key; writing every default to a file
    gives the defaults back (parsing and validation agree with the declaration)."""
    import dataclasses

    from dicom_node.settings import ENV_KEYS, KEYS, Settings

    names = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(KEYS) == sorted(n for n in names if n != "config_path")
    assert ENV_KEYS == ("ae_title", "port", "data_dir", "log_level", "stable_after", "metrics_port")
    defaults = Settings()
    lines = []
    for name in KEYS:
        value = getattr(defaults, name)
        if name in ("destinations", "tasks") or value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{name} = {str(value).lower()}")
        elif isinstance(value, str | Path):
            lines.append(f'{name} = "{value}"')
        elif isinstance(value, tuple):
            lines.append(f"{name} = {list(value)!r}")
        else:
            lines.append(f"{name} = {value!r}")
    loaded = load_settings(write(tmp_path, "\n".join(lines) + "\n"), env={})
    assert loaded.replace(config_path=None) == defaults
    for name in KEYS:
        assert f"{name} : " in (Settings.__doc__ or "")  # the docstring is derived too


def test_readme_table_is_the_one_derived_from_the_declarations() -> None:
    from dicom_node.settings import settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, (
        "README's configuration table is stale: paste the output of python -c "
        "'from dicom_node.settings import settings_table; print(settings_table())'")
