"""Session-wide services for the tests: one real local Ray and one real S3 server on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small thread pools: the tests run on 2 cores next to Ray's own processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray reads its auth mode once per process, when something first touches its config: importing
# vllm does (at collection, in the vLLM test modules), so the mode must be set before that, not
# only in the session fixture below; the token itself is read when Ray starts.
os.environ["RAY_AUTH_MODE"] = "token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class S3Server:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket and return its s3:// URI."""
        from pyarrow import fs as pafs

        name = name or f"b{uuid.uuid4().hex[:12]}"
        s3 = pafs.S3FileSystem(
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir(name)
        return f"s3://{name}"

    def upload_dir(self, local: str | os.PathLike, uri: str) -> str:
        """Copy a local folder to `uri` (s3://bucket/prefix) and return `uri`."""
        from chatvec.core.storage import Store

        dest = Store(uri)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                dest.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
        return uri


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto_server) on a free loopback port, for the whole session."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server is missing: run `make test`, which installs the dev extra (moto[server])")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_port(port, proc)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_auth_env():
    """Token authentication on, with a token private to this test session."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}


@pytest.fixture(scope="session")
def ray_cluster(s3_server, ray_auth_env, tmp_path_factory):
    """One local Ray for the whole run: 4 logical CPUs and 2 logical GPUs.

    It starts after the S3 server so that its workers inherit the AWS_* variables.
    """
    import ray

    temp = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=4,
        num_gpus=2,
        include_dashboard=False,
        namespace="chatvec-tests",
        _temp_dir=str(temp),
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket per test."""
    return s3_server.make_bucket()
