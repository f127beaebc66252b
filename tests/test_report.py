"""The report: a page whose every plot exists beside it, from a synthetic summary table."""

from __future__ import annotations

import datetime as dt
import random
import re

import pyarrow as pa
import pytest

from chatvec.core.storage import Store
from chatvec.eval.history import compare
from chatvec.eval.report import ModelInfo, write_report
from chatvec.eval.schema import summary_table

BENCHES = {  # benchmark -> (kind, metrics)
    "chat": ("chat", ["judge_score", "in_language"]),
    "safety": ("safety", ["unsafe_rate", "refusal_rate", "in_language"]),
    "choice": ("choice", ["accuracy"]),
}
METRICS = sorted({m for _, ms in BENCHES.values() for m in ms})


def sweep_models() -> list[ModelInfo]:
    models = []
    for target, lang in (("zh-Hant", "zh-Hant"), ("ko", "ko"), ("breeze", "zh-Hant")):
        models.append(ModelInfo(name=f"cp.{target}", role="cp", target=target, language=lang, uri=f"/m/cp-{target}"))
        for ratio in (0.5, 1.0):
            models.append(
                ModelInfo(
                    name=f"v.{target}.add.r{ratio:g}",
                    role="merged",
                    target=target,
                    language=lang,
                    vector="v",
                    ratio=ratio,
                    method="add",
                    embeddings="skip",
                )
            )
    models.append(ModelInfo(name="chat.v", role="chat", vector="v"))
    models.append(ModelInfo(name="zh-instruct", role="extra", target="zh-Hant", language="zh-Hant"))
    return models


def synthetic(run_id: str, models: list[ModelInfo], seed: int = 0, drop: dict | None = None) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    for m in models:
        for lang in [m.language] if m.language else ["zh-Hant", "ko"]:
            for bench, (kind, metrics) in BENCHES.items():
                for metric in metrics:
                    value = rng.uniform(0, 10) if metric == "judge_score" else rng.random()
                    value -= (drop or {}).get((m.name, lang, bench, metric), 0.0)
                    rows.append(
                        dict(
                            run_id=run_id,
                            model=m.name,
                            language=lang,
                            benchmark=bench,
                            kind=kind,
                            metric=metric,
                            value=value,
                            stderr=0.05,
                            n=8,
                            n_unscored=0,
                            schema_version=1,
                            created_at=dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc),
                        )
                    )
    return summary_table(rows)


def images_of(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def test_sweep_report_holds_every_plot(tmp_path):
    models = sweep_models()
    summary = synthetic("r1", models)
    uri = write_report(
        str(tmp_path / "rep"),
        run_id="r1",
        summary=summary,
        models=models,
        title="t",
        notes=["tiny models"],
        failed_cells=["m/ko/chat: boom"],
    )
    page = (tmp_path / "rep" / "index.html").read_text()
    assert uri.endswith("index.html")
    imgs = images_of(page)
    for metric in METRICS:
        assert any(i.startswith("heatmap-") and i.endswith(f"-{metric}.png") for i in imgs), metric
        assert any(i.startswith("ratio-") and i.endswith(f"-{metric}.png") for i in imgs), metric
    assert not any(i.startswith("trend-") for i in imgs)  # a plain sweep has no trend
    on_disk = {p.name for p in (tmp_path / "rep").iterdir()}
    assert set(imgs) <= on_disk
    assert on_disk - set(imgs) == {"index.html"}
    for name in imgs:
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the language-fidelity table (the paper's Table 7): one row per model label, one column per target
    fid = page.split("<h2>Language fidelity</h2>")[1].split("<h2>")[0]
    for label in ("CP", "chat", "CP + 0.5 CV", "CP + 1 CV", "zh-instruct"):
        assert f"<td>{label}</td>" in fid
    assert "breeze (zh-Hant)" in fid and "% (n=" in fid
    assert "tiny models" in page and "m/ko/chat: boom" in page
    assert "Regressions" not in page


def test_nightly_report_has_trend_and_regression_table(tmp_path):
    models = sweep_models()
    a = synthetic("n1", models, seed=1)
    b = synthetic("n2", models, seed=1, drop={("v.ko.add.r0.5", "ko", "chat", "judge_score"): 3.0})
    changes = compare(a, b, k=2.0)
    history = pa.concat_tables(
        [
            a.append_column("run", pa.array(["n1"] * a.num_rows)),
            b.append_column("run", pa.array(["n2"] * b.num_rows)),
        ]
    )
    write_report(
        str(tmp_path / "rep"),
        run_id="n2",
        summary=b,
        models=models,
        history=history,
        history_runs=["n1", "n2"],
        changes=changes,
        previous_run="n1",
    )
    page = (tmp_path / "rep" / "index.html").read_text()
    imgs = images_of(page)
    for metric in METRICS:
        assert any(i.startswith("trend-") and i.endswith(f"-{metric}.png") for i in imgs), metric
        assert (
            tmp_path / "rep" / next(i for i in imgs if i.startswith("trend-") and i.endswith(f"-{metric}.png"))
        ).stat().st_size > 0
    regs = page.split("<h2>Regressions</h2>")[1].split("<details>")[0]
    assert "1 regression(s)" in regs
    assert "<td>v.ko.add.r0.5</td><td>ko</td><td>chat</td><td>judge_score</td>" in regs


def test_first_nightly_run_says_it_is_the_baseline(tmp_path):
    models = sweep_models()[:3]
    write_report(
        str(tmp_path), run_id="n1", summary=synthetic("n1", models), models=models, changes=[], previous_run=None
    )
    assert "this run is the baseline" in (tmp_path / "index.html").read_text()


def test_report_without_sweep_layout_and_empty(tmp_path):
    # models the caller does not describe (plain `chatvec eval` results) still get a column
    summary = synthetic(
        "e1", [ModelInfo(name="a", role="extra", language="en"), ModelInfo(name="b", role="extra", language="ja")]
    )
    write_report(str(tmp_path / "x"), run_id="e1", summary=summary)
    page = (tmp_path / "x" / "index.html").read_text()
    assert len([i for i in images_of(page) if i.startswith("heatmap-")]) == len(METRICS)
    assert not any(i.startswith("ratio-") for i in images_of(page))
    write_report(str(tmp_path / "y"), run_id="e2", summary=summary.slice(0, 0))
    assert "No results." in (tmp_path / "y" / "index.html").read_text()


@pytest.mark.slow
def test_report_on_s3(s3_bucket):
    models = sweep_models()[:3]
    uri = write_report(f"{s3_bucket}/reports/r1", run_id="r1", summary=synthetic("r1", models), models=models)
    store = Store(f"{s3_bucket}/reports/r1")
    page = store.read_text("index.html")
    assert uri == f"{s3_bucket}/reports/r1/index.html"
    for name in images_of(page):
        assert store.read_bytes(name)[:4] == b"\x89PNG"
