"""A full disk (ENOSPC) under a merge output and under an eval output.

The output goes to a small tmpfs that the test mounts (it needs root, or a machine that lets it
mount; elsewhere the tests skip and say why). A filler file leaves too little room; the command
must stop with a one-line error that says the disk is full and leave nothing that looks complete;
with the filler gone, the same command finishes and gives what an undisturbed run gives.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatvec.core.storage import Store

pytest.importorskip("torch")

TMPFS_BYTES = 8 << 20


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    mnt = tmp_path_factory.mktemp("small-disk")
    if not sys.platform.startswith("linux"):
        pytest.skip("mounting a tmpfs needs Linux")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until only about ``leave`` bytes are free; return the filler to delete."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def chatvec(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "chatvec"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_disk_full_error(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], res.stderr


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("disk-triple"), "llama", seed=4, shard_size="40KB")


def test_full_disk_during_a_merge_then_resume(small_disk, triple, tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "merge",
            "--cp",
            str(triple.cp),
            "--base",
            str(triple.base),
            "--chat",
            str(triple.chat),
            "--ratio",
            "0.5",
            "--shard-size",
            "40KB",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]

    ref = tmp_path / "reference"
    assert chatvec(args(ref), tmp_path).returncode == 0
    want = tree(ref)
    shards = sum(len(v) for k, v in want.items() if k.endswith(".safetensors"))
    out = small_disk / "merged"
    filler = fill(small_disk, leave=shards // 2)
    try:
        full = chatvec(args(out), tmp_path)
    finally:
        filler.unlink()
    assert_disk_full_error(full)
    left = tree(out) if out.exists() else {}
    assert "chatvec_manifest.json" not in left and "model.safetensors.index.json" not in left
    assert not [rel for rel in left if ".tmp-" in rel], "a partial file was left behind"

    again = chatvec(args(out), tmp_path)
    assert again.returncode == 0, again.stderr
    got = tree(out)
    assert {k for k in got if not k.startswith(".chatvec")} == {k for k in want if not k.startswith(".chatvec")}
    for rel, data in want.items():
        if rel.endswith(".safetensors") or rel.endswith(".index.json"):
            assert got[rel] == data, rel


def test_full_disk_during_an_eval_then_resume(small_disk, triple, tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "eval",
            "--model",
            f"cp={triple.cp}",
            "--model",
            f"chat={triple.chat}",
            "--benchmark",
            "choice",
            "--benchmark",
            "perplexity",
            "--language",
            "en",
            "--language",
            "ko",
            "--limit",
            "2",
            "--workers",
            "0",
            "--quiet",
            "--run-id",
            "r",
            "--out",
            str(out),
        ]

    def samples(root: Path) -> dict[str, list]:
        store = Store(str(root))
        return {
            rel: pq.read_table(io.BytesIO(store.read_bytes(rel))).drop_columns(["created_at"]).to_pylist()
            for rel in store.list("samples")
        }

    ref = tmp_path / "reference"
    done = chatvec(args(ref), tmp_path)
    assert done.returncode == 0, done.stderr
    want = samples(ref)
    assert len(want) == 8
    out = small_disk / "eval"
    # room for the run's record and a cell or two, not for all eight
    filler = fill(small_disk, leave=6 * 4096)
    try:
        full = chatvec(args(out), tmp_path)
    finally:
        filler.unlink()
    assert_disk_full_error(full)
    assert not (out / "summary.parquet").exists()
    kept = samples(out) if (out / "samples").exists() else {}
    assert len(kept) < 8
    for rel, rows in kept.items():  # what is there is whole
        assert rows == want[rel]

    again = chatvec(args(out), tmp_path)
    assert again.returncode == 0, again.stderr
    assert samples(out) == want
    assert (out / "summary.parquet").exists()
