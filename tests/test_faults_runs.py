"""Whole nightly runs through the CLI into a real S3 server: two runs of the same sweep and night
at once (a run lock; never duplicate rows), and credentials (S3 keys, the API judge's key) that
never appear in any output: logs at debug level, results, manifests, reports, error messages."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy, Faults
from judge_servers import ScriptedServer, reply

from chatvec.core.storage import Store

pytest.importorskip("torch")

NIGHT = "2026-02-03"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIACHATVECZQ7WX3KEY",
    "AWS_SECRET_ACCESS_KEY": "chatvecSecret/Zq8+x41distinctiveKEYmaterial",
    "AWS_SESSION_TOKEN": "chatvecSessionTokenQx9distinctive",
    "OPENAI_API_KEY": "sk-chatvec-Yt5distinctive-api-key-0042",
}
SWEEP = """\
name: locked
vectors:
  v: {{base: {models}/base, chat: {models}/chat}}
targets:
  - {{language: en, cp: {models}/cp, benchmarks: [chat, choice]}}
ratios: [1.0]
baselines: {{cp: true, chat: false}}
judge: openai:judge-model
engine: hf
device: cpu
shard_size: 100KB
eval: {{limit: 2, max_new_tokens: 6, batch_size: 2}}
"""


def forms(secret: str) -> list[str]:
    """The secret as it could leak: as is, and base64-encoded (as in a basic-auth header)."""
    return [secret, base64.b64encode(secret.encode()).decode()]


def assert_no_secret(where: str, data: bytes | str) -> None:
    text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
    for name, secret in SECRETS.items():
        for form in forms(secret):
            assert form not in text, f"{name} appears in {where}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from chatvec.demo.tiny import CHAT_TEMPLATE_CHAT, build_model_dir

    root = tmp_path_factory.mktemp("runs")
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
    build_model_dir(root / "cp", "llama", seed=2, init_from=root / "base", noise=0.02, shard_size="50KB")
    return root


def start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "chatvec"), "-vv", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def test_one_run_per_night_no_duplicates_and_no_secret_anywhere(s3_server, models, tmp_path):
    from chatvec.runs.run_lock import RunLock

    root = f"{s3_server.make_bucket()}/chatvec"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP.format(models=models.as_posix()))
    logs: list[tuple[str, str]] = []
    with ScriptedServer([reply("The answer is fine. [[7]]")]) as judge:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENAI_BASE_URL": judge.base_url,
            "CHATVEC_CACHE": str(tmp_path / "cache"),
            **SECRETS,
        }
        nightly = ["nightly", str(sweep), "--workers", "0", "--root", root, "--run-id", NIGHT]

        # Another process holds tonight's run: a second one refuses at once and writes nothing.
        with RunLock(root, NIGHT, kind="nightly"):
            code, log = finish(start(nightly, tmp_path, env))
            logs.append(("the refused run", log))
            assert code == 2, log
            assert "nightly run 2026-02-03 is already running" in log and "Traceback" not in log
            assert [rel for rel in Store(root).list() if not rel.endswith(".chatvec/lock.json")] == []

        # Two at once: one runs, the other refuses (or, if it started late, finds it all done).
        a, b = start(nightly, tmp_path, env), start(nightly, tmp_path, env)
        results = [finish(a), finish(b)]
        logs += [("run a", results[0][1]), ("run b", results[1][1])]
        codes = sorted(code for code, _ in results)
        assert codes[0] == 0, results
        assert codes[1] in (0, 2), results
        if codes[1] == 2:
            assert any("already running" in log for code, log in results if code == 2)
        assert judge.requests, "the API judge was never asked"
        assert all(h["authorization"] == f"Bearer {SECRETS['OPENAI_API_KEY']}" for h in judge.headers)

    store = Store(root)
    run = f"results/run={NIGHT}"
    cells = [rel for rel in store.list(f"{run}/samples") if rel.endswith(".parquet")]
    assert len(cells) == 4  # (merged, cp) x (chat, choice)
    for rel in cells:
        table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        keys = Counter(zip(table.column("item_id").to_pylist(), table.column("metric").to_pylist()))
        assert keys and max(keys.values()) == 1, f"duplicate rows in {rel}"
    summary = pq.read_table(io.BytesIO(store.read_bytes(f"{run}/summary.parquet"))).to_pylist()
    keys = Counter((r["model"], r["language"], r["benchmark"], r["metric"]) for r in summary)
    assert summary and max(keys.values()) == 1
    assert not store.exists(f"{run}/.chatvec/lock.json")

    # A storage error message, with the keys in the environment: still no key in it.
    with FaultProxy(s3_server.endpoint, Faults(mode="refuse", always=True)) as proxy:
        bad = subprocess.run(
            [str(Path(sys.executable).parent / "chatvec"), "-vv", "results", "--root", root],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **env,
                "AWS_ENDPOINT_URL": proxy.endpoint,
                "CHATVEC_STORAGE_ATTEMPTS": "2",
                "CHATVEC_STORAGE_BACKOFF_S": "0.05",
                "CHATVEC_S3_REQUEST_ATTEMPTS": "1",
            },
        )
    assert bad.returncode != 0 and "s3://" in bad.stderr, bad.stderr
    logs.append(("a storage error", bad.stdout + bad.stderr))

    for where, log in logs:
        assert_no_secret(where, log)
    written = store.list()
    assert any(rel.endswith("chatvec_manifest.json") for rel in written)
    assert any(rel.startswith("reports/") and rel.endswith(".html") for rel in written)
    for rel in written:
        assert_no_secret(store.describe(rel), store.read_bytes(rel))
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert_no_secret(str(path), path.read_bytes())
