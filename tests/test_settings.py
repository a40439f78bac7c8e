"""Configuration: file, environment, flags; one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
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
