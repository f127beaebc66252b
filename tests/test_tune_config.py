"""The tune file, the split and the space: bad input stops before any model loads, the split is
seeded, stratified and disjoint, and the space maps optuna parameters to recipe values."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chatvec.core.config import ChatvecConfig
from chatvec.core.errors import ChatvecError
from chatvec.runs.tune_config import LayerSpace, MethodSpace, load_tune
from chatvec.runs.tune_run import run_tune
from chatvec.runs.tune_space import Space, params_of, ratio_value, recipe_of
from chatvec.runs.tune_split import split_items

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
BASE = """\
vectors:
  toy: {{base: {world}/base, chat: {world}/chat}}
targets:
  - {{language: toy-l2, cp: {world}/cp, benchmarks: [{world}/benchmarks.yaml]}}
engine: hf
device: cpu
root: {root}
eval: {{limit: {limit}}}
search:
  space: {space}
  objective: {{metric: {metric}}}
  trials: {trials}
"""


def write(tmp: Path, *, space="{ratios: {toy: [0.5, 2.0]}}", metric="exact_match", trials=2, limit=8) -> Path:
    path = tmp / "t.yaml"
    text = BASE.format(
        world=TOY.as_posix(), root=(tmp / "store").as_posix(), space=space, metric=metric, trials=trials, limit=limit
    )
    path.write_text(text)
    return path


def fails_before_loading(tmp: Path, path: Path, match: str) -> None:
    import chatvec.eval.engines as engines

    loaded = []
    real = engines.load_engine
    engines.load_engine = lambda *a, **kw: loaded.append(a) or real(*a, **kw)
    try:
        with pytest.raises(ChatvecError, match=match):
            run_tune(load_tune(str(path)), source=str(path), run_id="bad", config=ChatvecConfig(), workers=0)
    finally:
        engines.load_engine = real
    assert loaded == []
    assert not (tmp / "store" / "results" / "run=bad" / "samples").exists()


def test_an_objective_no_benchmark_produces(tmp_path):
    path = write(tmp_path, metric="bleu")
    fails_before_loading(tmp_path, path, r"metric 'bleu'.*exact_match, either_script, closed, in_language")


def test_an_empty_space(tmp_path):
    fails_before_loading(tmp_path, write(tmp_path, space="{}"), "search space is empty")
    fails_before_loading(tmp_path, write(tmp_path, space="{ratios: {toy: 1.0}}"), "search space is empty")


def test_a_budget_below_one(tmp_path):
    with pytest.raises(ChatvecError, match="trial budget is 0; give at least 1 trial"):
        load_tune(str(write(tmp_path, trials=0)))


def test_a_split_that_leaves_test_empty(tmp_path):
    fails_before_loading(tmp_path, write(tmp_path, limit=1), "leaves the test items of toy-task in toy-l2 empty")


def test_the_command_prints_the_error_without_a_traceback(tmp_path):
    path = write(tmp_path, metric="bleu")
    proc = subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "tune", str(path), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "bleu" in proc.stderr and "Traceback" not in proc.stderr


def toy_items() -> list[dict]:
    lines = (TOY / "benchmarks" / "toy-task" / "toy-l2.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_split_is_seeded_stratified_and_disjoint():
    items = toy_items()
    args = dict(benchmark="toy-task", language="toy-l2", test=0.25, stratify="auto")
    a, b, c = (split_items(items, seed=s, **args) for s in (0, 0, 1))
    assert (a.dev, a.test) == (b.dev, b.test) and a.test != c.test
    assert a.field == "task"
    assert set(a.dev).isdisjoint(a.test) and set(a.dev) | set(a.test) == {it["id"] for it in items}
    by_task = {it["id"]: it["task"] for it in items}
    per_task = Counter(by_task[i] for i in a.test)
    assert per_task == {t: round(n * 0.25) for t, n in Counter(by_task.values()).items()}
    plain = split_items(items, seed=0, benchmark="toy-task", language="toy-l2", test=0.25, stratify=None)
    assert plain.field is None and len(plain.test) == round(len(items) * 0.25)


def test_the_space_maps_parameters_to_recipe_values(tmp_path):
    tune = load_tune(str(write(tmp_path)))
    vec = tune.vectors["toy"]
    scalar = Space({"toy": vec}, {"toy": (0.5, 2.0)}, None, [], [MethodSpace()], ["all", "skip"])
    assert set(scalar.distributions()) == {"ratio.toy", "embeddings"}
    recipe = recipe_of({"ratio.toy": 1.5, "embeddings": "skip"}, scalar, cp="cp", tune=tune)
    assert recipe.vectors[0].ratio == 1.5 and recipe.embeddings == "skip"
    assert params_of(recipe, scalar) == {"ratio.toy": 1.5, "embeddings": "skip"}
    layered = Space({"toy": vec}, {"toy": (0.5, 2.0)}, LayerSpace(points=3), ["self_attn"], [MethodSpace()], ["skip"])
    params = {f"ratio.toy.p{i}": 0.1 * (i + 1) for i in range(3)} | {"ratio.toy.self_attn.p1": 0.9}
    assert ratio_value(params, "toy", layered) == {
        "default": [0.1, 0.2, pytest.approx(0.3)],
        "self_attn": [0.5, 0.9, 0.5],  # the parameters the trial did not set are the range's low end
    }
    assert len(layered.distributions()) == 6
    # a grid point (one ratio) in a per-layer space: the flat curve
    flat = params_of(recipe_of({"ratio.toy": 1.25, "embeddings": "skip"}, scalar, cp="cp", tune=tune), layered)
    assert flat == {f"ratio.toy{g}.p{i}": 1.25 for g in ("", ".self_attn") for i in range(3)}
