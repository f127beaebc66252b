"""In-process runs (`--workers 0`): output layout, resume, failed cells, the judge phase, S3."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.core.errors import InputError  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.contracts import DONE, FAILED, SKIPPED, RunSettings  # noqa: E402
from chatvec.eval.pipeline import run_pipeline  # noqa: E402
from chatvec.eval.results import RUN_FILE, SUMMARY_FILE, read_table  # noqa: E402
from chatvec.eval.runner import LocalCellExecutor  # noqa: E402
from chatvec.eval.schema import JUDGED, NO_JUDGE, NOT_JUDGED, SAMPLES_SCHEMA, SUMMARY_SCHEMA  # noqa: E402

SETTINGS = RunSettings(device="cpu", batch_size=4, max_new_tokens=6)
JUDGE_STATES = {JUDGED, "unparseable", "out_of_range", "ambiguous"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    return {
        name: str(build_model_dir(root / name, seed=seed, shard_size=None))
        for name, seed in (("alpha", 1), ("beta", 2), ("judge", 3))
    }


def samples(out: str) -> dict[str, list[dict]]:
    store = Store(out)
    return {rel: read_table(store, rel).to_pylist() for rel in store.list("samples")}


def test_run_writes_one_file_per_cell_and_resumes_without_duplicates(models, tmp_path):
    out = str(tmp_path / "out")
    pair = {"alpha": models["alpha"], "beta": models["beta"]}
    first = run_pipeline(
        pair,
        executor=LocalCellExecutor(),
        benchmarks=["chat", "choice", "perplexity"],
        languages=["en", "ko"],
        out_uri=out,
        run_id="r1",
        settings=SETTINGS,
        show_progress=False,
    )
    assert first.ok and first.cells == 12 and first.counts["generated"] == 12
    assert first.loads == {models["alpha"]: 1, models["beta"]: 1}
    files = samples(out)
    assert sorted(files) == sorted(
        f"samples/model={m}/language={lang}/benchmark={b}.parquet"
        for m in pair
        for lang in ("en", "ko")
        for b in ("chat", "choice", "perplexity")
    )
    chat = files["samples/model=alpha/language=ko/benchmark=chat.parquet"]
    assert {r["metric"] for r in chat} == {"judge_score", "in_language"} and len(chat) == 10
    assert all(r["run_id"] == "r1" and r["engine"] == "hf" for r in chat)
    assert all(r["judge_status"] == NO_JUDGE and r["score"] is None for r in chat if r["metric"] == "judge_score")
    # too little prose to tell is undetermined (unscored), not a failure
    assert all(
        r["judge_status"] == NOT_JUDGED and (r["score"] in (0.0, 1.0) or r["detected_language"] == "undetermined")
        for r in chat
        if r["metric"] == "in_language"
    )
    assert pq.read_schema(f"{out}/samples/model=alpha/language=ko/benchmark=chat.parquet").names == SAMPLES_SCHEMA.names
    status = json.loads(Store(out).read_text("status/model=beta/language=en/benchmark=choice.json"))
    assert status["state"] == DONE and status["rows"] == 10
    summary = read_table(Store(out), SUMMARY_FILE)
    assert summary.schema.names == SUMMARY_SCHEMA.names
    acc = [r for r in summary.to_pylist() if (r["model"], r["language"], r["metric"]) == ("alpha", "en", "acc")]
    assert len(acc) == 1 and acc[0]["n"] == 5
    # the same run again: nothing to do, nothing loaded, the same rows
    again = run_pipeline(
        pair,
        executor=LocalCellExecutor(),
        benchmarks=["chat", "choice", "perplexity"],
        languages=["en", "ko"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
    )
    assert again.run_id == "r1" and again.loads == {} and {r.state for r in again.results} == {SKIPPED}
    assert samples(out) == files
    # a lost cell is redone, alone
    Store(out).delete("samples/model=beta/language=ko/benchmark=chat.parquet")
    third = run_pipeline(
        pair,
        executor=LocalCellExecutor(),
        benchmarks=["chat", "choice", "perplexity"],
        languages=["en", "ko"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
    )
    assert third.loads == {models["beta"]: 1}
    assert [r.key for r in third.results if r.state == DONE] == ["beta/ko/chat"]
    redone = samples(out)
    assert len(redone["samples/model=beta/language=ko/benchmark=chat.parquet"]) == 10
    assert sum(map(len, redone.values())) == sum(map(len, files.values()))
    assert third.summary.num_rows == first.summary.num_rows


def test_failed_cells_are_recorded_and_the_rest_finish(models, tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "not-yet")
    run = {"alpha": models["alpha"], "ghost": missing}
    outcome = run_pipeline(
        run,
        benchmarks=["choice", "perplexity"],
        languages=["ja"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
        executor=LocalCellExecutor(),
    )
    assert not outcome.ok
    assert sorted(r.key for r in outcome.failed) == ["ghost/ja/choice", "ghost/ja/perplexity"]
    assert all("does not exist" in r.error for r in outcome.failed)
    status = json.loads(Store(out).read_text("status/model=ghost/language=ja/benchmark=choice.json"))
    assert status["state"] == FAILED and "does not exist" in status["error"]
    assert not Store(out).exists("samples/model=ghost")
    assert {r["model"] for r in outcome.summary.to_pylist()} == {"alpha"}
    # the model appears: only its cells run
    shutil.copytree(models["beta"], missing)
    retry = run_pipeline(
        run,
        benchmarks=["choice", "perplexity"],
        languages=["ja"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
        executor=LocalCellExecutor(),
    )
    assert retry.ok and retry.loads == {missing: 1}
    assert sorted(r.key for r in retry.results if r.state == DONE) == ["ghost/ja/choice", "ghost/ja/perplexity"]
    assert json.loads(Store(out).read_text("status/model=ghost/language=ja/benchmark=choice.json"))["state"] == DONE


def test_judge_phase_loads_the_judge_once_and_records_every_judgment(models, tmp_path):
    out = str(tmp_path / "out")
    outcome = run_pipeline(
        {"alpha": models["alpha"], "beta": models["beta"]},
        executor=LocalCellExecutor(),
        benchmarks=["chat", "safety", "multiturn"],
        languages=["zh-Hant", "ja"],
        judge=models["judge"],
        out_uri=out,
        settings=RunSettings(device="cpu", max_new_tokens=5, judge_max_new_tokens=6),
        show_progress=False,
    )
    assert outcome.ok
    assert outcome.loads == {models["alpha"]: 1, models["beta"]: 1, models["judge"]: 1}
    assert outcome.counts["judged"] == 12
    rows = [r for rs in samples(out).values() for r in rs]
    judged = [r for r in rows if r["metric"] in ("judge_score", "unsafe")]
    assert judged and all(r["judge_status"] in JUDGE_STATES for r in judged)
    assert all(r["judge_model"] == models["judge"] and r["judge_raw"] is not None for r in judged)
    # a score exactly when the judgment was readable: never guessed
    assert all((r["score"] is not None) == (r["judge_status"] == JUDGED) for r in judged)
    others = [r for r in rows if r["metric"] in ("in_language", "refusal")]
    assert others and all(r["judge_status"] == NOT_JUDGED and r["judge_raw"] is None for r in others)
    summary = {(r["model"], r["language"], r["benchmark"], r["metric"]): r for r in outcome.summary.to_pylist()}
    s = summary[("alpha", "ja", "chat", "judge_score")]
    assert s["n"] + s["n_unscored"] == 5


def test_a_judge_given_later_scores_what_was_left_unjudged(models, tmp_path):
    out = str(tmp_path / "out")
    run = {"beta": models["beta"]}
    plain = run_pipeline(
        run,
        benchmarks=["safety"],
        languages=["ko"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
        executor=LocalCellExecutor(),
    )
    unsafe = [r for rs in samples(out).values() for r in rs if r["metric"] == "unsafe"]
    assert plain.ok and {r["judge_status"] for r in unsafe} == {NO_JUDGE}
    responses = {r["item_id"]: r["response"] for r in unsafe}
    later = run_pipeline(
        run,
        executor=LocalCellExecutor(),
        benchmarks=["safety"],
        languages=["ko"],
        judge=models["judge"],
        out_uri=out,
        settings=SETTINGS,
        show_progress=False,
    )
    assert later.loads == {models["judge"]: 1}  # no generation again
    unsafe = [r for rs in samples(out).values() for r in rs if r["metric"] == "unsafe"]
    assert {r["item_id"]: r["response"] for r in unsafe} == responses
    assert all(r["judge_status"] in JUDGE_STATES for r in unsafe)


def test_an_output_belongs_to_one_run(models, tmp_path):
    out = str(tmp_path / "out")
    run_pipeline(
        {"alpha": models["alpha"]},
        executor=LocalCellExecutor(),
        benchmarks=["perplexity"],
        languages=["en"],
        out_uri=out,
        run_id="a",
        settings=SETTINGS,
        show_progress=False,
    )
    assert json.loads(Store(out).read_text(RUN_FILE))["run_id"] == "a"
    with pytest.raises(InputError, match="holds run 'a'"):
        run_pipeline(
            {"alpha": models["alpha"]},
            executor=LocalCellExecutor(),
            benchmarks=["perplexity"],
            languages=["en"],
            out_uri=out,
            run_id="b",
            settings=SETTINGS,
            show_progress=False,
        )


def test_model_and_results_on_s3(models, s3_server, s3_bucket, tmp_path):
    model_uri = s3_server.upload_dir(models["alpha"], f"{s3_bucket}/models/alpha")
    out = f"{s3_bucket}/results/run=s3"
    settings = RunSettings(device="cpu", max_new_tokens=4, cache_dir=str(tmp_path / "cache"))
    outcome = run_pipeline(
        {"alpha": model_uri},
        executor=LocalCellExecutor(),
        benchmarks=["chat", "choice"],
        languages=["en"],
        out_uri=out,
        run_id="s3",
        settings=settings,
        show_progress=False,
    )
    assert outcome.ok and outcome.loads == {model_uri: 1}
    store = Store(out)
    assert store.list("samples") == [
        "samples/model=alpha/language=en/benchmark=chat.parquet",
        "samples/model=alpha/language=en/benchmark=choice.parquet",
    ]
    assert store.is_file(SUMMARY_FILE) and store.is_file(RUN_FILE)
    # the same checkpoint read locally gives the same answers
    local = run_pipeline(
        {"alpha": models["alpha"]},
        executor=LocalCellExecutor(),
        benchmarks=["chat", "choice"],
        languages=["en"],
        out_uri=str(tmp_path / "local"),
        settings=settings,
        show_progress=False,
    )
    assert local.ok
    remote_rows = read_table(store, "samples/model=alpha/language=en/benchmark=chat.parquet").column("response")
    local_rows = read_table(Store(str(tmp_path / "local")), "samples/model=alpha/language=en/benchmark=chat.parquet")
    assert remote_rows.to_pylist() == local_rows.column("response").to_pylist()


def test_a_benchmark_file_that_breaks_mid_run_fails_only_its_cell(models, tmp_path):
    from chatvec.eval.contracts import RunContext
    from chatvec.eval.pipeline import plan_run
    from chatvec.eval.runner import ModelEvaluator

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    for path in (good, bad):
        path.write_text(json.dumps({"question": "Why?"}) + "\n" + json.dumps({"question": "How?"}) + "\n")
    out = str(tmp_path / "out")
    run_id, cells, _items = plan_run(
        {"alpha": models["alpha"]},
        benchmarks=[f"bad={bad}:chat:en", f"good={good}:chat:en"],
        languages=None,
        store=Store(out),
        run_id=None,
    )
    bad.write_text(json.dumps({"question": "Why?"}) + "\n" + "{truncated\n")  # changed after the check
    run = RunContext(out_uri=out, run_id=run_id, settings=SETTINGS, languages=("en",), judged=False)
    ev = ModelEvaluator("alpha", models["alpha"], run=run)
    try:
        results = {r.benchmark: r for r in ev.run_all(cells)}
    finally:
        ev.close()
    assert results["good"].state == DONE and results["bad"].state == FAILED
    assert "line 2: not valid JSON" in results["bad"].error
    status = json.loads(Store(out).read_text("status/model=alpha/language=en/benchmark=bad.json"))
    assert status["state"] == FAILED and "BenchmarkDataError" in status["error"]
    assert Store(out).list("samples") == ["samples/model=alpha/language=en/benchmark=good.parquet"]
