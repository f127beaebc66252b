"""The judge's generation budget: large enough for a judge that reasons first, set in one place
per layer (ray_config.yaml, the sweep file, the CLI: tests/test_judge_run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chatvec.core.config import load_config
from chatvec.eval.contracts import RunSettings
from chatvec.runs.sweep import Sweep

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_leaves_room_for_reasoning():
    assert RunSettings().judge_max_new_tokens == 2048
    assert load_config(str(ROOT / "ray_config.yaml")).eval.judge_max_new_tokens == 2048


def test_ray_config_sets_it(tmp_path):
    raw = yaml.safe_load((ROOT / "ray_config.yaml").read_text(encoding="utf-8"))
    raw["eval"]["judge_max_new_tokens"] = 4096
    path = tmp_path / "ray_config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_config(str(path)).eval.judge_max_new_tokens == 4096
    raw["eval"]["judge_max_new_tokens"] = 0
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(Exception, match="judge_max_new_tokens"):
        load_config(str(path))


def test_a_sweep_sets_it():
    text = (ROOT / "examples" / "paper.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert Sweep.model_validate(raw).judge_max_tokens is None  # the config's default applies
    raw["judge_max_tokens"] = 3000
    assert Sweep.model_validate(raw).judge_max_tokens == 3000
