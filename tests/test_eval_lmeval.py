"""The lm-eval adapter on local task files (skipped without lm-evaluation-harness installed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.benchmarks import BenchmarkSpec  # noqa: E402
from chatvec.eval.contracts import RunSettings  # noqa: E402
from chatvec.eval.pipeline import run_pipeline  # noqa: E402
from chatvec.eval.runner import LocalCellExecutor  # noqa: E402

TASKS = """
task: chatvec_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
---
task: chatvec_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_tasks_run_on_our_engine(tmp_path):
    data = tmp_path / "items.jsonl"
    items = [
        {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Mercury"], "answer": 1},
        {"question": "How many days are in a leap year?", "choices": ["365", "366"], "answer": 1},
        {"question": "What do plants take in?", "choices": ["carbon dioxide", "helium"], "answer": 0},
    ]
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, doc in enumerate(TASKS.format(data=data).split("---")):
        (tasks / f"t{i}.yaml").write_text(doc)
    model = str(build_model_dir(tmp_path / "m", seed=5, shard_size=None))
    spec = BenchmarkSpec(
        name="harness",
        kind="lm-eval",
        data={"en": "chatvec_tiny_choice,chatvec_tiny_gen"},
        options={"include_path": str(tasks)},
    )
    out = str(tmp_path / "out")
    outcome = run_pipeline(
        {"m": model},
        benchmarks=[spec],
        out_uri=out,
        settings=RunSettings(device="cpu"),
        show_progress=False,
        executor=LocalCellExecutor(),
    )
    assert outcome.ok, [r.error for r in outcome.failed]
    summary = {(r["metric"]): r for r in outcome.summary.to_pylist()}
    assert summary["acc"]["n"] == 3 and summary["acc_norm"]["n"] == 3 and summary["exact_match"]["n"] == 3
    assert 0.0 <= summary["acc"]["value"] <= 1.0
