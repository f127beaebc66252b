"""The demo end to end on a `--quick` toy world: train it, merge CP + r x (chat - base) for two
ratios and both embedding policies on Ray actors, evaluate merges and baselines in both toy
languages, report; and the shipped seed-0 world that `chatvec demo` uses by default."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatvec.core.storage import Store
from chatvec.eval import history

RATIOS = (0.5, 1.25)
LIMIT = 8  # instructions per model (of the quick world's 16)
HEADLINE = ("closed", "either_script", "exact_match", "in_language")
LANGUAGES = ("toy-l2", "toy-l1")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_cluster):
    from chatvec.cli.cmd_demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    sweep_path, outcome = run_demo(
        out, run_id="e2e", workers=2, eval_workers=1, quick=True, limit=LIMIT, ratios=RATIOS, echo=lines.append
    )
    return out, sweep_path, outcome, lines


def _samples(outcome) -> list[dict]:
    store = Store(outcome.results_uri)
    rows = []
    for rel in store.list("samples"):
        if rel.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(store.read_bytes(rel))).to_pylist()
    return rows


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_sweep_merges_evaluates_and_reports(demo_run):
    out, sweep_path, outcome, lines = demo_run
    assert outcome.exit_status == 0, outcome.failed_cells
    assert "A --quick world" in (out / "store" / "reports" / "e2e" / "index.html").read_text()
    merged = {
        lang: [f"toy-chat.{lang}.add.r{r:g}.emb-{e}" for e in ("all", "skip") for r in RATIOS] for lang in LANGUAGES
    }
    # the L1 target has the same CP model: its merges are the L2 target's, done once
    assert sorted(outcome.merged) == sorted(merged["toy-l2"])
    uris = {m["name"]: m["uri"] for m in history.read_run_info(outcome.root, "e2e")["models"]}
    assert [uris[n] for n in merged["toy-l1"]] == [uris[n] for n in merged["toy-l2"]]
    models = {lang: merged[lang] + [f"cp.{lang}", "chat.toy-chat"] for lang in LANGUAGES}

    # every model answered every instruction of its languages once, scored on the four metrics
    rows = _samples(outcome)
    for lang in LANGUAGES:
        mine = [r for r in rows if r["language"] == lang]
        assert {r["model"] for r in mine} == set(models[lang])
        assert len({(r["model"], r["item_id"]) for r in mine}) == LIMIT * len(models[lang])
        assert len(mine) == LIMIT * len(models[lang]) * len(HEADLINE)
    assert {r["language"] for r in rows} == set(LANGUAGES)
    summary = history.load_summary(outcome.root, "e2e").to_pylist()
    assert len(summary) == sum(len(m) for m in models.values()) * len(HEADLINE)
    assert all(r["n"] == LIMIT for r in summary if r["metric"] != "closed")

    # the merged models are other models than the CP one: their answers differ from CP's
    answers: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r["metric"] == "exact_match":
            answers.setdefault((r["model"], r["language"]), {})[r["item_id"]] = r["response"]
    for lang in LANGUAGES:
        for name in merged[lang] + ["chat.toy-chat"]:
            assert answers[(name, lang)] != answers[(f"cp.{lang}", lang)], (name, lang)


@pytest.mark.slow
def test_merged_weights_are_cp_plus_ratio_times_the_vector(demo_run):
    import torch

    out, _, outcome, _ = demo_run
    world = out / "world"
    base, chat, cp = (_tensors(world / m) for m in ("base", "chat", "cp"))
    models = out / "store" / "models"
    rows_of_words = {"model.embed_tokens.weight", "lm_head.weight"}
    for policy in ("all", "skip"):
        folder = next(models.glob(f"toy-chat.toy-l2.add.r1.25.emb-{policy}-*"))
        got = _tensors(folder)
        assert set(got) == set(cp)
        for name, t in got.items():
            want = (cp[name].float() + 1.25 * (chat[name].float() - base[name].float())).to(cp[name].dtype)
            if policy == "skip" and name in rows_of_words:
                want = cp[name]  # the embedding rows stay as the CP model has them
            assert torch.equal(t, want), (policy, name)
        assert not torch.equal(got["model.norm.weight"], cp["model.norm.weight"])


@pytest.mark.slow
def test_report_holds_every_plot_and_the_key_table(demo_run):
    from chatvec.cli.cmd_demo import key_table

    out, _, outcome, _ = demo_run
    report = Path(outcome.report_uri).parent
    page = (report / "index.html").read_text()
    imgs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert "overview.png" in imgs
    for metric in HEADLINE:
        assert any(i.startswith("heatmap-") and i.endswith(f"-{metric}.png") for i in imgs), metric
        assert any(i.startswith("ratio-") and i.endswith(f"-{metric}.png") for i in imgs), metric
    for name in imgs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    glance = page.split("<h2>At a glance</h2>")[1].split("<h2>")[0]
    assert "Wilson" in glance
    fid = page.split("<h2>Language fidelity</h2>")[1].split("<h2>")[0]
    for label in ("CP", "chat", "CP + 0.5 CV (emb all)", "CP + 1.25 CV (emb skip)"):
        assert f"<td>{label}</td>" in fid and f"<td>{label}</td>" in glance

    table = key_table(outcome.root, "e2e").splitlines()
    assert table[0].split() == ["target", "model", *HEADLINE]
    per_language = 2 + 2 * len(RATIOS)  # CP, chat, the merges
    assert len(table) == 2 + 2 * per_language + 1  # header, rule, a blank line between languages
    for lang in LANGUAGES:
        assert re.search(
            rf"^{lang}\s+CP \+ 1\.25 CV \(emb skip\)\s+\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", "\n".join(table), re.M
        ), lang


@pytest.mark.slow
def test_cli_reuses_world_and_merges(demo_run):
    from click.testing import CliRunner

    from chatvec.cli.cmd_demo import demo

    out, _, _, _ = demo_run
    args = ["--out", str(out), "--quick", "--limit", "2", "--run-id", "again", "--workers", "0", "--eval-workers", "0"]
    result = CliRunner().invoke(demo, args)
    assert result.exit_code == 0, result.output
    assert f"using the toy world in {out / 'world'}" in result.output
    # the demo's ratios are 0.5, 1.0 and 1.25: only the two merges at 1.0 are new
    assert result.output.count("  reusing toy-chat.toy-l2.add.r") == 2 * len(RATIOS)
    assert result.output.count(" is the same merge as toy-chat.toy-l2.add.r") == 2 * 3
    assert result.output.count("\nmerge ") == 2
    assert "CP + r x (chat - base)" in result.output and "report:" in result.output
    assert [r.run_id for r in history.list_runs(str(out / "store"))] == ["e2e", "again"]


@pytest.mark.slow
def test_other_world_in_the_folder_is_refused(demo_run):
    from chatvec.cli.cmd_demo import prepare_world
    from chatvec.core.errors import InputError

    out, _, _, _ = demo_run
    with pytest.raises(InputError, match="--rebuild"):
        prepare_world(out / "world", seed=5, quick=True, echo=lambda _: None)


def test_shipped_world():
    from chatvec.cli.cmd_demo import shipped_world
    from chatvec.demo.toyworld.build import load_world
    from chatvec.eval.benchmarks import parse_benchmark

    world = shipped_world()
    info = load_world(str(world))
    assert info["seed"] == 0 and not info["quick"]
    size = sum(p.stat().st_size for p in world.rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024
    for model in ("base", "chat", "cp"):
        config = json.loads((world / model / "config.json").read_text())
        assert config["torch_dtype"] == "bfloat16"
        assert (world / model / "model.safetensors.index.json").is_file() or (
            world / model / "model.safetensors"
        ).is_file()
    # the benchmark file names its data relative to itself, so the world works wherever it is
    text = (world / "benchmarks.yaml").read_text()
    assert "/" + "benchmarks/toy-task" not in text
    (spec,) = parse_benchmark(str(world / "benchmarks.yaml"))
    assert set(spec.data) == {"toy-l1", "toy-l2"}
    for path in spec.data.values():
        assert sum(1 for _ in open(path, encoding="utf-8")) == 240


def test_intervals():
    from chatvec.eval.report_plots import fmt_interval, interval95, wilson

    lo, hi = wilson(0.5, 100)
    assert round(lo, 4) == 0.4038 and round(hi, 4) == 0.5962
    # a rate of 0 or 1 still has an interval (its stderr is 0), and it stays inside [0, 1]
    assert interval95("exact_match", 0.0, 0.0, 240) == (0.0, pytest.approx(0.01575, abs=1e-5))
    assert interval95("closed", 1.0, 0.0, 240)[1] == 1.0
    # other metrics: mean +- 1.96 stderr
    assert interval95("judge_score", 5.0, 0.5, 80) == pytest.approx((4.02, 5.98), abs=1e-3)
    assert fmt_interval("in_language", 0.25, *interval95("in_language", 0.25, None, 240)) == "0.25 [0.20, 0.31]"
