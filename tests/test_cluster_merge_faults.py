"""Faults during a distributed merge: a merge actor killed mid-shard, and the driver itself killed
mid-merge then rerun. Each ends byte-identical to an undisturbed merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray_merge import WatchedMerge
from test_cluster_merge import RATIO, make_config, make_plan, output_files

from chatvec.core.storage import Store
from chatvec.merge.output import INDEX, MANIFEST
from chatvec.merge.shard_writer import RECORDS


@pytest.fixture(scope="module")
def big_triple(tmp_path_factory):
    """Big enough (about 20 MB of output) that a merge takes long enough to be interrupted."""
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("big"), "llama", seed=5, hidden=512, layers=4, shard_size="4MB")


def reference(triple, tmp: Path, shard_size: str) -> dict[str, bytes]:
    """An undisturbed merge of the same plan, in-process (--workers 0)."""
    from chatvec.cluster.merge_driver import run_merge_job

    out = str(tmp / f"reference-{shard_size}")
    run_merge_job(make_plan(triple, shard_size=shard_size), out, device="cpu", progress=False)
    return output_files(out)


def assert_same_model(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    for rel in want:
        if rel == MANIFEST:  # identical except for its creation time
            a, b = json.loads(got[rel]), json.loads(want[rel])
            a.pop("created"), b.pop("created")
            # who wrote each file differs by design (an actor here, the test process there)
            for files in (a["files"], b["files"]):
                for entry in files.values():
                    entry.pop("written_by", None)
            assert a == b
        else:
            assert got[rel] == want[rel], f"{rel} differs from the undisturbed merge"


def test_actor_killed_mid_shard_is_restarted_and_output_is_identical(ray_cluster, big_triple, tmp_path):
    shard_size = "3MB"
    want = reference(big_triple, tmp_path, shard_size)
    landed = False
    # The kill must land while a shard is being written; on a busy machine it may miss the
    # window, so try a few times (each attempt is a full, checked merge either way).
    for attempt in range(4):
        out = tmp_path / f"merged-{attempt}"
        merge = WatchedMerge(
            make_plan(big_triple, shard_size=shard_size),
            str(out),
            workers=2,
            config=make_config(gpus_per_worker=0, max_restarts=2),
            device="cpu",
        )
        outcome: dict = {}
        thread = threading.Thread(target=lambda o=outcome, m=merge: o.setdefault("summary", m.run()))
        thread.start()
        killed = None
        try:
            assert merge.actors_ready.wait(120)
            victim = merge.actors[0]
            pid = ray_cluster.get(victim.info.options(concurrency_group="status").remote(), timeout=60)["pid"]
            while thread.is_alive():
                index, written = ray_cluster.get(
                    victim.progress.options(concurrency_group="status").remote(), timeout=60
                )
                if index is not None and 0 < written < merge.plan.shards[index].nbytes:
                    os.kill(pid, signal.SIGKILL)
                    killed = merge.plan.shards[index].filename
                    break
        finally:
            thread.join(300)
        assert "summary" in outcome, "the merge did not finish"
        summary = outcome["summary"]
        assert summary.shards_written == len(merge.plan.shards) and summary.shards_resumed == 0
        assert_same_model(output_files(str(out)), want)
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
        print(f"attempt {attempt}: killed while writing {killed}")
        if killed is None:
            continue
        # The killed actor came back as a new process and finished the work.
        assert pid not in {info["pid"] for info in merge.final_info}
        landed = True
        break
    assert landed, "could not kill a merge actor while it wrote a shard"


def _merge_cmd(triple, out: Path, config: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "chatvec"),
        "merge",
        "--config",
        str(config),
        "--cp",
        str(triple.cp),
        "--base",
        str(triple.base),
        "--chat",
        str(triple.chat),
        "--ratio",
        str(RATIO),
        "--shard-size",
        "500KB",
        "--workers",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def test_driver_killed_mid_merge_then_rerun_resumes_identically(ray_cluster, big_triple, tmp_path):
    want = reference(big_triple, tmp_path, "500KB")
    n_shards = sum(1 for rel in want if rel.endswith(".safetensors"))
    config = tmp_path / "ray_config.yaml"
    config.write_text("merge:\n  gpus_per_worker: 0\n  cpus_per_worker: 1\n")
    # The driver joins the session's Ray (as `ray job submit` would make it) instead of starting
    # its own; it inherits the session's auth token from the environment.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = tmp_path / "merged"
    records = out / RECORDS
    for attempt in range(3):
        proc = subprocess.Popen(
            _merge_cmd(big_triple, out, config), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            while proc.poll() is None and not (records.is_dir() and any(records.iterdir())):
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            log = proc.communicate(timeout=60)[0].decode(errors="replace")
        if proc.returncode == -signal.SIGKILL and not (out / MANIFEST).exists():
            break
        # finished before the kill: start over in a clean folder
        assert proc.returncode in (0, -signal.SIGKILL), log
        out = tmp_path / f"merged-{attempt + 1}"
        records = out / RECORDS
    else:
        pytest.fail("the merge always finished before the driver could be killed")

    # Killed mid-merge: some shards recorded, no index, no manifest.
    kept = len(list(records.glob("*.json")))
    assert 0 < kept < n_shards
    assert not (out / INDEX).exists() and not (out / MANIFEST).exists()

    rerun = subprocess.run(
        _merge_cmd(big_triple, out, config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    line = [ln for ln in (rerun.stdout + rerun.stderr).splitlines() if "resumed" in ln]
    assert line, rerun.stdout + rerun.stderr
    resumed = int(line[-1].split(" resumed")[0].rsplit(", ", 1)[1])
    # actors of the killed driver may finish a shard or two more before Ray reaps them
    assert resumed >= kept > 0
    assert_same_model(output_files(str(out)), want)
    assert not Store(str(out)).exists(".chatvec/lock.json")
