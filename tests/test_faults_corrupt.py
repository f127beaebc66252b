"""Corrupt outputs found on a rerun: a cell file cut short or with flipped bytes, a cell file with
other columns, a status file cut short, a broken summary, and a half-written merge manifest.

Each is detected (read errors, page checksums, schema and row-count checks), named in a warning,
and only the broken part is computed again; the rerun ends as an undisturbed run does.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatvec.core.storage import Store

pytest.importorskip("torch")

CELL = "samples/model=m/language=en/benchmark={}.parquet"
STATUS = "status/model=m/language=en/benchmark={}.json"


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


def rows(root: Path) -> dict[str, list]:
    store = Store(str(root))
    return {
        rel: pq.read_table(io.BytesIO(store.read_bytes(rel))).drop_columns(["created_at"]).to_pylist()
        for rel in store.list("samples")
    }


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip(path: Path) -> None:
    """Flip one byte inside the first data page, where only the page checksum can notice."""
    data = bytearray(path.read_bytes())
    data[len(b"PAR1") + 40] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("corrupt"), "llama", seed=6, shard_size="40KB")


def test_broken_eval_outputs_are_named_and_redone(triple, tmp_path):
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        f"m={triple.cp}",
        "--benchmark",
        "choice",
        "--benchmark",
        "perplexity",
        "--benchmark",
        "chat",
        "--benchmark",
        "safety",
        "--language",
        "en",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--workers",
        "0",
        "--quiet",
        "--run-id",
        "r",
        "--out",
        str(out),
    ]
    first = chatvec(args, tmp_path)
    assert first.returncode == 0, first.stderr
    want = rows(out)
    summary = pq.read_table(out / "summary.parquet").drop_columns(["created_at"])
    assert len(want) == 4

    cut(out / CELL.format("choice"))  # truncated: no footer
    flip(out / CELL.format("perplexity"))  # same size, a corrupt page
    other = pa.table({"item_id": ["x"], "score": [1.0]})  # readable, but not a results file
    pq.write_table(other, out / CELL.format("safety"))
    cut(out / STATUS.format("chat"))  # a status file cut short
    cut(out / "summary.parquet")

    again = chatvec(args, tmp_path)
    assert again.returncode == 0, again.stderr
    log = again.stderr
    assert "Traceback" not in log
    for rel, why in (
        (CELL.format("choice"), "unreadable"),
        (CELL.format("perplexity"), "unreadable"),
        (CELL.format("safety"), "not in the results schema"),
        (STATUS.format("chat"), "unreadable"),
    ):
        assert any(str(out / rel) in line and why in line for line in log.splitlines()), (rel, log)
    assert "4 generated" in again.stdout, again.stdout
    # every cell exactly once, the same rows as the undisturbed run, the summary whole again
    assert rows(out) == want
    assert pq.read_table(out / "summary.parquet").drop_columns(["created_at"]).equals(summary)
    status = json.loads((out / STATUS.format("chat")).read_text())
    assert status["state"] == "done" and status["rows"] == len(want[CELL.format("chat")])

    third = chatvec(args, tmp_path)  # nothing broken any more: nothing redone
    assert third.returncode == 0 and "0 generated" in third.stdout, third.stdout
    assert "computing" not in third.stderr


def test_a_half_written_manifest_is_named_and_the_merge_redone(triple, tmp_path):
    out = tmp_path / "merged"
    args = [
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
    first = chatvec(args, tmp_path)
    assert first.returncode == 0, first.stderr
    want = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "chatvec_manifest.json"}
    manifest = json.loads((out / "chatvec_manifest.json").read_text())
    cut(out / "chatvec_manifest.json")

    again = chatvec(args, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert any("chatvec_manifest.json" in line and "unreadable" in line for line in again.stderr.splitlines()), (
        again.stderr
    )
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "chatvec_manifest.json"}
    assert got == want
    redone = json.loads((out / "chatvec_manifest.json").read_text())
    assert redone["files"] == manifest["files"] and redone["fingerprint"] == manifest["fingerprint"]
