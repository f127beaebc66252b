"""`chatvec report` as a user runs it: a real `chatvec eval` on tiny models, then its report; a
nightly run's report written again from the store; unknown runs and runs without a summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def chatvec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chatvec.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def images_of(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store root holding one plain `chatvec eval` run, ``evalrun``, of two tiny models."""
    pytest.importorskip("torch")
    from chatvec.demo.tiny import build_model_dir

    work = tmp_path_factory.mktemp("report")
    one = build_model_dir(work / "models" / "one", seed=7, shard_size=None)
    two = build_model_dir(work / "models" / "two", seed=8, shard_size=None)
    root = work / "store"
    res = chatvec(
        "eval",
        "--model",
        f"one={one}",
        "--model",
        f"two={two}",
        "--benchmark",
        "chat",
        "--benchmark",
        "choice",
        "--language",
        "ko",
        "--engine",
        "hf",
        "--workers",
        "0",
        "--max-new-tokens",
        "4",
        "--limit",
        "3",
        "--run-id",
        "evalrun",
        "--quiet",
        "--out",
        str(root / "results" / "run=evalrun"),
        cwd=work,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return root


def check_report(folder: Path) -> str:
    """The report in ``folder`` is whole: every plot it shows and every answer page it links exist."""
    page = (folder / "index.html").read_text(encoding="utf-8")
    shown = images_of(page)
    assert shown and all((folder / name).is_file() for name in shown)
    assert {p.name for p in folder.glob("*.png")} == set(shown)
    linked = re.findall(r'href="(answers/[^"]+\.html)"', page)
    assert "answers/chat--ko.html" in linked and all((folder / rel).is_file() for rel in linked)
    answers = (folder / "answers" / "chat--ko.html").read_text(encoding="utf-8")
    assert "one" in answers and "two" in answers
    for section in ("Language fidelity", "Paired comparisons", "Answers", "Metrics", "Summary table"):
        assert section in page
    return page


def test_report_of_an_eval_run_under_a_store_root(store, tmp_path):
    res = chatvec("report", "evalrun", "--root", str(store), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = store / "reports" / "evalrun"
    assert f"report:  {folder / 'index.html'}" in res.stdout
    assert "answers: 2 page(s)" in res.stdout  # chat and choice, in ko
    page = check_report(folder)
    assert "chatvec report: run evalrun" in page and "<h3>acc</h3>" in page and "<h3>judge_score</h3>" in page


def test_report_of_an_eval_output_folder(store, tmp_path):
    out = store / "results" / "run=evalrun"
    # the default place: report/ inside the eval's own output
    res = chatvec("report", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "run evalrun" in res.stdout
    check_report(out / "report")
    # anywhere else with --report-dir; RUN may be given, and must be the run that is there
    res = chatvec("report", "evalrun", "--out", str(out), "--report-dir", str(tmp_path / "elsewhere"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    check_report(tmp_path / "elsewhere")
    # a RUN that is not the one in the folder
    res = chatvec("report", "other", "--out", str(out), "--report-dir", str(tmp_path / "never"), cwd=tmp_path)
    assert res.returncode == 2 and "holds run 'evalrun', not 'other'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "never").exists()


def test_unknown_runs_and_runs_without_a_summary_are_clear_errors(store, tmp_path):
    res = chatvec("report", "nope", "--root", str(store), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no run 'nope'" in res.stderr and "evalrun" in res.stderr and "Traceback" not in res.stderr
    assert not (store / "reports" / "nope").exists()

    # a run that stopped before its end: its cells are there, its summary is not
    copy = tmp_path / "store"
    shutil.copytree(store / "results" / "run=evalrun", copy / "results" / "run=cut")
    (copy / "results" / "run=cut" / "summary.parquet").unlink()
    shutil.rmtree(copy / "results" / "run=cut" / "report", ignore_errors=True)
    res = chatvec("report", "cut", "--root", str(copy), cwd=tmp_path)
    assert res.returncode == 2 and "has no summary yet" in res.stderr and "Traceback" not in res.stderr
    res = chatvec("report", "--out", str(copy / "results" / "run=cut"), cwd=tmp_path)
    assert res.returncode == 2 and "has no summary yet" in res.stderr and "Traceback" not in res.stderr
    assert not (copy / "reports").exists() and not (copy / "results" / "run=cut" / "report").exists()

    # a folder no eval wrote
    (tmp_path / "empty").mkdir()
    res = chatvec("report", "--out", str(tmp_path / "empty"), cwd=tmp_path)
    assert res.returncode == 2 and "holds no chatvec eval run" in res.stderr
    assert files_under(tmp_path / "empty") == set()

    # usage: a run id or an output, and not both places at once
    res = chatvec("report", cwd=tmp_path)
    assert res.returncode == 2 and "give RUN" in res.stderr
    res = chatvec("report", "evalrun", "--root", str(store), "--out", str(tmp_path / "empty"), cwd=tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr


SWEEP = """\
name: nightly
vectors:
  v: {{base: {models}/base, chat: {models}/chat}}
targets:
  - {{language: zh-Hant, cp: {models}/cp, benchmarks: [chat]}}
ratios: [1.0]
embeddings: skip
baselines: {{cp: true, chat: true}}
engine: hf
device: cpu
root: {root}
shard_size: 100KB
eval: {{limit: 2, max_new_tokens: 4, batch_size: 2}}
"""


def test_a_nightly_report_written_again_is_the_one_the_run_wrote(tmp_path):
    pytest.importorskip("torch")
    from chatvec.core.config import ChatvecConfig
    from chatvec.demo.tiny import CHAT_TEMPLATE_CHAT, build_model_dir
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    models = tmp_path / "models"
    build_model_dir(models / "base", "llama", seed=0, shard_size=None)
    build_model_dir(
        models / "chat", "llama", seed=1, init_from=models / "base", noise=0.02, chat_template=CHAT_TEMPLATE_CHAT
    )
    build_model_dir(models / "cp", "llama", seed=2, init_from=models / "base", noise=0.02)
    root = tmp_path / "store"
    sweep_file = tmp_path / "nightly.yaml"
    sweep_file.write_text(SWEEP.format(models=models.as_posix(), root=root.as_posix()))
    sweep = load_sweep(str(sweep_file))
    config = ChatvecConfig()
    config.merge.workers = config.eval.workers = 0
    for night in ("2024-06-01", "2024-06-02"):
        run_sweep(sweep, run_id=night, config=config, nightly=True, notes=("a note",), echo=lambda s: None)

    res = chatvec("report", "2024-06-02", "--root", str(root), "--report-dir", str(tmp_path / "again"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    written = root / "reports" / "2024-06-02"
    again = tmp_path / "again"
    assert files_under(again) == files_under(written)
    page = (again / "index.html").read_text(encoding="utf-8")
    # the sweep's layout, the nightly comparison and trend, the notes: all read back from the store
    assert page == (written / "index.html").read_text(encoding="utf-8")
    assert "nightly: run 2024-06-02" in page and "Regressions" in page and "a note" in page
    assert re.findall(r'src="(trend-[^"]+)"', page) and "CP + 1 CV" in page
    for rel in files_under(written):
        if rel.endswith(".html"):
            assert (again / rel).read_bytes() == (written / rel).read_bytes(), rel
