"""Dead processes under an evaluation on Ray: an eval actor SIGKILLed mid-cell, a judge actor
killed, the driver killed while judging, and the driver's Ray node dying (its raylet killed).

After each, the rerun finishes with every cell exactly once and the same numbers as an
undisturbed run; a dead node makes the driver stop with a clear message instead of hanging.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from conftest import free_port  # noqa: E402

from chatvec.cluster.eval_driver import run_eval  # noqa: E402
from chatvec.core.config import ChatvecConfig, EvalSettings  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.results import read_table  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0, judge_workers=1))
CELLS = dict(benchmarks=["chat", "choice"], languages=["en", "ko"], limit=2)
COMMON = dict(device="cpu", max_new_tokens=5, config=CONFIG, show_progress=False, **CELLS)
CONFIG_YAML = "eval:\n  cpus_per_engine: 0\n  judge_workers: 1\n  device: cpu\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("procs")
    return {
        name: str(build_model_dir(root / name, seed=seed, shard_size=None)) for name, seed in (("a", 21), ("judge", 22))
    }


def numbers(out: str | Path) -> dict[str, list[tuple]]:
    """Every cell's rows (what was asked, answered and scored); a duplicate row fails here."""
    store = Store(str(out))
    keep = ("item_id", "metric", "score", "response", "judge_status", "judge_raw")
    cells = {}
    for rel in store.list("samples"):
        rows = [tuple(r[k] for k in keep) for r in read_table(store, rel).to_pylist()]
        assert len({r[:2] for r in rows}) == len(rows), f"duplicate rows in {rel}"
        cells[rel] = sorted(rows, key=repr)
    return cells


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """The undisturbed run, in this process."""
    out = tmp_path_factory.mktemp("procs-ref") / "out"
    outcome = run_eval({"a": models["a"]}, judge=models["judge"], workers=0, out_uri=str(out), **COMMON)
    assert outcome.ok
    got = numbers(out)
    assert len(got) == 4 and any(r[4] != "not_judged" for rows in got.values() for r in rows)
    return got


def our_processes(title: str, besides: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """Ray workers of this test session's cluster (descendants of this process) named ``title``,
    other than the pids in ``besides``."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid in besides:
                continue
            if any(part.startswith(f"ray::{title}") for part in proc.cmdline()[:1]):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Killer:
    """SIGKILLs this session's Ray workers titled ``title`` (e.g. ``EvalWorker.run``: an eval actor
    inside a cell) the first time one shows up, until stopped. Workers already there when it starts
    are left alone: an actor an earlier run closed may still be on its way out, and killing it
    would prove nothing about the run under test."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.before = frozenset(p.pid for p in our_processes(title))
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.killed:
            for proc in our_processes(self.title, self.before):
                try:
                    proc.send_signal(signal.SIGKILL)
                    self.killed.append(proc.pid)
                except psutil.Error:
                    pass
            time.sleep(0.005)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.killed


def test_eval_actor_killed_mid_cell_then_rerun(ray_cluster, models, reference, tmp_path):
    out = tmp_path / "out"
    killer = Killer("EvalWorker.run")  # the actor's title while it runs a cell
    first = run_eval({"a": models["a"]}, judge=models["judge"], workers=1, run_id="sigkill", out_uri=str(out), **COMMON)
    assert killer.stop(), "the eval actor was never killed inside a cell"
    assert len(first.failed) == 1 and "actor died" in first.failed[0].error
    again = run_eval({"a": models["a"]}, judge=models["judge"], workers=1, out_uri=str(out), **COMMON)
    assert again.ok
    assert numbers(out) == reference


def test_judge_actor_killed_then_rerun(ray_cluster, models, reference, tmp_path):
    out = tmp_path / "out"
    killer = Killer("JudgeWorker")
    first = run_eval(
        {"a": models["a"]}, judge=models["judge"], workers=1, run_id="judgekill", out_uri=str(out), **COMMON
    )
    assert killer.stop(), "the judge actor was never killed"
    assert first.failed and all("actor died" in f.error for f in first.failed)
    again = run_eval({"a": models["a"]}, judge=models["judge"], workers=1, out_uri=str(out), **COMMON)
    assert again.ok
    assert numbers(out) == reference


def _eval_cmd(models, out: Path, config: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "chatvec"),
        "eval",
        "--model",
        f"a={models['a']}",
        "--judge",
        models["judge"],
        "--benchmark",
        "chat",
        "--benchmark",
        "choice",
        "--language",
        "en",
        "--language",
        "ko",
        "--limit",
        "2",
        "--max-new-tokens",
        "5",
        "--workers",
        "1",
        "--config",
        str(config),
        "--quiet",
        "--out",
        str(out),
    ]


def test_driver_killed_during_judging_then_rerun(ray_cluster, models, reference, tmp_path):
    config = tmp_path / "ray_config.yaml"
    config.write_text(CONFIG_YAML)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = tmp_path / "out"
    before = frozenset(p.pid for p in our_processes("JudgeWorker"))  # judges of earlier runs on their way out
    driver = subprocess.Popen(
        _eval_cmd(models, out, config), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 240
        while driver.poll() is None and not our_processes("JudgeWorker", before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the run ended before judging: " + driver.communicate()[0].decode()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.communicate(timeout=60)
    assert not (out / "summary.parquet").exists()
    rerun = subprocess.run(
        _eval_cmd(models, out, config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert numbers(out) == reference


# -- a node that dies -----------------------------------------------------------------------------
class SideCluster:
    """A one-node Ray cluster of its own (``ray start --head``), so that its raylet can be killed
    without touching the session's."""

    def __init__(self) -> None:
        # short: Ray's socket paths under it must fit in 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="cvray-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> SideCluster:
        res = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--port",
                str(self.port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--num-gpus",
                "0",
                "--ray-client-server-port",
                str(free_port()),
                "--temp-dir",
                str(self.temp),
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return self

    def processes(self) -> list[psutil.Process]:
        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if str(self.temp) in cmd or f":{self.port} " in f"{cmd} " or f"={self.address}" in cmd:
                mine.append(proc)
        return mine

    def raylet(self) -> psutil.Process:
        [proc] = [p for p in self.processes() if "raylet" in (p.info.get("cmdline") or [""])[0]]
        return proc

    def stop(self) -> None:
        """Kill this cluster's processes, by id (never `ray stop`, which stops every Ray here)."""
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def test_dead_node_fails_the_driver_with_a_clear_error_then_rerun_resumes(ray_auth_env, models, reference, tmp_path):
    config = tmp_path / "ray_config.yaml"
    config.write_text(CONFIG_YAML)
    out = tmp_path / "out"
    cluster = SideCluster().start()
    env = {
        **os.environ,
        "RAY_ADDRESS": cluster.address,
        "OMP_NUM_THREADS": "1",
        "CHATVEC_RAY_POLL_S": "2",
        "CHATVEC_RAY_HEALTH_TIMEOUT_S": "10",
    }
    try:
        driver = subprocess.Popen(
            _eval_cmd(models, out, config),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while driver.poll() is None and not Store(str(out)).list("samples") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert driver.poll() is None, "the run ended first: " + driver.communicate()[0]
            cluster.raylet().kill()
            # a hang is what this test is about: give up on the driver (and fail) if it never ends
            log = driver.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            driver.kill()
            pytest.fail("the driver hung after its Ray node died: " + driver.communicate()[0][-3000:])
    finally:
        cluster.stop()
    assert driver.returncode not in (0, None), log
    assert "the Ray cluster died" in log and "rerun the same command" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (out / "summary.parquet").exists()

    again = SideCluster().start()
    try:
        rerun = subprocess.run(
            _eval_cmd(models, out, config),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "RAY_ADDRESS": again.address},
        )
    finally:
        again.stop()
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert numbers(out) == reference
