"""`chatvec eval --engine vllm` against `--engine hf`: the same rows for every benchmark kind.

Two real runs of the command (in-process, each in its own interpreter) over the toy world's CP,
chat and base models and a tiny random Llama (head size 32), on the shipped samples (chat,
multiturn, safety, choice, perplexity) and the toy world's task benchmark, judged by the toy chat
model. Every row must match: answers, token counts, language detection and the judge's raw
output exactly; scores and log-likelihoods within 1e-4 (float32 on CPU).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")

from chatvec.demo.tiny import build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
KINDS = ["chat", "multiturn", "safety", "choice", "perplexity"]
EXACT = (
    "kind",
    "prompt",
    "response",
    "prompt_tokens",
    "completion_tokens",
    "detected_language",
    "detected_script",
    "in_language",
    "judge_status",
    "judge_raw",
    "judge_model",
    "error",
)


def run_eval(engine: str, models: dict[str, str], out: Path, config: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "chatvec.cli",
        "eval",
        "--engine",
        engine,
        "--workers",
        "0",
        "--device",
        "cpu",
        "--config",
        str(config),
        "--out",
        str(out),
        "--max-new-tokens",
        "24",
        "--judge",
        str(TOY / "chat"),
        "--quiet",
        "--language",
        "en",
        "--language",
        "ko",
        "--language",
        "toy-l2",
    ]
    for name, uri in models.items():
        cmd += ["--model", f"{name}={uri}"]
    for kind in KINDS:
        cmd += ["--benchmark", kind]
    cmd += ["--benchmark", str(TOY / "benchmarks.yaml")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def rows_by_cell(out: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    cells = {}
    for path in sorted((out / "samples").rglob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        cells[str(path.relative_to(out))] = sorted(rows, key=lambda r: (r["item_id"], r["metric"]))
    return cells


def close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    tiny = build_model_dir(tmp / "tiny32", seed=5, hidden=128, layers=2, dtype="float32", shard_size=None)
    models = {"cp": str(TOY / "cp"), "chat": str(TOY / "chat"), "base": str(TOY / "base"), "tiny32": str(tiny)}
    config = tmp / "ray_config.yaml"
    config.write_text("eval:\n  vllm: {enforce_eager: true, cpu_kvcache_gib: 1}\n")
    out = {}
    for engine in ("hf", "vllm"):
        proc = run_eval(engine, models, tmp / engine, config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[engine] = (proc, rows_by_cell(tmp / engine))
    return out


def test_every_kind_gives_the_same_rows(runs):
    hf, vllm = runs["hf"][1], runs["vllm"][1]
    assert hf.keys() == vllm.keys()
    kinds = {r["kind"] for rows in hf.values() for r in rows}
    assert kinds == {"chat", "multiturn", "safety", "choice", "perplexity", "task"}
    assert any(r["judge_raw"] for rows in hf.values() for r in rows)  # the judge ran
    compared = 0
    for cell, want in hf.items():
        got = vllm[cell]
        assert [(r["item_id"], r["metric"]) for r in got] == [(r["item_id"], r["metric"]) for r in want], cell
        for g, w in zip(got, want):
            where = f"{cell} {w['item_id']} {w['metric']}"
            assert {k: g[k] for k in EXACT} == {k: w[k] for k in EXACT}, where
            assert close(g["score"], w["score"]), where
            assert close(json.loads(g["details"] or "null"), json.loads(w["details"] or "null")), where
            assert (g["engine"], w["engine"]) == ("vllm", "hf")
            compared += 1
    assert compared > 200


def test_each_model_is_loaded_once(runs):
    for engine in ("hf", "vllm"):
        proc, _rows = runs[engine]
        assert ", 0 failed" in proc.stdout
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("engine loads: ")]
        loads = dict(part.rsplit(" x", 1) for part in line.removeprefix("engine loads: ").split(", "))
        # every model once; the chat model also once more as the judge
        assert {Path(uri).name: int(n) for uri, n in loads.items()} == {"cp": 1, "base": 1, "tiny32": 1, "chat": 2}
