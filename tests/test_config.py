"""ray_config.yaml: defaults, validation errors that name the key and line, and CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from chatvec.core.config import ChatvecConfig, load_config
from chatvec.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_matches_defaults():
    shipped = load_config(str(ROOT / "ray_config.yaml"))
    assert shipped == ChatvecConfig()
    assert shipped.merge.workers == 2 and shipped.ray.address == "local"


def test_missing_file_uses_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHATVEC_CONFIG", raising=False)
    assert load_config(None) == ChatvecConfig()


def test_named_file_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "text, key, line, words",
    [
        ("merge:\n  workers: two\n", "merge.workers", 2, "integer"),
        ("merge:\n  workers: -1\n", "merge.workers", 2, "greater than or equal"),
        ("ray:\n  adress: auto\n", "ray.adress", 2, "unknown key"),
        ("storage:\n  root: x\nmerge:\n  shard_size: lots\n", "merge.shard_size", 4, "not a size"),
        ("merge:\n  device: tpu\n", "merge.device", 2, "'auto', 'cpu' or 'cuda'"),
        ("eval:\n  gpus_per_engine: some\n", "eval.gpus_per_engine", 2, ""),
        ("merge:\n  gpus_per_worker: -2\n", "merge.gpus_per_worker", 2, ">= 0"),
        ("mergee: {}\n", "mergee", 1, "unknown key"),
    ],
)
def test_bad_values_name_key_and_line(tmp_path, text, key, line, words):
    path = tmp_path / "ray_config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert f"line {line}: {key}:" in msg
    assert words in msg


def test_every_problem_listed_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("merge:\n  workers: x\n  lock_ttl_s: 0\nbogus: 1\n")
    msg = str(pytest.raises(ConfigError, load_config, str(path)).value)
    assert "merge.workers" in msg and "merge.lock_ttl_s" in msg and "bogus" in msg


def test_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("merge: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_cli_reports_bad_config_without_traceback(tmp_path):
    from chatvec.cli.main import cli

    bad = tmp_path / "c.yaml"
    bad.write_text("merge:\n  workers: many\n")
    result = CliRunner().invoke(
        cli,
        ["merge", "--config", str(bad), "--cp", str(tmp_path), "--vector", str(tmp_path), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, (ConfigError, SystemExit))
    assert not (tmp_path / "o" / "chatvec_manifest.json").exists()
