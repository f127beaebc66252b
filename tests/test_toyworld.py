"""The toy world: build (--quick), determinism, data/tokenizer agreement, task scoring, script fidelity."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from chatvec.core.errors import InputError, OutputExistsError
from chatvec.demo.toyworld.build import WorldConfig, benchmark_specs, build_world, load_world
from chatvec.demo.toyworld.corpora import IGNORE, Corpora
from chatvec.demo.toyworld.language import SCRIPTS as TOY_SCRIPTS
from chatvec.demo.toyworld.language import ToyLanguage, to_l1, to_l2, transliterate
from chatvec.demo.toyworld.tasks import benchmark_items
from chatvec.demo.toyworld.tokenizer import build_tokenizer
from chatvec.eval.benchmarks import parse_benchmark
from chatvec.eval.fidelity import FidelityScorer, ScriptDetector
from chatvec.eval.kinds.task import closed, either_script_match, exact_match

TOY = ScriptDetector(TOY_SCRIPTS)


def script_of(text: str) -> str | None:
    return TOY(text)[1]


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyworld") / "world"
    summary = build_world(str(out), WorldConfig.small(seed=3), progress=False)
    return out, summary


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


# -- the generator --------------------------------------------------------------------------------
def test_l2_is_l1_in_cyrillic():
    lang = ToyLanguage.generate(seed=1, n_words=40)
    assert len(set(lang.words)) == len(lang.words)
    for w in lang.words:
        assert to_l1(to_l2(w)) == w
        assert script_of(w) == "Latin" and script_of(to_l2(w)) == "Cyrillic"
    assert transliterate("reverse " + lang.words[0], "toy-l2") == f"{to_l2('reverse')} {to_l2(lang.words[0])}"
    assert ToyLanguage.generate(seed=1, n_words=40).words == lang.words
    assert ToyLanguage.generate(seed=2, n_words=40).words != lang.words


def test_training_ids_match_the_chat_template():
    """The SFT data must be exactly what the saved tokenizer and chat template produce."""
    lang = ToyLanguage.generate(seed=0, n_words=30)
    tok = build_tokenizer(lang)
    corpora = Corpora(lang)
    ids, labels = corpora.sft_example(random.Random(5))
    words = [tok.convert_ids_to_tokens(i) for i in ids]
    user_text = " ".join(words[1 : words.index("<assistant>")])
    answer_text = " ".join(words[words.index("<assistant>") + 1 : -1])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer_text}], tokenize=False
    )
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(y == IGNORE for y in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids


def test_benchmark_items_pair_the_languages():
    lang = ToyLanguage.generate(seed=0, n_words=30)
    items = benchmark_items(lang, seed=0, per_task=3)
    l1, l2 = items["toy-l1"], items["toy-l2"]
    assert len(l1) == len(l2) == 12
    for a, b in zip(l1, l2):
        assert a["id"] == b["id"] and a["task"] == b["task"]
        assert transliterate(a["prompt"], "toy-l2") == b["prompt"]
        assert a["answer"] == b["answer_other_script"] and b["answer"] == a["answer_other_script"]
        assert TOY(b["prompt"])[0] == "toy-l2" and TOY(a["answer"])[0] == "toy-l1"
    rev = next(x for x in l1 if x["task"] == "reverse")
    assert rev["answer"].split() == list(reversed(rev["prompt"].split()[1:]))


# -- the build --------------------------------------------------------------------------------
def test_quick_world_builds_loadable_checkpoints(quick_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = quick_world
    assert load_world(str(out)) == summary
    for name in ("base", "chat", "cp"):
        folder = out / name
        for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
            assert (folder / f).is_file(), f"{name}/{f}"
        assert _digest(folder)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(out / "chat")
    assert tok.eos_token == "<end>" and {"<user>", "<assistant>"} <= set(tok.all_special_tokens)
    model = AutoModelForCausalLM.from_pretrained(out / "chat")
    assert str(model.dtype) == "torch.bfloat16"
    items = [json.loads(line) for line in (out / "benchmarks" / "toy-task" / "toy-l2.jsonl").read_text().splitlines()]
    assert len(items) == summary["benchmarks"]["toy-task"]["items"] == 16
    ids = tok.apply_chat_template(
        [{"role": "user", "content": items[0]["prompt"]}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert tok.unk_token_id not in ids
    (spec,) = parse_benchmark(str(out / "benchmarks.yaml"))
    assert (spec.name, spec.kind, sorted(spec.data)) == ("toy-task", "task", ["toy-l1", "toy-l2"])
    assert spec.data["toy-l2"] == str(out / "benchmarks" / "toy-task" / "toy-l2.jsonl")
    # The three models differ (chat and cp trained on from the same base).
    digests = {name: _digest(out / name) for name in ("base", "chat", "cp")}
    assert len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 3


def test_same_seed_same_weights(quick_world, tmp_path):
    out, _ = quick_world
    again = tmp_path / "again"
    build_world(str(again), WorldConfig.small(seed=3), progress=False)
    for name in ("base", "chat", "cp"):
        assert _digest(out / name) == _digest(again / name), name
    for lang in ("toy-l1", "toy-l2"):
        rel = f"benchmarks/toy-task/{lang}.jsonl"
        assert (out / rel).read_bytes() == (again / rel).read_bytes()


def test_build_refuses_a_finished_world_and_load_refuses_an_unfinished_one(quick_world, tmp_path):
    out, _ = quick_world
    with pytest.raises(OutputExistsError, match="delete it"):
        build_world(str(out), WorldConfig.small(seed=3), progress=False)
    (tmp_path / "half" / "base").mkdir(parents=True)
    (tmp_path / "half" / "base" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="toyworld build"):
        load_world(str(tmp_path / "half"))
    with pytest.raises(OutputExistsError, match="unfinished"):
        build_world(str(tmp_path / "half"), WorldConfig.small(seed=3), progress=False)


def test_cli_builds_to_s3(s3_server):
    from click.testing import CliRunner

    from chatvec.cli.cmd_toyworld import toyworld
    from chatvec.core.storage import Store

    uri = s3_server.make_bucket() + "/worlds/w1"
    result = CliRunner().invoke(toyworld, ["build", "--out", uri, "--seed", "1", "--quick", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "benchmark toy-task" in result.output
    files = Store(uri).list()
    assert "world.json" in files and "chat/model.safetensors" in files and "benchmarks/toy-task/toy-l1.jsonl" in files
    assert load_world(uri)["seed"] == 1
    (spec,) = benchmark_specs(uri)
    assert spec.kind == "task" and spec.data["toy-l2"] == uri + "/benchmarks/toy-task/toy-l2.jsonl"
    assert spec.scripts == TOY_SCRIPTS


def test_task_kind_runs_on_the_world(quick_world, tmp_path):
    """The `task` kind through the evaluation runner: every metric for every cell, scored rows
    consistent with the fixed-string scorers, fidelity decided by script."""
    import pyarrow.parquet as pq

    from chatvec.eval.contracts import RunSettings
    from chatvec.eval.pipeline import run_pipeline
    from chatvec.eval.runner import LocalCellExecutor

    out, _ = quick_world
    models = {"chat": str(out / "chat"), "cp": str(out / "cp")}
    outcome = run_pipeline(
        models,
        executor=LocalCellExecutor(),
        benchmarks=[str(out / "benchmarks.yaml")],
        out_uri=str(tmp_path / "results"),
        settings=RunSettings(device="cpu", batch_size=8),
        show_progress=False,
    )
    assert outcome.ok, outcome.failed
    from chatvec.eval.fidelity import _DETECTORS as registered_detectors
    from chatvec.eval.kinds import KINDS

    # the benchmark's scripts reached the scorer and the kind was found by name: nothing global was written
    assert not registered_detectors and "toy-l1" not in KINDS.names()
    summary = outcome.summary.to_pylist()
    got = {(r["model"], r["language"], r["metric"]): r for r in summary}
    for model in models:
        for lang in ("toy-l1", "toy-l2"):
            for metric in ("exact_match", "either_script", "closed", "in_language"):
                r = got[(model, lang, metric)]
                assert r["n"] == 16 and r["kind"] == "task" and 0.0 <= r["value"] <= 1.0
    files = sorted((tmp_path / "results").rglob("*.parquet"))
    rows = [r for f in files if f.name != "summary.parquet" for r in pq.read_table(f).to_pylist()]
    assert rows
    for r in rows:
        d = json.loads(r["details"])
        if r["metric"] == "exact_match":
            assert r["score"] == exact_match(r["response"], d["answer"])
        elif r["metric"] == "either_script":
            assert r["score"] == either_script_match(r["response"], [d["answer"], d["answer_other_script"]])
        elif r["metric"] == "closed":
            assert r["score"] == float(d["finished"])
        elif r["metric"] == "in_language":
            assert r["score"] == float(TOY(r["response"])[0] == r["language"])


# -- task scoring on fixed strings ------------------------------------------------------------
def test_exact_match():
    assert exact_match("doba zuda", "doba zuda") == 1.0
    assert exact_match("  Doba   zuda. ", "doba zuda") == 1.0
    assert exact_match("doba zuda zuda", "doba zuda") == 0.0
    assert exact_match("zuda doba", "doba zuda") == 0.0
    assert exact_match("доба зуда", "doba zuda") == 0.0
    assert exact_match("", "doba zuda") == 0.0
    assert exact_match(None, "doba") == 0.0
    assert exact_match("", "") == 0.0


def test_either_script_match():
    answers = ["доба зуда", "doba zuda"]
    assert either_script_match("доба зуда", answers) == 1.0
    assert either_script_match("doba zuda", answers) == 1.0
    assert either_script_match("doba зуда", answers) == 1.0  # mixed word by word
    assert either_script_match("зуда доба", answers) == 0.0
    assert either_script_match("doba", answers) == 0.0
    assert either_script_match("doba zuda lano", answers) == 0.0
    assert either_script_match("дoba zuda", answers) == 0.0  # a word mixing scripts is no word
    assert either_script_match("doba zuda", []) == 0.0


def test_closed():
    assert closed(True) == 1.0 and closed(False) == 0.0 and closed(None) is None


# -- script-based language fidelity -------------------------------------------------------------
@pytest.fixture
def toy_fidelity():
    # the detector is given to the scorer, as the evaluator does from a benchmark's `scripts`
    return FidelityScorer(list(TOY_SCRIPTS), detectors={lang: TOY for lang in TOY_SCRIPTS})


def test_script_detector_on_fixed_strings():
    assert TOY("doba zuda") == ("toy-l1", "Latin")
    assert TOY("рэвэрсэ доба зуда") == ("toy-l2", "Cyrillic")
    assert TOY("доба zuda lano") == ("toy-l1", "Latin")  # the majority of letters decides
    assert TOY("доба зуда lano.") == ("toy-l2", "Cyrillic")
    assert TOY("... 123") == (None, None)
    assert TOY("안녕하세요") == (None, "Hangul")


def test_fidelity_scorer_accepts_the_toy_languages(toy_fidelity):
    d = toy_fidelity.detect("доба зуда", "toy-l2")
    assert (d.language, d.script, d.in_language) == ("toy-l2", "Cyrillic", True)
    d = toy_fidelity.detect("doba zuda", "toy-l2")
    assert (d.language, d.in_language) == ("toy-l1", False)
    assert toy_fidelity.detect("doba zuda", "toy-l1").in_language is True
    assert toy_fidelity.detect("", "toy-l2").in_language is False
