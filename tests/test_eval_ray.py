"""The Ray fan-out: eval actors over models, judge actors, failed cells and a dead actor."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.cluster.eval_driver import actor_name, run_eval  # noqa: E402
from chatvec.core.config import ChatvecConfig, EvalSettings  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.contracts import DONE, FAILED  # noqa: E402
from chatvec.eval.results import read_table  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0, judge_workers=1))
COMMON = dict(device="cpu", max_new_tokens=5, config=CONFIG, show_progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("raymodels")
    return {
        name: str(build_model_dir(root / name, seed=seed, shard_size="50KB"))
        for name, seed in (("a", 11), ("b", 12), ("c", 13), ("judge", 14))
    }


def rows_by_cell(out: str) -> dict[str, list[tuple]]:
    store = Store(out)
    keep = ("item_id", "metric", "score", "response", "in_language")
    return {
        rel: sorted(tuple(r[k] for k in keep) for r in read_table(store, rel).to_pylist())
        for rel in store.list("samples")
    }


def test_actors_load_each_model_once_and_match_the_in_process_run(ray_cluster, models, tmp_path):
    three = {k: models[k] for k in ("a", "b", "c")}
    args = dict(benchmarks=["chat", "choice"], languages=["en", "ko"], **COMMON)
    on_ray = run_eval(three, workers=2, out_uri=str(tmp_path / "ray"), run_id="ray", **args)
    assert on_ray.ok and on_ray.counts["generated"] == 12
    assert on_ray.loads == {uri: 1 for uri in three.values()}
    local = run_eval(three, workers=0, out_uri=str(tmp_path / "local"), run_id="local", **args)
    assert rows_by_cell(str(tmp_path / "ray")) == rows_by_cell(str(tmp_path / "local"))

    def strip(t):
        return sorted(
            (r["model"], r["language"], r["benchmark"], r["metric"], r["value"], r["n"]) for r in t.to_pylist()
        )

    assert strip(on_ray.summary) == strip(local.summary)
    # resuming on Ray: nothing left to do, no actor loads anything
    again = run_eval(three, workers=2, out_uri=str(tmp_path / "ray"), **args)
    assert again.ok and again.loads == {} and again.counts["skipped"] == 12


def test_failed_model_cells_are_kept_apart_and_the_judge_actor_scores_the_rest(ray_cluster, models, tmp_path):
    out = str(tmp_path / "out")
    outcome = run_eval(
        {"a": models["a"], "ghost": str(tmp_path / "missing")},
        workers=2,
        benchmarks=["chat"],
        languages=["zh-Hant", "ja"],
        judge=models["judge"],
        out_uri=out,
        **COMMON,
    )
    assert sorted(r.key for r in outcome.failed) == ["ghost/ja/chat", "ghost/zh-Hant/chat"]
    assert all("does not exist" in r.error for r in outcome.failed)
    assert outcome.loads == {models["a"]: 1, models["judge"]: 1}
    judged = [
        r
        for rel in Store(out).list("samples")
        for r in read_table(Store(out), rel).to_pylist()
        if r["metric"] == "judge_score"
    ]
    assert len(judged) == 10 and all(r["judge_model"] == models["judge"] for r in judged)
    assert {r["model"] for r in outcome.summary.to_pylist()} == {"a"}


def test_a_dead_actor_fails_only_the_cell_it_was_running(ray_cluster, models, tmp_path):
    import ray

    out = str(tmp_path / "out")
    run_id = "dies"
    killed = threading.Event()

    def kill_first_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                actor = ray.get_actor(actor_name("eval", run_id, 0))
            except ValueError:
                time.sleep(0.05)
                continue
            ray.kill(actor, no_restart=True)
            killed.set()
            return

    killer = threading.Thread(target=kill_first_actor, daemon=True)
    killer.start()
    args = dict(benchmarks=["chat", "safety", "choice"], languages=["en", "ko", "ja"], out_uri=out, **COMMON)
    outcome = run_eval({"b": models["b"]}, workers=1, run_id=run_id, **args)
    killer.join()
    assert killed.is_set()
    assert len(outcome.failed) == 1 and "actor died" in outcome.failed[0].error
    done = [r for r in outcome.results if r.state == DONE]
    assert len(done) == 8
    status = Store(out).read_text(
        f"status/model=b/language={outcome.failed[0].language}/benchmark={outcome.failed[0].benchmark}.json"
    )
    assert FAILED in status
    # the next run redoes the failed cell only
    retry = run_eval({"b": models["b"]}, workers=1, **args)
    assert retry.ok and [r.key for r in retry.results if r.state == DONE] == [outcome.failed[0].key]


def test_relative_paths_reach_the_actors(ray_cluster, models, tmp_path, monkeypatch):
    import json
    import shutil

    shutil.copytree(models["c"], tmp_path / "here-model")
    (tmp_path / "qs.jsonl").write_text(json.dumps({"question": "Why?"}) + "\n")
    monkeypatch.chdir(tmp_path)
    outcome = run_eval(
        {"c": "here-model"},
        workers=1,
        benchmarks=["qs=qs.jsonl:chat:en", "choice"],
        languages=["en"],
        out_uri="rel-out",
        **COMMON,
    )
    assert outcome.ok and outcome.loads == {str(tmp_path / "here-model"): 1}
    assert Store(str(tmp_path / "rel-out")).list("samples") == [
        "samples/model=c/language=en/benchmark=choice.parquet",
        "samples/model=c/language=en/benchmark=qs.parquet",
    ]
