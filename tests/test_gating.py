"""Scores that count only in the target language (``gate: in_language``): hand-written answers in
several languages and scripts, scored, stored, summarized, compared and printed; bad gates refused
before any model loads."""

from __future__ import annotations

import math

import pytest

from chatvec.core.errors import ChatvecError, InputError
from chatvec.core.storage import Store
from chatvec.eval.benchmarks import BenchmarkSpec, parse_benchmark, resolve_benchmarks
from chatvec.eval.contracts import Cell
from chatvec.eval.fidelity import FidelityScorer, ScriptDetector
from chatvec.eval.gating import check_metric, gated_rows, metric_names, split_metric
from chatvec.eval.history import compare, lower_is_better
from chatvec.eval.kinds import get_kind
from chatvec.eval.kinds.base import in_language_row, row
from chatvec.eval.kinds.task import exact_match
from chatvec.eval.paired import pair_changes
from chatvec.eval.results import now, summarize, write_samples
from chatvec.eval.schema import samples_table
from chatvec.eval.tabulate import format_summary

# (item, language, the judge's rating, the model's answer): good or bad, in or out of language
ANSWERS = [
    ("e1", "en", 9.0, "The capital of France is Paris, a city on the Seine."),
    ("e2", "en", 7.0, "Water boils at one hundred degrees at sea level."),
    ("e3", "en", 8.0, "하늘이 파랗게 보이는 이유는 빛이 산란되기 때문입니다."),
    ("j1", "ja", 9.0, "東京は日本の首都です。"),
    ("j2", "ja", 9.0, "Tokyo is the capital city of Japan."),  # a good answer, in English
    ("j3", "ja", 6.0, "富士山は日本一高い山です。"),
    ("k1", "ko", 8.0, "서울은 한국의 수도입니다."),
    ("k2", "ko", 8.0, "Seoul is the capital of South Korea."),
    ("k3", "ko", 5.0, "42"),  # too little prose: undetermined
    ("t1", "zh-Hant", 9.0, "臺灣的首都是臺北市。"),
    ("t2", "zh-Hant", 9.0, "我们今天一起去图书馆读书。"),  # the right words in the wrong script
    ("s1", "zh-Hans", 7.0, "我们今天一起去图书馆读书。"),
    ("s2", "zh-Hans", 7.0, "我們今天一起去圖書館讀書。"),  # Traditional where Simplified is asked
    ("x1", "toy-l1", 6.0, "lum bara sen"),
    ("x2", "toy-l1", 6.0, "лум бара сен"),  # the toy world's other script
    ("x3", "toy-l2", 6.0, "лум бара сен"),
]
TOY = {"toy-l1": "Latin", "toy-l2": "Cyrillic"}


@pytest.fixture(scope="module")
def scorer():
    langs = sorted({a[1] for a in ANSWERS})
    return FidelityScorer(langs, detectors={lang: ScriptDetector(TOY) for lang in TOY})


def chat_rows(scorer, model: str = "m", worse: frozenset = frozenset()) -> list[dict]:
    """Rows as the chat kind stores them once judged: judge_score, and in_language from the
    detector (``worse``: items rated 0 instead)."""
    out = []
    for item, lang, rating, response in ANSWERS:
        det = scorer.detect(response, lang)
        fields = dict(
            prompt="p",
            response=response,
            detected_language=det.language,
            detected_script=det.script,
            in_language=det.in_language,
        )
        base = dict(run_id="r", model=model, language=lang, benchmark="qa", kind="chat", engine="hf")
        score = 0.0 if item in worse else rating
        for r in (row(item, "judge_score", score, judge_status="ok", **fields), in_language_row(item, fields)):
            r.update(base, created_at=now())
            out.append(r)
    return out


def test_each_language_and_script_is_told_apart(scorer):
    got = {r["item_id"]: r["in_language"] for r in chat_rows(scorer) if r["metric"] == "in_language"}
    assert got == {
        "e1": True,
        "e2": True,
        "e3": False,
        "j1": True,
        "j2": False,
        "j3": True,
        "k1": True,
        "k2": False,
        "k3": None,
        "t1": True,
        "t2": False,
        "s1": True,
        "s2": False,
        "x1": True,
        "x2": False,
        "x3": True,
    }


def test_an_answer_rated_well_in_the_wrong_language_fails_and_an_undetermined_one_is_left_out(scorer):
    kind = get_kind("chat")
    rows = [r for r in chat_rows(scorer) if r["metric"] == "judge_score"]
    by = {r["item_id"]: r for r in gated_rows(kind, "judge_score", rows)}
    assert all(r["metric"] == "judge_score@lang" for r in by.values())
    assert {i: by[i]["score"] for i in ("j1", "j2", "k2", "t2", "s2", "x1", "x2", "e3")} == {
        "j1": 9.0,
        "j2": 0.0,
        "k2": 0.0,
        "t2": 0.0,
        "s2": 0.0,
        "x1": 6.0,
        "x2": 0.0,
        "e3": 0.0,
    }
    assert by["k3"]["score"] is None  # undetermined: not a failure, not a success
    value, _se, n = kind.aggregate("judge_score", list(by.values()))
    assert n == len(ANSWERS) - 1
    assert value == pytest.approx(sum(r["score"] or 0.0 for r in by.values()) / n)


def test_a_task_answer_gated_by_script(scorer):
    """The task kind's exact match already asks for the target script; the gate adds the
    language check to its other metrics (either_script: the right words in any script)."""
    task = get_kind("task")
    rows = [
        {
            "item_id": "t2",
            "score": 1.0,
            "in_language": scorer.detect("我们今天一起去图书馆读书。", "zh-Hant").in_language,
        }
    ]
    assert exact_match("我们今天一起去图书馆读书", "我們今天一起去圖書館讀書") == 0.0
    assert [r["score"] for r in gated_rows(task, "either_script", rows)] == [0.0]


def test_a_lower_is_better_metric_fails_with_its_worst_value():
    safety = get_kind("safety")
    rows = [
        {"item_id": "a", "score": 0.0, "in_language": False},
        {"item_id": "b", "score": 0.0, "in_language": True},
        {"item_id": "c", "score": None, "in_language": False},  # waiting for a judge: stays unscored
    ]
    assert [r["score"] for r in gated_rows(safety, "unsafe", rows)] == [1.0, 0.0, None]
    assert [r["score"] for r in gated_rows(safety, "refusal", rows)] == [0.0, 0.0, None]
    assert gated_rows(safety, "in_language", rows) is None
    assert lower_is_better("unsafe@lang") and not lower_is_better("exact_match@lang")


def write_cell(out: str, rows: list[dict], model: str = "m") -> None:
    store = Store(out)
    for lang in sorted({r["language"] for r in rows}):
        mine = [r for r in rows if r["language"] == lang and r["model"] == model]
        write_samples(store, Cell(model, lang, "qa"), samples_table(mine))


def test_summary_holds_gated_and_plain_rows_side_by_side(scorer, tmp_path):
    out = str(tmp_path / "out")
    write_cell(out, chat_rows(scorer))
    plain = summarize(out, "r").to_pylist()
    assert not any(split_metric(r["metric"])[1] for r in plain)
    gated = {(r["language"], r["metric"]): r for r in summarize(out, "r", gates={"qa": "in_language"}).to_pylist()}
    ja, ja_gated = gated[("ja", "judge_score")], gated[("ja", "judge_score@lang")]
    assert (ja["value"], ja["n"]) == (pytest.approx(8.0), 3)  # good answers, one of them in English
    assert (ja_gated["value"], ja_gated["n"]) == (pytest.approx(5.0), 3)
    ko = gated[("ko", "judge_score@lang")]
    assert (ko["value"], ko["n"], ko["n_unscored"]) == (pytest.approx(4.0), 2, 1)
    assert ("ko", "in_language@lang") not in gated  # fidelity itself is not gated
    text = format_summary(summarize(out, "r", gates={"qa": "in_language"}))
    assert "in language only" in text
    line = next(x for x in text.splitlines() if x.startswith("m") and " ja " in x and "judge_score" in x)
    assert "8.000" in line and "5.000" in line  # ungated, then gated, on one line


def test_gated_metrics_are_compared_item_by_item_between_runs(scorer, tmp_path):
    a_out, b_out = str(tmp_path / "a"), str(tmp_path / "b")
    rows_a = chat_rows(scorer)
    rows_b = chat_rows(scorer, worse=frozenset({"e1", "e2"}))
    write_cell(a_out, rows_a)
    write_cell(b_out, rows_b)
    gates = {"qa": "in_language"}
    changes = compare(summarize(a_out, "r", gates=gates), summarize(b_out, "r", gates=gates), k=2.0)
    assert any(c.metric == "judge_score@lang" for c in changes)
    check = pair_changes(changes, rows_a, rows_b, k=2.0)
    paired = {key[1:]: d for key, d in check.paired.items()}
    d = paired[("en", "qa", "judge_score@lang")]
    assert d.n == 3 and d.diff == pytest.approx(-16 / 3)  # e3 fails in both runs; e1 and e2 drop to 0


def test_metric_names_accept_gated_names_only_where_gated():
    kind = get_kind("task")
    gated = metric_names(kind, "in_language")
    assert "exact_match@lang" in gated and "in_language@lang" not in gated
    assert check_metric("exact_match@lang", gated) == "exact_match@lang"
    with pytest.raises(InputError, match="needs 'gate: in_language'"):
        check_metric("exact_match@lang", metric_names(kind, None), "objective")


@pytest.mark.parametrize("kind", ["choice", "perplexity"])
def test_a_gate_on_a_kind_without_generated_text_is_refused(kind):
    spec = BenchmarkSpec(name="b", kind=kind, data={"en": "x.jsonl"}, gate="in_language")
    with pytest.raises(ChatvecError, match="generates no text"):
        parse_benchmark(spec)


def test_an_unknown_gate_is_refused(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("benchmarks:\n  - {name: b, kind: chat, data: {en: x.jsonl}, gate: in_english}\n")
    with pytest.raises(ChatvecError, match="unknown gate 'in_english'"):
        resolve_benchmarks([str(path)])


def test_the_cli_refuses_a_bad_gate_before_any_model_loads(tmp_path):
    from click.testing import CliRunner

    from chatvec.cli.main import cli

    path = tmp_path / "b.yaml"
    path.write_text("benchmarks:\n  - {name: mc, kind: choice, data: {en: nowhere.jsonl}, gate: in_language}\n")
    result = CliRunner().invoke(
        cli,
        ["eval", "--model", f"m={tmp_path / 'no-model'}", "--benchmark", str(path), "--out", str(tmp_path / "o")],
    )
    assert isinstance(result.exception, ChatvecError) and "generates no text" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_same_benchmark_named_with_two_gates_is_refused(tmp_path):
    a = BenchmarkSpec(name="b", kind="chat", data={"en": str(tmp_path / "x.jsonl")}, gate="in_language")
    b = BenchmarkSpec(name="b", kind="chat", data={"ko": str(tmp_path / "y.jsonl")})
    with pytest.raises(InputError, match="different gates"):
        resolve_benchmarks([a, b])


def test_gated_value_is_nan_free_when_nothing_is_determined():
    kind = get_kind("task")
    rows = [{"item_id": "a", "score": 1.0, "in_language": None}]
    value, se, n = kind.aggregate("exact_match", gated_rows(kind, "exact_match", rows))
    assert (value, se, n) == (None, None, 0) and not (value is not None and math.isnan(value))


def test_a_run_reports_gated_metrics_and_toggling_the_gate_recomputes_no_cell(tmp_path):
    """With the hf engine and a tiny model: the gate is applied when summarizing, so turning it
    off and on again reuses every cell (the stored rows do not depend on it)."""
    pytest.importorskip("torch")
    from chatvec.demo.tiny import build_model_dir
    from chatvec.eval.contracts import RunSettings
    from chatvec.eval.pipeline import run_pipeline
    from chatvec.eval.runner import LocalCellExecutor

    model = str(build_model_dir(tmp_path / "m", seed=1, shard_size=None))
    data = tmp_path / "qa.jsonl"
    data.write_text(
        '{"id": "1", "prompt": "Repeat: good morning", "answer": "good morning"}\n'
        '{"id": "2", "prompt": "Repeat: thank you", "answer": "thank you"}\n'
    )

    def spec(gate):
        return BenchmarkSpec(name="qa", kind="task", data={"en": str(data)}, gate=gate)

    out = str(tmp_path / "out")
    settings = RunSettings(device="cpu", batch_size=2, max_new_tokens=4)
    kw = dict(out_uri=out, run_id="r", settings=settings, show_progress=False)
    first = run_pipeline({"m": model}, executor=LocalCellExecutor(), benchmarks=[spec("in_language")], **kw)
    metrics = {r["metric"] for r in first.summary.to_pylist()}
    assert {"exact_match", "exact_match@lang", "closed@lang", "in_language"} <= metrics
    assert "in_language@lang" not in metrics
    plain = run_pipeline({"m": model}, executor=LocalCellExecutor(), benchmarks=[spec(None)], **kw)
    assert plain.counts["generated"] == 0 and plain.counts["skipped"] == 1 and not plain.redone
    assert not any("@" in r["metric"] for r in plain.summary.to_pylist())
    again = run_pipeline({"m": model}, executor=LocalCellExecutor(), benchmarks=[spec("in_language")], **kw)
    assert again.counts["generated"] == 0
    assert sorted(again.summary.drop(["created_at"]).to_pylist(), key=str) == sorted(
        first.summary.drop(["created_at"]).to_pylist(), key=str
    )


def test_the_report_puts_gated_metrics_beside_the_plain_ones(scorer, tmp_path):
    from chatvec.eval.report import headline_table, write_report

    out = str(tmp_path / "out")
    write_cell(out, chat_rows(scorer))
    summary = summarize(out, "r", gates={"qa": "in_language"})
    heads, body = headline_table(summary)
    assert heads[2:] == ["judge_score", "judge_score@lang", "in_language"]
    ja = next(line for line in body if line[0].startswith("ja"))
    assert ja[2].startswith("8 [") and ja[3].startswith("5 [")
    index = write_report(str(tmp_path / "report"), run_id="r", summary=summary)
    page = Store(str(tmp_path / "report")).read_text("index.html")
    assert index.endswith("index.html") and "judge_score@lang" in page and "gate: in_language" in page
