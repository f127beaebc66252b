"""A sweep end to end on tiny models: merges on Ray actors into S3, evaluation, report; reuse of
committed merges; nightly twice with a regression injected into the second run's results."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatvec.core.storage import Store
from chatvec.eval import history

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SWEEP = """\
name: {name}
vectors:
  v: {{base: {models}/base, chat: {models}/chat}}
targets:
  - {{language: zh-Hant, cp: {models}/cp, benchmarks: [chat]}}
ratios: [1.0]
embeddings: skip
baselines: {{cp: true, chat: false}}
engine: hf
device: cpu
root: {root}
shard_size: 100KB
eval: {{limit: 2, max_new_tokens: 6, batch_size: 2}}
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A base, a chat and a zh-Hant CP model with two extra words (so `skip` matters)."""
    from chatvec.demo.tiny import CHAT_TEMPLATE_CHAT, build_model_dir

    root = tmp_path_factory.mktemp("tiny")
    build_model_dir(root / "base", "llama", seed=0, shard_size="50KB")
    build_model_dir(
        root / "chat",
        "llama",
        seed=1,
        init_from=root / "base",
        noise=0.02,
        shard_size="50KB",
        chat_template=CHAT_TEMPLATE_CHAT,
    )
    build_model_dir(
        root / "cp",
        "llama",
        seed=2,
        init_from=root / "base",
        noise=0.02,
        shard_size="50KB",
        extra_tokens=["臺灣", "資訊"],
    )
    return root


def write_sweep(path: Path, *, models: Path, root: str, name: str = "e2e") -> Path:
    path.write_text(SWEEP.format(name=name, models=models.as_posix(), root=root))
    return path


def config(workers: int):
    from chatvec.core.config import ChatvecConfig

    cfg = ChatvecConfig()
    cfg.merge.workers = workers
    cfg.eval.workers = workers
    return cfg


def test_sweep_on_ray_and_s3_then_reuse(tiny_models, tmp_path, ray_cluster, s3_bucket):
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    root = f"{s3_bucket}/chatvec"
    sweep = load_sweep(str(write_sweep(tmp_path / "sweep.yaml", models=tiny_models, root=root)))
    lines: list[str] = []
    first = run_sweep(sweep, run_id="first", config=config(2), echo=lines.append)
    assert first.exit_status == 0, first.failed_cells
    assert first.merged == ["v.zh-Hant.add.r1.emb-skip"] and first.reused == []

    store = Store(root)
    files = store.list("models")
    merged_dir = files[0].split("/")[1]
    assert merged_dir.startswith("v.zh-Hant.add.r1.emb-skip-")
    assert f"models/{merged_dir}/model.safetensors.index.json" in files

    summary = history.load_summary(root, "first")
    assert set(summary.column("model").to_pylist()) == {"v.zh-Hant.add.r1.emb-skip", "cp.zh-Hant"}
    assert set(summary.column("language").to_pylist()) == {"zh-Hant"}
    assert "in_language" in summary.column("metric").to_pylist()
    assert store.list("results/run=first/samples")  # one file per cell
    info = history.read_run_info(root, "first")
    assert info["status"] == "finished" and info["sweep"] == "e2e"
    assert {m["role"] for m in info["models"]} == {"merged", "cp"}

    page = store.read_text("reports/first/index.html")
    imgs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert any(i.startswith("heatmap-") for i in imgs) and any(i.startswith("ratio-") for i in imgs)
    for name in imgs:
        assert store.read_bytes(f"reports/first/{name}")[:4] == b"\x89PNG"
    assert first.report_uri == f"{root}/reports/first/index.html"

    # same sweep, new run: the committed merge is reused, not redone
    lines.clear()
    second = run_sweep(sweep, run_id="second", config=config(2), echo=lines.append)
    assert second.reused == ["v.zh-Hant.add.r1.emb-skip"] and second.merged == []
    assert any(ln.startswith("  reusing v.zh-Hant.add.r1.emb-skip: already committed at") for ln in lines)
    assert store.list("models") == files
    assert [r.run_id for r in history.list_runs(root)] == ["first", "second"]


def _inject_drop(root: str, run_id: str, model: str, metric: str, new_score: float) -> None:
    """Overwrite one metric's scores in a run's samples files, as a worse model would have scored."""
    store = Store(history.run_uri(root, run_id))
    hit = False
    for rel in store.list("samples"):
        if f"model={model}/" not in rel:
            continue
        table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        scores = [
            new_score if m == metric else s
            for m, s in zip(table.column("metric").to_pylist(), table.column("score").to_pylist())
        ]
        hit = hit or metric in table.column("metric").to_pylist()
        table = table.set_column(
            table.schema.get_field_index("score"), table.schema.field("score"), pa.array(scores, pa.float64())
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(rel, buf.getvalue())
    assert hit, f"no {metric} rows for {model} in run {run_id}"


def _nightly(sweep_file: Path, run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "nightly", str(sweep_file), "--run-id", run_id, "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_nightly_twice_detects_an_injected_regression(tiny_models, tmp_path):
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import EXIT_REGRESSION, run_sweep

    root = str(tmp_path / "store")
    sweep_file = write_sweep(tmp_path / "nightly.yaml", models=tiny_models, root=root, name="nightly")
    sweep = load_sweep(str(sweep_file))
    one = run_sweep(sweep, run_id="2024-06-01", config=config(0), nightly=True, echo=lambda s: None)
    assert one.exit_status == 0 and one.previous_run is None and one.changes == []
    two = run_sweep(sweep, run_id="2024-06-02", config=config(0), nightly=True, echo=lambda s: None)
    assert two.previous_run == "2024-06-01"
    assert two.regressions == [], [c for c in two.regressions]  # greedy decoding: the same answers
    assert two.exit_status == 0

    # the second night's results get worse: every in_language score of the merged model drops from
    # 1 to 0 (set by hand: the tiny models' few-token answers are too short to tell their language)
    from chatvec.eval.results import summarize

    merged = "v.zh-Hant.add.r1.emb-skip"
    _inject_drop(root, "2024-06-01", merged, "in_language", 1.0)
    history.write_run_summary(root, "2024-06-01", summarize(history.run_uri(root, "2024-06-01"), "2024-06-01"))
    before = {(r["model"], r["metric"]): r["value"] for r in history.load_summary(root, "2024-06-01").to_pylist()}
    assert before[(merged, "in_language")] == 1.0
    _inject_drop(root, "2024-06-02", merged, "in_language", 0.0)

    # rerunning the night finishes what is missing (nothing), rebuilds the summary, compares
    proc = _nightly(sweep_file, "2024-06-02")
    assert proc.returncode == EXIT_REGRESSION == 3, proc.stdout + proc.stderr
    assert "reusing v.zh-Hant.add.r1.emb-skip" in proc.stdout
    assert "1 regression(s) against run 2024-06-01" in proc.stderr
    assert re.search(rf"{re.escape(merged)}\s+zh-Hant\s+chat\s+in_language\s.*REGRESSION", proc.stderr)
    info = json.loads(Store(history.run_uri(root, "2024-06-02")).read_text("sweep.json"))
    assert info["regressions"] == 1 and info["previous_run"] == "2024-06-01"
    page = Store(root).read_text("reports/2024-06-02/index.html")
    assert "1 regression(s)" in page
    assert re.findall(r'src="(trend-[^"]+)"', page)  # the trend over the two nights

    # the stored summaries say the same to `chatvec results --compare`
    cmp = subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "results", "--compare", "2024-06-01", "2024-06-02", "--root", root],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cmp.returncode == 0 and "REGRESSION" in cmp.stdout


def test_bad_inputs_stop_the_sweep_before_anything_is_written(tiny_models, tmp_path):
    """Every merge is planned first: all problems of all merges in one error, nothing written."""
    root = tmp_path / "store"
    text = SWEEP.format(name="bad", models=tiny_models.as_posix(), root=root.as_posix())
    text = text.replace("embeddings: skip", "embeddings: all")  # the CP model has two more rows
    text = text.replace(
        "ratios:", f"  - {{language: ko, cp: {tmp_path.as_posix()}/nope, benchmarks: [chat, nosuch]}}\nratios:"
    )
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "sweep", str(sweep_file), "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    assert "unknown benchmark 'nosuch'" in err  # the ko target's benchmark
    assert "v.ko.add.r1:" in err and "nope" in err  # the ko target's missing CP model
    assert "v.zh-Hant.add.r1:" in err and "skip" in err  # shapes differ: the policies are named
    assert not root.exists()
