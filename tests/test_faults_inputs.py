"""Bad eval inputs: each is one clear error before any model loads, and nothing is marked done.

The models given next to the bad input have weights that cannot load (a safetensors file of
garbage, or the bad folder itself), so a run that reached the loading step would end differently
(a failed cell, exit status 1) than the refusal these tests expect (exit status 2, no output).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


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


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from chatvec.demo.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("inputs") / "good", seed=9, shard_size=None)


@pytest.fixture(scope="module")
def unloadable(good: Path, tmp_path_factory) -> Path:
    """A folder that passes every check made before loading and fails at loading."""
    path = tmp_path_factory.mktemp("inputs") / "unloadable"
    shutil.copytree(good, path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..")
    return path


def refused(res: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, res.stderr
    message = "\n".join(lines[starts[0] :])  # the error, with the list of problems it may carry
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists() or not any(out.rglob("*")), f"something was written: {sorted(out.rglob('*'))}"


GOOD_CHAT = {"question": "What is tea?", "reference": "A drink."}


@pytest.mark.parametrize(
    "case, lines, needles",
    [
        ("bad line", [json.dumps(GOOD_CHAT), "{this is not json"], ["line 2"]),
        ("missing field", [json.dumps(GOOD_CHAT), json.dumps({"reference": "no question"})], ["line 2", "question"]),
        ("wrong type", [json.dumps({**GOOD_CHAT, "question": ["a", "list"]})], ["line 1", "question"]),
        ("no items", [], ["no items"]),
    ],
)
def test_bad_benchmark_files(unloadable, tmp_path, case, lines, needles):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    res = chatvec(
        [
            "eval",
            "--model",
            f"m={unloadable}",
            "--benchmark",
            f"mine={data}:chat:en",
            "--workers",
            "0",
            "--quiet",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    refused(res, out, str(data), *needles)


def _variant(good: Path, where: Path, kind: str) -> Path:
    where.mkdir()
    for f in good.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, where / f.name)
    if kind == "pickle":
        (where / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded, never unpickled")
    elif kind == "auto_map":
        for f in good.glob("*.safetensors"):
            shutil.copy(f, where / f.name)
        config = json.loads((where / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        (where / "config.json").write_text(json.dumps(config))
        (where / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return where


def test_bad_model_folders(good, unloadable, tmp_path):
    kinds = ("no weights", "pickle", "auto_map")
    bad = {kind.replace(" ", "-"): _variant(good, tmp_path / kind.replace(" ", "-"), kind) for kind in kinds}
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        f"first={unloadable}",
        *[f"--model={name}={path}" for name, path in bad.items()],
        "--benchmark",
        "choice",
        "--language",
        "en",
        "--workers",
        "0",
        "--quiet",
        "--out",
        str(out),
    ]
    res = chatvec(args, tmp_path)
    # one error that names every bad folder, and nothing else
    refused(
        res,
        out,
        f"no-weights: model {bad['no-weights']} has no .safetensors weights",
        f"pickle: model {bad['pickle']} has only pickle weights",
        f"auto_map: model {bad['auto_map']} asks for remote code",
    )
    assert "first:" not in res.stderr
    assert "remote code ran" not in res.stdout + res.stderr
