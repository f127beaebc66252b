"""In-engine ratio sweeps on the toy world: the same cells as the checkpoint sweep, no checkpoint written.

With hf, an in-engine sweep gives exactly the checkpoint sweep's numbers and rows; with vllm,
the same answers. Cells carry the merge fingerprint as model identity, the one a committed
checkpoint of the point records. A point whose vocabulary grows goes the checkpoint way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatvec.core.config import ChatvecConfig, EvalSettings, VLLMSettings
from chatvec.core.storage import Store
from chatvec.eval.results import read_table
from chatvec.runs.sweep import load_sweep
from chatvec.runs.sweep_run import run_sweep

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
CONFIG = ChatvecConfig(eval=EvalSettings(vllm=VLLMSettings(enforce_eager=True, cpu_kvcache_gib=1)))
SWEEP = """\
name: {name}
vectors:
  toy: {{base: {world}/base, chat: {world}/chat}}
targets:
  - {{language: toy-l2, cp: {world}/cp, benchmarks: [{world}/benchmarks.yaml]}}
ratios: [0.5, 1.0, 1.25]
embeddings: [all, skip]
baselines: {{cp: false, chat: false}}
engine: {engine}
device: cpu
root: {root}
eval: {{limit: 24, max_new_tokens: 16}}
{extra}"""


def write(tmp: Path, name: str, *, engine: str = "hf", extra: str = "", world: Path = TOY) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        SWEEP.format(name=name, world=world.as_posix(), engine=engine, root=(tmp / name).as_posix(), extra=extra)
    )
    return path


def samples(root: Path, run_id: str) -> dict[str, list[dict]]:
    store = Store(str(root / "results" / f"run={run_id}"))
    out = {}
    for rel in store.list("samples"):
        rows = read_table(store, rel).to_pylist()
        out[rel] = sorted(rows, key=lambda r: (r["item_id"], r["metric"]))
    return out


def cell_models(root: Path, run_id: str) -> set[str]:
    import io

    import pyarrow.parquet as pq

    store = Store(str(root / "results" / f"run={run_id}"))
    found = set()
    for rel in store.list("samples"):
        meta = pq.read_schema(io.BytesIO(store.read_bytes(rel))).metadata
        found.add(json.loads(meta[b"chatvec.cell_identity"])["model"])
    return found


@pytest.fixture(scope="module")
def checkpoint_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    lines: list[str] = []
    outcome = run_sweep(
        load_sweep(str(write(tmp, "ckpt"))),
        run_id="r",
        config=CONFIG,
        merge_workers=0,
        eval_workers=0,
        echo=lines.append,
    )
    assert not outcome.failed_cells
    return tmp / "ckpt", outcome


def test_in_engine_hf_gives_the_checkpoint_sweeps_numbers(checkpoint_sweep, tmp_path):
    ckpt_root, ckpt = checkpoint_sweep
    lines: list[str] = []
    sweep = load_sweep(str(write(tmp_path, "inside")))
    sweep.in_engine = True
    outcome = run_sweep(sweep, run_id="r", config=CONFIG, merge_workers=0, eval_workers=0, echo=lines.append)
    assert not outcome.failed_cells
    root = tmp_path / "inside"
    assert not (root / "models").exists() or not any((root / "models").iterdir())  # nothing written
    assert any("in-engine: 6 merge point(s)" in line for line in lines)
    got, want = samples(root, "r"), samples(ckpt_root, "r")
    assert got.keys() == want.keys() and len(got) == 6
    drop = ("run_id", "created_at")
    for rel in want:
        assert [{k: v for k, v in r.items() if k not in drop} for r in got[rel]] == [
            {k: v for k, v in r.items() if k not in drop} for r in want[rel]
        ], rel
    strip = lambda t: sorted((r["model"], r["metric"], r["value"], r["n"]) for r in t.to_pylist())  # noqa: E731
    a = Store(str(root / "results" / "run=r"))
    b = Store(str(ckpt_root / "results" / "run=r"))
    assert strip(read_table(a, "summary.parquet")) == strip(read_table(b, "summary.parquet"))
    # the cells' model identity is the fingerprint the committed checkpoints carry
    fingerprints = {
        "merge:" + json.loads(p.read_text())["fingerprint"][:16]
        for p in (ckpt_root / "models").glob("*/chatvec_manifest.json")
    }
    assert len(fingerprints) == 6 and cell_models(root, "r") == fingerprints == cell_models(ckpt_root, "r")


def test_in_engine_vllm_gives_the_same_answers(checkpoint_sweep, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")
    ckpt_root, _ = checkpoint_sweep
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatvec.cli",
            "sweep",
            str(write(tmp_path, "vl", engine="vllm")),
            "--in-engine",
            "--workers",
            "0",
            "--run-id",
            "r",
            "--config",
            str(_config(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "in-engine: 6 merge point(s)" in proc.stdout
    got, want = samples(tmp_path / "vl", "r"), samples(ckpt_root, "r")
    assert got.keys() == want.keys()
    keep = ("item_id", "metric", "response", "completion_tokens", "score")
    for rel in want:
        assert [tuple(r[k] for k in keep) for r in got[rel]] == [tuple(r[k] for k in keep) for r in want[rel]], rel
        assert {r["engine"] for r in got[rel]} == {"vllm"}
    assert not (tmp_path / "vl" / "models").exists()


def _config(tmp: Path) -> Path:
    path = tmp / "ray_config.yaml"
    path.write_text("eval:\n  vllm: {enforce_eager: true, cpu_kvcache_gib: 1}\n")
    return path


def test_grown_vocabulary_falls_back_to_a_checkpoint(tmp_path):
    from chatvec.demo.tiny import build_triple

    world = tmp_path / "tri"
    triple = build_triple(world, chat_extra_tokens=2, shard_size=None)
    assert triple.cp == world / "cp"
    extra = "chat_tokens_from_chat: true\n"
    path = tmp_path / "grow.yaml"
    text = SWEEP.format(
        name="grow", world=world.as_posix(), engine="hf", root=(tmp_path / "grow").as_posix(), extra=extra
    ).replace(f"[{world.as_posix()}/benchmarks.yaml]", "[choice]")
    text = text.replace("language: toy-l2", "language: en").replace("[all, skip]", "[skip]")
    path.write_text(text.replace("ratios: [0.5, 1.0, 1.25]", "ratios: [0.5]"))
    lines: list[str] = []
    sweep = load_sweep(str(path))
    sweep.in_engine = True
    outcome = run_sweep(sweep, run_id="r", config=CONFIG, merge_workers=0, eval_workers=0, echo=lines.append)
    assert not outcome.failed_cells
    assert any("vocabulary grows" in line and "checkpoint" in line for line in lines), lines
    assert len(list((tmp_path / "grow" / "models").glob("*/chatvec_manifest.json"))) == 1


def test_bad_in_engine_input_stops_before_any_model_loads(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")
    from chatvec.demo.tiny import build_triple

    world = tmp_path / "h16"
    build_triple(world, shard_size=None)  # head size 16: vLLM's CPU build refuses it
    path = tmp_path / "bad.yaml"
    text = SWEEP.format(
        name="bad", world=world.as_posix(), engine="vllm", root=(tmp_path / "bad").as_posix(), extra=""
    ).replace(f"[{world.as_posix()}/benchmarks.yaml]", "[choice]")
    path.write_text(text.replace("language: toy-l2", "language: en"))
    proc = subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "sweep", str(path), "--in-engine", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "head size 16" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "models").exists() and not (tmp_path / "bad" / "results").exists()


@pytest.mark.slow
def test_a_dead_in_engine_actor_fails_only_the_cell_it_was_running(ray_cluster, tmp_path):
    import threading
    import time

    import ray

    from chatvec.cluster.eval_driver import actor_name

    killed = threading.Event()

    def kill_first_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                actor = ray.get_actor(actor_name("in-engine", "dies", 0))
            except ValueError:
                time.sleep(0.05)
                continue
            ray.kill(actor, no_restart=True)
            killed.set()
            return

    sweep = load_sweep(str(write(tmp_path, "dies")))
    sweep.in_engine, sweep.embeddings = True, ["skip"]
    killer = threading.Thread(target=kill_first_actor, daemon=True)
    killer.start()
    config = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0))
    first = run_sweep(sweep, run_id="dies", config=config, merge_workers=0, eval_workers=1, echo=lambda s: None)
    killer.join()
    assert killed.is_set()
    assert len(first.failed_cells) == 1 and "actor died" in first.failed_cells[0]
    assert len(samples(tmp_path / "dies", "dies")) == 2  # the other points ran on a fresh actor
    again = run_sweep(sweep, run_id="dies", config=config, merge_workers=0, eval_workers=1, echo=lambda s: None)
    assert not again.failed_cells and len(samples(tmp_path / "dies", "dies")) == 3
