"""vLLM eval actors on a local Ray: two actors, one long-lived engine each, every model loaded once,
the same rows as the hf engine in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")

from chatvec.cluster.eval_driver import run_eval  # noqa: E402
from chatvec.core.config import ChatvecConfig, EvalSettings, VLLMSettings  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.eval.results import read_table  # noqa: E402

pytestmark = pytest.mark.slow

TOY = Path(__file__).resolve().parents[1] / "demo" / "toyworld" / "checkpoints"
CONFIG = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0, vllm=VLLMSettings(enforce_eager=True, cpu_kvcache_gib=1)))


def rows(out: str) -> dict[str, list[tuple]]:
    store = Store(out)
    keep = ("item_id", "metric", "response", "prompt_tokens", "completion_tokens")
    return {
        rel: sorted(tuple(r[k] for k in keep) for r in read_table(store, rel).to_pylist())
        for rel in store.list("samples")
    }


def test_two_vllm_actors_load_each_model_once(ray_cluster, tmp_path):
    models = {name: str(TOY / name) for name in ("cp", "chat", "base")}
    args = dict(
        benchmarks=[str(TOY / "benchmarks.yaml")],
        languages=["toy-l1", "toy-l2"],
        device="cpu",
        max_new_tokens=16,
        limit=20,
        config=CONFIG,
        show_progress=False,
    )
    on_ray = run_eval(models, engine="vllm", workers=2, out_uri=str(tmp_path / "ray"), run_id="ray", **args)
    assert on_ray.ok, [r.error for r in on_ray.failed]
    assert on_ray.counts["generated"] == 6
    assert on_ray.loads == {uri: 1 for uri in models.values()}  # three models over two actors, each loaded once
    local = run_eval(models, engine="hf", workers=0, out_uri=str(tmp_path / "hf"), run_id="hf", **args)
    assert rows(str(tmp_path / "ray")) == rows(str(tmp_path / "hf"))
    engines = {
        r["engine"]
        for rel in Store(str(tmp_path / "ray")).list("samples")
        for r in read_table(Store(str(tmp_path / "ray")), rel).to_pylist()
    }
    assert engines == {"vllm"} and local.ok


def test_in_engine_sweep_on_a_vllm_actor(ray_cluster, tmp_path):
    """One target: one actor loads the CP model once and takes every point in turn."""
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    text = (
        f"name: ie\nvectors:\n  toy: {{base: {TOY}/base, chat: {TOY}/chat}}\n"
        f"targets:\n  - {{language: toy-l2, cp: {TOY}/cp, benchmarks: [{TOY}/benchmarks.yaml]}}\n"
        "ratios: [0.5, 1.0, 1.25]\nembeddings: [skip]\nbaselines: {cp: false, chat: false}\n"
        "device: cpu\neval: {limit: 16, max_new_tokens: 12}\nin_engine: true\n"
    )
    answers = {}
    for engine, workers in (("vllm", 2), ("hf", 0)):
        path = tmp_path / f"{engine}.yaml"
        path.write_text(text + f"engine: {engine}\nroot: {tmp_path / engine}\n")
        lines: list[str] = []
        outcome = run_sweep(
            load_sweep(str(path)), run_id="r", config=CONFIG, merge_workers=0, eval_workers=workers, echo=lines.append
        )
        assert not outcome.failed_cells, outcome.failed_cells
        answers[engine] = rows(str(tmp_path / engine / "results" / "run=r"))
        assert not (tmp_path / engine / "models").exists()
    assert len(answers["vllm"]) == 3 and answers["vllm"] == answers["hf"]
