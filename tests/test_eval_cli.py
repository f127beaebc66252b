"""`chatvec benchmarks` and `chatvec eval` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def chatvec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chatvec.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("torch")
    from chatvec.demo.tiny import build_model_dir

    return str(build_model_dir(tmp_path_factory.mktemp("cli") / "m", seed=7, shard_size=None))


def test_benchmarks_lists_names_kinds_and_languages(tmp_path):
    res = chatvec("benchmarks", "--fields", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    chat = next(line for line in lines if line.startswith("chat "))
    assert "chat" in chat and "zh-Hant:5" in chat and "ko:5" in chat and "ja:5" in chat and "en:5" in chat
    assert any(line.startswith("choice: id?, question, choices, answer") for line in lines)


def test_eval_prints_the_summary_and_names_failed_cells(model, tmp_path):
    out = tmp_path / "out"
    ok = chatvec(
        "eval",
        "--model",
        f"tiny={model}",
        "--benchmark",
        "choice",
        "--benchmark",
        "chat",
        "--language",
        "ko",
        "--workers",
        "0",
        "--max-new-tokens",
        "4",
        "--quiet",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tiny   ko        choice     acc" in ok.stdout
    assert "judge_score  -               0 (+5 unscored)" in ok.stdout
    assert "2 cells, 2 generated" in ok.stdout and "--judge" in ok.stdout
    bad = chatvec(
        "eval",
        "--model",
        f"tiny={model}",
        "--model",
        f"gone={tmp_path / 'nope'}",
        "--benchmark",
        "choice",
        "--language",
        "ko",
        "--workers",
        "0",
        "--quiet",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert "gone/ko/choice (generate)" in bad.stderr and "does not exist" in bad.stderr
    assert "1 already done" in bad.stdout
    # another answer budget: the chat cell is computed again, and the run says why; choice is kept
    longer = chatvec(
        "eval",
        "--model",
        f"tiny={model}",
        "--benchmark",
        "choice",
        "--benchmark",
        "chat",
        "--language",
        "ko",
        "--workers",
        "0",
        "--max-new-tokens",
        "5",
        "--quiet",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert longer.returncode == 0, longer.stderr
    assert "tiny/ko/chat: the benchmark's options or decoding changed" in longer.stdout
    assert "2 cells, 1 generated, 1 already done" in longer.stdout


def test_bad_input_is_an_error_without_a_traceback(model, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "fine"}) + "\n" + json.dumps({"prompt": "wrong field"}) + "\n")
    res = chatvec(
        "eval",
        "--model",
        f"tiny={model}",
        "--benchmark",
        f"mine={data}:chat:ko",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert f"{data}, line 2: missing field 'question'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "samples").exists()
    res = chatvec("eval", "--model", "no-equals-sign", "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert res.returncode == 2 and "write NAME=URI" in res.stderr
