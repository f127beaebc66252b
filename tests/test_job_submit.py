"""`ray job submit ... -- chatvec merge --workers 2 --out s3://...` against a head started with
`ray start --head`, token authentication on, exactly as docs/cluster.md shows it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from test_cluster_merge import assert_matches_reference, build_small_triple

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def _wait_for_head(head: subprocess.Popen, dashboard: int, env: dict, log: Path, timeout: float = 120) -> None:
    """Until the job API answers with our token (the dashboard comes up after the GCS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        probe = subprocess.run(
            [RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"the head's job API did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the head this test started and nothing else: `ray start --block` shuts down every
    process it spawned on SIGTERM; anything left in its own session is then killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if head.poll() is None:
        head.wait(timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started with `ray start --head`, token auth on, as docs/cluster.md shows it.

    RAY_TMPDIR points Ray's default folder into the test's own, so the head's address file
    (which `ray.init()` without an address looks for) is seen only by commands of this module.
    """
    root = tmp_path_factory.mktemp("head")
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        # a short folder: Ray's socket paths must stay under 108 bytes
        RAY_TMPDIR=str(tmp_path_factory.mktemp("rt")),
        OMP_NUM_THREADS="1",
    )
    gcs, dashboard = free_port(), free_port()
    log = root / "head.log"
    head_cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(head_cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_head(proc, dashboard, env, log)
        yield {"env": env, "dashboard": dashboard, "gcs": f"127.0.0.1:{gcs}", "root": root}
    finally:
        _stop_head(proc)


@pytest.mark.slow
def test_ray_job_submit_merges_into_s3_with_token_auth(head, tmp_path, s3_server):
    triple = build_small_triple(tmp_path / "models")
    bucket = s3_server.make_bucket()
    for role in ("base", "chat", "cp"):
        s3_server.upload_dir(getattr(triple, role), f"{bucket}/inputs/{role}")
    out = f"{bucket}/models/merged"
    env, dashboard = head["env"], head["dashboard"]

    # Without the token the cluster refuses the submission.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", "true"],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()

    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(ROOT),
            "--",
            "chatvec",
            "merge",
            "--cp",
            f"{bucket}/inputs/cp",
            "--base",
            f"{bucket}/inputs/base",
            "--chat",
            f"{bucket}/inputs/chat",
            "--ratio",
            "0.5",
            "--shard-size",
            "50KB",
            "--workers",
            "2",
            "--out",
            out,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    # the job's merge ran on the job's cluster: its two actors each wrote a share
    assert output.count("merge actor 0") and output.count("merge actor 1"), output[-4000:]
    assert_matches_reference(out, triple, ratio=0.5)


@pytest.mark.slow
def test_address_local_starts_its_own_ray_next_to_a_running_cluster(head, tmp_path):
    """`ray.address: local` with num_cpus set: joining the running head would refuse num_cpus;
    starting its own instance merges on 2 actors of its own."""
    triple = build_small_triple(tmp_path / "models")
    config = tmp_path / "ray_config.yaml"
    config.write_text("ray:\n  address: local\n  num_cpus: 2\nmerge:\n  gpus_per_worker: 0\n")
    env = dict(head["env"])
    assert "RAY_ADDRESS" not in env
    out = tmp_path / "merged"
    run = subprocess.run(
        [
            str(VENV_BIN / "chatvec"),
            "-v",
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
            "0.5",
            "--shard-size",
            "50KB",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "a new local Ray instance" in output, output[-4000:]
    assert head["gcs"] not in output
    assert_matches_reference(str(out), triple, ratio=0.5)


@pytest.mark.slow
def test_a_job_from_a_project_with_its_own_eval_and_merge_packages(head, tmp_path):
    """`ray job submit --working-dir .` from a user's project whose own `eval/`, `merge/`,
    `cluster/` and `demo/` packages come first on every Ray worker's import path: a merge and an
    evaluation on one actor each still run chatvec's code."""
    from test_package import user_project

    from chatvec.demo.tiny import build_model_dir

    triple = build_small_triple(tmp_path / "models")
    model = build_model_dir(tmp_path / "tiny", seed=3, shard_size=None)
    project = user_project(tmp_path / "project")
    env, dashboard = head["env"], head["dashboard"]

    def submit(*command: str) -> str:
        run = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--", *command],
            env=env,
            cwd=project,
            capture_output=True,
            text=True,
            timeout=400,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "succeeded" in output, output[-4000:]
        return output

    out = tmp_path / "merged"
    merge_cmd = ["chatvec", "merge", "--cp", str(triple.cp), "--base", str(triple.base), "--chat", str(triple.chat)]
    submit(*merge_cmd, "--ratio", "0.5", "--workers", "1", "--device", "cpu", "--out", str(out))
    assert_matches_reference(str(out), triple, ratio=0.5)

    results = tmp_path / "results"
    output = submit(
        "chatvec",
        "eval",
        "--model",
        f"tiny={model}",
        "--benchmark",
        "perplexity",
        "--language",
        "en",
        "--limit",
        "2",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--out",
        str(results),
    )
    assert "perplexity" in output, output[-4000:]
    assert list(results.rglob("samples/model=tiny/language=en/benchmark=perplexity.parquet"))
