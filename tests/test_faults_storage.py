"""Object-storage faults: responses cut mid-body, connections dropped, 503 SlowDown.

A fault proxy (tests/faultproxy.py) on loopback sits between chatvec and a real S3 server
(moto_server). Merges and evals read from and write to ``s3://`` through it, as a user runs them
(the CLI in a subprocess), and must end with the same bytes as undisturbed runs; with the proxy
failing every request they must stop with a one-line error that names the URI.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy, Faults

from chatvec.core import storage_clients
from chatvec.core.storage import Store

pytest.importorskip("torch")

# Quick retries: the tests run many faults, and the bound on the attempts is what is tested.
FAST = {"CHATVEC_STORAGE_BACKOFF_S": "0.05", "CHATVEC_STORAGE_MAX_BACKOFF_S": "0.2", "CHATVEC_S3_REQUEST_ATTEMPTS": "2"}
MIXED = Faults(mode=("cut", "refuse", "slowdown"), first=3, rate=0.08, seed=11)


def start(args: list[str], cwd: Path, endpoint: str, **extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "AWS_ENDPOINT_URL": endpoint,
        "CHATVEC_CACHE": str(cwd / "cache"),
        **FAST,
        **extra,
    }
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "chatvec"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def chatvec(args: list[str], cwd: Path, endpoint: str, **extra: str) -> subprocess.CompletedProcess:
    return finish(start(args, cwd, endpoint, **extra))


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("faults-s3"), "llama", seed=3, shard_size="40KB")


@pytest.fixture(scope="module")
def s3_inputs(s3_server, triple):
    bucket = s3_server.make_bucket()
    return bucket, {
        role: s3_server.upload_dir(getattr(triple, role), f"{bucket}/in/{role}") for role in ("cp", "base", "chat")
    }


def merge_args(inputs: dict[str, str], out: str) -> list[str]:
    return [
        "merge",
        "--cp",
        inputs["cp"],
        "--base",
        inputs["base"],
        "--chat",
        inputs["chat"],
        "--ratio",
        "0.5",
        "--shard-size",
        "60KB",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        out,
    ]


def model_files(uri: str) -> dict[str, bytes]:
    """Every file of a merged model except the manifest, whose inputs and time differ by run."""
    store = Store(uri)
    return {
        rel: store.read_bytes(rel)
        for rel in store.list()
        if not rel.startswith(".chatvec") and rel != "chatvec_manifest.json"
    }


def test_stores_share_one_client_per_endpoint(s3_server, s3_bucket, monkeypatch):
    a = Store(f"{s3_bucket}/one")
    before = storage_clients.created
    b, c = Store(f"{s3_bucket}/two"), Store("s3://another-bucket/x")
    assert b.fs is a.fs and c.fs is a.fs and storage_clients.created == before
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        d = Store(f"{s3_bucket}/one")
        assert d.fs is not a.fs and storage_clients.created == before + 1
        assert Store(f"{s3_bucket}/three").fs is d.fs
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
        assert Store(f"{s3_bucket}/one").fs is not d.fs  # other credentials, other client


@pytest.mark.parametrize("mode", ["cut", "refuse", "slowdown"])
def test_every_whole_object_operation_survives_the_fault(s3_server, s3_bucket, monkeypatch, mode):
    data = os.urandom(200_000)
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("CHATVEC_S3_REQUEST_ATTEMPTS", "1")  # so chatvec's own retries are what works
        for k, v in FAST.items():
            monkeypatch.setenv(k, v)
        store = Store(f"{s3_bucket}/p")
        for what in ("write", "read", "range", "list", "delete"):
            proxy.set_faults(Faults(mode=mode, first=2))
            if what == "write":
                store.write_bytes("obj.bin", data)
            elif what == "read":
                assert store.read_bytes("obj.bin") == data
            elif what == "range":
                with store.open_reader("obj.bin") as reader:
                    assert reader.read_at(123_456, 50_000) == data[123_456:173_456]
            elif what == "list":
                assert store.list() == ["obj.bin"]
            else:
                store.delete("obj.bin")
                assert not Store(f"{s3_bucket}/p").exists("obj.bin")
            assert proxy.spoiled == 2, f"{what}: the faults did not land"


def test_merge_and_eval_through_a_faulty_s3_give_the_same_bytes(s3_server, s3_inputs, tmp_path):
    bucket, inputs = s3_inputs
    # the undisturbed run and the one through the faults, side by side
    with FaultProxy(s3_server.endpoint, MIXED) as proxy:
        runs = [
            start(merge_args(inputs, f"{bucket}/clean"), tmp_path, s3_server.endpoint),
            start(merge_args(inputs, f"{bucket}/faulty"), tmp_path, proxy.endpoint),
        ]
        clean, faulty = map(finish, runs)
        spoiled = proxy.spoiled
    assert clean.returncode == 0, clean.stderr
    assert faulty.returncode == 0, faulty.stderr
    assert spoiled >= 3, proxy.log
    want = model_files(f"{bucket}/clean")
    assert any(rel.endswith(".safetensors") for rel in want)
    assert model_files(f"{bucket}/faulty") == want

    # The merged model, evaluated from s3 into s3 through the same faults, and without them.
    ev = [
        "eval",
        "--model",
        f"m={bucket}/faulty",
        "--benchmark",
        "choice",
        "--benchmark",
        "chat",
        "--language",
        "ko",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--workers",
        "0",
        "--quiet",
        "--run-id",
        "r",
    ]
    with FaultProxy(s3_server.endpoint, MIXED) as proxy:
        runs = [
            start([*ev, "--out", f"{bucket}/eval-clean"], tmp_path / "a", s3_server.endpoint),
            start([*ev, "--out", f"{bucket}/eval-faulty"], tmp_path / "b", proxy.endpoint),
        ]
        clean, faulty = map(finish, runs)
        assert proxy.spoiled >= 3
    assert clean.returncode == 0, clean.stderr
    assert faulty.returncode == 0, faulty.stderr
    assert clean.stdout.replace("eval-clean", "eval-faulty") == faulty.stdout

    def rows(uri: str) -> dict[str, list]:
        store = Store(uri)
        out = {}
        for rel in store.list("samples"):
            table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
            out[rel] = table.drop_columns(["created_at"]).to_pylist()
        return out

    want = rows(f"{bucket}/eval-clean")
    assert len(want) == 2 and all(want.values())
    assert rows(f"{bucket}/eval-faulty") == want


def test_storage_that_keeps_failing_ends_in_a_clear_error(s3_server, s3_inputs, tmp_path):
    bucket, inputs = s3_inputs
    limits = {"CHATVEC_STORAGE_ATTEMPTS": "3", "CHATVEC_S3_REQUEST_ATTEMPTS": "2"}
    with FaultProxy(s3_server.endpoint, Faults(mode="slowdown", always=True)) as proxy:
        res = chatvec(merge_args(inputs, f"{bucket}/never"), tmp_path, proxy.endpoint, **limits)
        tries = Counter((method, path) for method, path, _ in proxy.log)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr
    assert any("s3://" in line and "still failing after 3 attempts" in line and "SLOW_DOWN" in line for line in err), (
        res.stderr
    )
    # bounded: each request was made at most chatvec's 3 attempts x the SDK's 2 tries
    assert tries and max(tries.values()) <= 6, tries
    assert not Store(f"{bucket}/never").exists("chatvec_manifest.json")

    with FaultProxy(s3_server.endpoint, Faults(mode="refuse", always=True)) as proxy:
        res = chatvec(
            [
                "eval",
                "--model",
                f"m={inputs['cp']}",
                "--benchmark",
                "choice",
                "--language",
                "ko",
                "--limit",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--out",
                f"{bucket}/eval-never",
            ],
            tmp_path,
            proxy.endpoint,
            **limits,
        )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "still failing after 3 attempts" in res.stderr and "s3://" in res.stderr, res.stderr
