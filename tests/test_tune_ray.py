"""`chatvec tune --workers 1`: trials on a long-lived Ray eval actor; an actor killed in the middle
of a trial is replaced and the trial runs again, so every trial of the budget finishes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from chatvec.core.config import ChatvecConfig, EvalSettings
from chatvec.runs.tune_config import load_tune
from chatvec.runs.tune_run import run_tune

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
TUNE = """\
vectors:
  toy: {{base: {world}/base, chat: {world}/chat}}
targets:
  - {{language: toy-l2, cp: {world}/cp, benchmarks: [{world}/benchmarks.yaml]}}
embeddings: [skip]
baselines: {{cp: false, chat: false}}
engine: hf
device: cpu
root: {root}
eval: {{limit: 16, max_new_tokens: 16}}
search:
  space: {{ratios: {{toy: [0.5, 2.0]}}}}
  objective: {{metric: exact_match}}
  trials: 3
  parallel: 2
  top_k: 1
"""


@pytest.mark.slow
def test_a_killed_actor_s_trial_runs_again_on_a_fresh_actor(ray_cluster, tmp_path):
    import ray

    from chatvec.cluster.eval_driver import actor_name

    killed = threading.Event()

    def kill_first_actor():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                actor = ray.get_actor(actor_name("tune", "ray", 1))
            except ValueError:
                time.sleep(0.05)
                continue
            ray.kill(actor, no_restart=True)
            killed.set()
            return

    path = tmp_path / "t.yaml"
    path.write_text(TUNE.format(world=TOY.as_posix(), root=(tmp_path / "store").as_posix()))
    killer = threading.Thread(target=kill_first_actor, daemon=True)
    killer.start()
    lines: list[str] = []
    config = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0))
    outcome = run_tune(
        load_tune(str(path)), source=str(path), run_id="ray", config=config, workers=1, echo=lines.append
    )
    killer.join()
    assert killed.is_set()
    assert any("running" in line and "again" in line for line in lines), lines
    assert [r.state for r in outcome.trials] == ["complete"] * 3, [
        (r.state, getattr(r, "error", None)) for r in outcome.trials
    ]
    assert outcome.finalists[0].test  # the winner ran on test, on the actors too
    assert not (tmp_path / "store" / "models").exists()


@pytest.mark.slow
def test_judge_actors_stay_loaded_between_trials(ray_cluster, tmp_path):
    from test_tune import judged_tune

    outcome, judged = judged_tune(tmp_path, workers=1)
    assert [r.state for r in outcome.trials] == ["complete"] * 3
    assert outcome.timings["judge_s"] > 0 and outcome.timings["judge_loads"] == 0  # the grid's judge, kept
    assert len(judged) >= 4 * 4 and set(judged) == {(TOY / "chat").as_posix()}
