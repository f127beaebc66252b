"""The runs dataset and the regression rule, on real Parquet files (local folder and S3)."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from chatvec.core.errors import ChatvecError
from chatvec.eval import history
from chatvec.eval.schema import summary_table

ROOT = Path(__file__).resolve().parents[1]


def table(run_id: str, rows: list[tuple]) -> pa.Table:
    """rows: (model, language, benchmark, metric, value, stderr, n)."""
    return summary_table(
        [
            dict(
                run_id=run_id,
                model=m,
                language=lang,
                benchmark=b,
                kind="chat",
                metric=met,
                value=v,
                stderr=se,
                n=n,
                n_unscored=0,
                schema_version=1,
                created_at=dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc),
            )
            for m, lang, b, met, v, se, n in rows
        ]
    )


def by_key(changes):
    return {(c.model, c.metric): c for c in changes}


def test_regression_rule_uses_both_stderrs_and_direction():
    a = table(
        "a",
        [
            ("m", "ko", "chat", "judge_score", 6.0, 0.3, 80),
            ("m", "ko", "chat", "in_language", 0.9, 0.03, 80),
            ("m", "ko", "ppl", "perplexity", 10.0, 0.1, 50),
            ("m", "ko", "safety", "unsafe_rate", 0.10, 0.02, 100),
            ("m", "ko", "choice", "accuracy", 0.50, None, 1),
            ("old", "ko", "chat", "judge_score", 5.0, 0.1, 10),
        ],
    )
    b = table(
        "b",
        [
            ("m", "ko", "chat", "judge_score", 4.9, 0.4, 80),  # -1.1 > 2 * 0.5: regression
            ("m", "ko", "chat", "in_language", 0.85, 0.03, 80),  # -0.05 < 2 * 0.042: noise
            ("m", "ko", "ppl", "perplexity", 10.5, 0.1, 50),  # up is worse for perplexity
            ("m", "ko", "safety", "unsafe_rate", 0.02, 0.02, 100),  # down is better for unsafe rate
            ("m", "ko", "choice", "accuracy", 0.49, None, 1),  # no stderr: any drop counts
            ("new", "ko", "chat", "judge_score", 5.0, 0.1, 10),
        ],
    )
    ch = by_key(history.compare(a, b, k=2.0))
    js = ch[("m", "judge_score")]
    assert js.regression and math.isclose(js.delta, -1.1) and math.isclose(js.threshold, 2 * 0.5)
    assert not ch[("m", "in_language")].regression and not ch[("m", "in_language")].improvement
    assert ch[("m", "perplexity")].regression and ch[("m", "perplexity")].lower_is_better
    assert ch[("m", "unsafe_rate")].improvement and not ch[("m", "unsafe_rate")].regression
    assert ch[("m", "accuracy")].regression
    assert ch[("old", "judge_score")].status == "gone" and not ch[("old", "judge_score")].regression
    assert ch[("new", "judge_score")].status == "new"
    # a looser threshold forgives the judge-score drop; min_delta forgives the tiny accuracy drop
    loose = by_key(history.compare(a, b, k=2.5, min_delta=0.05))
    assert not loose[("m", "judge_score")].regression and not loose[("m", "accuracy")].regression
    with pytest.raises(ChatvecError):
        history.compare(a, b, k=-1)


def test_metric_direction():
    for m in ("perplexity", "unsafe_rate", "toxicity", "bits_per_byte"):
        assert history.lower_is_better(m), m
    for m in ("judge_score", "accuracy", "acc_norm", "in_language", "refusal_rate"):
        assert not history.lower_is_better(m), m


def test_run_ids_are_checked():
    for bad in ("", "../x", "a b", "run=1", "/abs"):
        with pytest.raises(ChatvecError):
            history.run_uri("/r", bad)
    assert history.run_uri("/r", "2024-06-01").endswith("results/run=2024-06-01")


def _store_runs(root: str) -> None:
    for i, (rid, sweep, value) in enumerate(
        [("2024-06-01", "s", 6.0), ("2024-06-02", "s", 6.1), ("other-1", "t", 1.0), ("2024-06-03", "s", 4.0)]
    ):
        history.write_run_summary(root, rid, table(rid, [("m", "ko", "chat", "judge_score", value, 0.1, 8)]))
        history.write_run_info(
            root,
            rid,
            {
                "sweep": sweep,
                "kind": "nightly",
                "status": "finished",
                "started_at": f"2024-06-0{i + 1}T00:00:00+00:00",
                "models": [{"name": "m"}],
            },
        )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_dataset(where, tmp_path, request):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_bucket") + "/chatvec"
    assert history.list_runs(root) == []
    _store_runs(root)
    runs = history.list_runs(root)
    assert [r.run_id for r in runs] == ["2024-06-01", "2024-06-02", "other-1", "2024-06-03"]
    assert runs[0].has_summary and runs[0].rows == 1 and runs[0].models == 1 and runs[0].sweep == "s"
    # the previous run of the same sweep, skipping other sweeps' runs
    assert history.previous_run(root, "2024-06-03", sweep="s") == "2024-06-02"
    assert history.previous_run(root, "2024-06-03") == "other-1"
    assert history.previous_run(root, "2024-06-01", sweep="s") is None
    # a run not stored yet (tonight's) compares with the latest before it by id
    assert history.previous_run(root, "2024-06-04", sweep="s") == "2024-06-03"
    all_runs = history.load_summaries(root)
    assert sorted(set(all_runs.column("run").to_pylist())) == ["2024-06-01", "2024-06-02", "2024-06-03", "other-1"]
    two = history.load_summaries(root, ["2024-06-01", "2024-06-03"])
    assert sorted(zip(two.column("run").to_pylist(), two.column("value").to_pylist())) == [
        ("2024-06-01", 6.0),
        ("2024-06-03", 4.0),
    ]
    with pytest.raises(history.RunNotFoundError, match="2024-06-01"):
        history.load_summary(root, "nope")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatvec.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_results_cli(tmp_path):
    root = str(tmp_path / "store")
    empty = _cli("results", "--root", root)
    assert empty.returncode == 0 and "no runs under" in empty.stdout
    _store_runs(root)
    listing = _cli("results", "--root", root)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "sweep", "kind", "status"]
    assert [ln.split()[0] for ln in lines[2:]] == ["2024-06-01", "2024-06-02", "other-1", "2024-06-03"]
    one = _cli("results", "2024-06-02", "--root", root)
    assert one.returncode == 0 and "judge_score" in one.stdout and "6.1" in one.stdout
    cmp = _cli("results", "--compare", "2024-06-02", "2024-06-03", "--root", root)
    assert cmp.returncode == 0, cmp.stderr
    assert "REGRESSION" in cmp.stdout and "1 regression(s)" in cmp.stdout
    missing = _cli("results", "nope", "--root", root)
    assert (
        missing.returncode == 2 and "no summary for run 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    )
