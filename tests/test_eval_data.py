"""Benchmark specs and data files: shipped samples, user files, and clear errors for bad ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatvec.core.errors import ConfigError, InputError
from chatvec.eval.benchmarks import BenchmarkSpec, parse_benchmark, resolve_benchmarks, shipped_benchmarks
from chatvec.eval.errors import BenchmarkDataError
from chatvec.eval.items import load_items
from chatvec.eval.kinds import get_kind, kind_names
from chatvec.eval.pipeline import plan_cells

LANGS = {"en", "zh-Hant", "zh-Hans", "ko", "ja"}


def write_jsonl(path, records):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
        encoding="utf-8",
    )
    return str(path)


def test_shipped_samples_cover_every_kind_and_language():
    specs = {s.name: s for s in shipped_benchmarks()}
    assert {"chat", "multiturn", "safety", "choice", "perplexity"} <= set(specs)
    for spec in specs.values():
        assert LANGS <= set(spec.languages), spec.name
        for lang in spec.languages:
            items = load_items(spec, lang)
            assert len(items) >= 3
            assert len({i["id"] for i in items}) == len(items)


def test_builtin_kinds_are_listed():
    assert {"chat", "multiturn", "safety", "choice", "perplexity", "lm-eval"} <= set(kind_names())
    with pytest.raises(InputError, match="unknown benchmark kind 'nope'"):
        get_kind("nope")


def test_user_benchmark_spec_string(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?"}, {"question": "How?", "reference": "So."}])
    (spec,) = parse_benchmark(f"mine={path}:chat:ko")
    assert (spec.name, spec.kind, spec.data) == ("mine", "chat", {"ko": path})
    items = load_items(spec, "ko")
    assert [i["id"] for i in items] == ["1", "2"]  # line numbers when the data has no ids
    # the same name with another language joins the same benchmark
    other = write_jsonl(tmp_path / "q2.jsonl", [{"question": "Pourquoi ?"}])
    (joined,) = resolve_benchmarks([f"mine={path}:chat:ko", f"mine={other}:chat:fr"])
    assert joined.data == {"ko": path, "fr": other}
    cells = plan_cells({"a": "/m/a", "b": "/m/b"}, [f"mine={path}:chat:ko", f"mine={other}:chat:fr", "choice"], ["ko"])
    assert [c.key for c in cells] == ["a/ko/mine", "a/ko/choice", "b/ko/mine", "b/ko/choice"]


@pytest.mark.parametrize(
    "arg, match",
    [
        ("mine=data.jsonl:chat", "NAME=SOURCE:KIND:LANGUAGE"),
        ("mine=data.jsonl:riddle:ko", "unknown benchmark kind 'riddle'"),
        ("my bench=data.jsonl:chat:ko", "not a valid name"),
        ("nonexistent", "unknown benchmark 'nonexistent'"),
    ],
)
def test_bad_benchmark_args(arg, match):
    with pytest.raises(InputError, match=match):
        resolve_benchmarks([arg])


def test_language_filter_must_match_something():
    with pytest.raises(InputError, match="no benchmark has language"):
        plan_cells({"a": "/m/a"}, ["chat"], ["xx"])


def test_yaml_benchmark_file_with_field_mapping(tmp_path):
    data = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "Say hi", "output": "Hi"}])
    yaml_path = tmp_path / "benchmarks.yaml"
    yaml_path.write_text(
        "benchmarks:\n"
        "  - name: vicuna\n"
        "    kind: chat\n"
        f"    data: {{ko: {data}}}\n"
        "    max_new_tokens: 64\n"
        "    repetition_penalty: 1.15\n"
        "    fields: {question: instruction, reference: output}\n",
        encoding="utf-8",
    )
    (spec,) = resolve_benchmarks([str(yaml_path)])
    assert spec.max_new_tokens == 64 and spec.repetition_penalty == 1.15
    (item,) = load_items(spec, "ko")
    assert item["question"] == "Say hi" and item["reference"] == "Hi"
    yaml_path.write_text("benchmarks:\n  - name: x\n    kind: chat\n    data: {ko: a.jsonl}\n    colour: red\n")
    with pytest.raises(ConfigError, match="line 5: benchmarks.0.colour: unknown key"):
        resolve_benchmarks([str(yaml_path)])


def test_parquet_source(tmp_path):
    table = pa.table(
        {"id": ["q1", "q2"], "question": ["Q1", "Q2"], "choices": [["a", "b"], ["c", "d"]], "answer": [0, 1]}
    )
    pq.write_table(table, tmp_path / "c.parquet")
    (spec,) = parse_benchmark(f"pq={tmp_path / 'c.parquet'}:choice:en")
    assert [i["id"] for i in load_items(spec, "en")] == ["q1", "q2"]


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok"}, {"reference": "no question"}, {"question": 3}])
    spec = BenchmarkSpec(name="bad", kind="chat", data={"en": path})
    with pytest.raises(BenchmarkDataError) as err:
        load_items(spec, "en")
    msg = str(err.value)
    assert f"{path}, line 2: missing field 'question'" in msg
    assert f"{path}, line 3: field 'question' must be a string, got int" in msg
    assert "line 1" not in msg


@pytest.mark.parametrize(
    "records, kind, expected",
    [
        (['{"question": "a"}', '{"question": "b"'], "chat", "line 2: not valid JSON"),
        ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], "perplexity", "line 2: id '1' repeats the id of line 1"),
        (
            [{"question": "q", "choices": ["a", "b"], "answer": 2}],
            "choice",
            "field 'answer' (2) does not name one of the 2 choices",
        ),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "choice", "at least two non-empty strings"),
        ([{"turns": ["only one"]}], "multiturn", "at least two strings"),
        (["[1, 2]"], "perplexity", "line 1: expected a JSON object, got list"),
        ([], "safety", "no items"),
    ],
)
def test_bad_files(tmp_path, records, kind, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(BenchmarkDataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_items(BenchmarkSpec(name="bad", kind=kind, data={"en": path}), "en")


def test_choice_answer_as_letter(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer": "C"}])
    (item,) = load_items(BenchmarkSpec(name="c", kind="choice", data={"en": path}), "en")
    assert item["answer"] == "C"


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_items(BenchmarkSpec(name="x", kind="chat", data={"en": str(tmp_path / "none.jsonl")}), "en")
    (tmp_path / "x.csv").write_text("question\nwhy\n")
    with pytest.raises(InputError, match="use a .jsonl, .json or .parquet file"):
        load_items(BenchmarkSpec(name="x", kind="chat", data={"en": str(tmp_path / "x.csv")}), "en")


def test_data_on_s3(s3_bucket):
    from chatvec.core.storage import Store

    uri = f"{s3_bucket}/bench/q.jsonl"
    Store(s3_bucket).write_text("bench/q.jsonl", json.dumps({"question": "Why?"}) + "\n")
    (spec,) = parse_benchmark(f"remote={uri}:chat:en")
    assert load_items(spec, "en")[0]["question"] == "Why?"


def test_hugging_face_dataset_source(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"instruction": "Say hi"}, {"instruction": "Say bye"}])
    spec = BenchmarkSpec(
        name="hfds", kind="chat", data={"en": f"dataset:{folder}@test"}, fields={"question": "instruction"}
    )
    assert [i["question"] for i in load_items(spec, "en")] == ["Say hi", "Say bye"]
    with pytest.raises(InputError, match="cannot load dataset"):
        load_items(BenchmarkSpec(name="x", kind="chat", data={"en": f"dataset:{tmp_path / 'none'}"}), "en")
