"""Bad inputs through the CLI: one clear message, a non-zero exit, no index or manifest written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from merge_ref import assert_close_to_reference, load_tensors, reference_merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from chatvec.demo.tiny import build_model_dir, build_triple

    root = tmp_path_factory.mktemp("err")
    return {
        "t": build_triple(root / "llama", "llama", seed=41),
        "qwen": build_triple(root / "qwen2", "qwen2", seed=42),
        "narrow": build_model_dir(root / "narrow", "llama", seed=43, hidden=32),
        "root": root,
    }


def run(args: list[str], capsys) -> tuple[int, str]:
    from chatvec.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    return code, err


def _merge_args(cp, base, chat, out, *extra) -> list[str]:
    return [
        "merge",
        "--cp",
        str(cp),
        "--base",
        str(base),
        "--chat",
        str(chat),
        "--out",
        str(out),
        "--workers",
        "0",
        *extra,
    ]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_refused(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "chatvec_manifest.json").exists()


def _shard(folder: Path, k: int = 2) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[k - 1]


def test_truncated_shard(models, tmp_path, capsys):
    t = models["t"]
    base = _copy(t.base, tmp_path / "base")
    shard = _shard(base)
    shard.write_bytes(shard.read_bytes()[:-100])
    code, err = run(_merge_args(t.cp, base, t.chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", shard.name, "truncated")


def test_corrupted_header(models, tmp_path, capsys):
    t = models["t"]
    chat = _copy(t.chat, tmp_path / "chat")
    shard = _shard(chat, 1)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    code, err = run(_merge_args(t.cp, t.base, chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", shard.name, "not JSON")


def test_header_length_beyond_the_file(models, tmp_path, capsys):
    t = models["t"]
    cp = _copy(t.cp, tmp_path / "cp")
    shard = _shard(cp, 1)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    shard.write_bytes(bytes(data))
    code, err = run(_merge_args(cp, t.base, t.chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", "corrupted header")


def test_missing_shard_file(models, tmp_path, capsys):
    t = models["t"]
    base = _copy(t.base, tmp_path / "base")
    shard = _shard(base, 3)
    shard.unlink()
    code, err = run(_merge_args(t.cp, base, t.chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", shard.name, "do not exist")


def _pickle_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    torch.save(load_tensors(src), dst / "pytorch_model.bin")
    return dst


def test_pickle_only_needs_allow_pickle(models, tmp_path, capsys, monkeypatch):
    t = models["t"]
    chat = _pickle_only(t.chat, tmp_path / "chat")
    code, err = run(_merge_args(t.cp, t.base, chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", "pytorch_model.bin", "--allow-pickle")
    monkeypatch.setenv("CHATVEC_CACHE", str(tmp_path / "cache"))
    code, err = run(_merge_args(t.cp, t.base, chat, tmp_path / "out", "--allow-pickle"), capsys)
    assert code == 0, err
    cp, base, ch = load_tensors(t.cp), load_tensors(t.base), load_tensors(t.chat)
    out = load_tensors(tmp_path / "out")
    for name, (ref, mag, _d) in reference_merge(cp, [(1.0, base, ch)]).items():
        assert_close_to_reference(out[name], ref, mag, name)


def test_different_architectures(models, tmp_path, capsys):
    t, q = models["t"], models["qwen"]
    code, err = run(_merge_args(q.cp, t.base, t.chat, tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", "different model family", "qwen2", "llama")


def test_mismatched_shapes_are_all_listed(models, tmp_path, capsys):
    t = models["t"]
    code, err = run(_merge_args(t.cp, t.base, models["narrow"], tmp_path / "out"), capsys)
    _assert_refused(
        code,
        err,
        tmp_path / "out",
        "shapes differ",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    )


def test_nonexistent_paths_are_reported_together(models, tmp_path, capsys):
    t = models["t"]
    code, err = run(_merge_args(t.cp, tmp_path / "nope-base", tmp_path / "nope-chat", tmp_path / "out"), capsys)
    _assert_refused(code, err, tmp_path / "out", "2 problem(s)", "nope-base does not exist", "nope-chat does not exist")


def test_committed_output_is_refused_without_overwrite(models, tmp_path, capsys):
    t = models["t"]
    out = tmp_path / "out"
    assert run(_merge_args(t.cp, t.base, t.chat, out), capsys)[0] == 0
    manifest = (out / "chatvec_manifest.json").read_bytes()
    code, err = run(_merge_args(t.cp, t.base, t.chat, out, "--ratio", "0.5"), capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert (out / "chatvec_manifest.json").read_bytes() == manifest
    code, err = run(_merge_args(t.cp, t.base, t.chat, out, "--ratio", "0.5", "--overwrite"), capsys)
    assert code == 0, err
    assert json.loads((out / "chatvec_manifest.json").read_text())["recipe"]["vectors"][0]["ratio"] == 0.5


def test_foreign_model_in_output_is_refused(models, tmp_path, capsys):
    t = models["t"]
    out = _copy(t.chat, tmp_path / "out")
    code, err = run(_merge_args(t.cp, t.base, t.chat, out), capsys)
    assert code == 2 and "did not write" in err


def test_bad_recipe_names_the_key(models, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"cp: {models['t'].cp}\nvectors:\n  - base: a\n    chat: b\n    ratoi: 0.5\n")
    code, err = run(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--workers", "0"], capsys)
    assert code == 2 and "ratoi" in err and "line 5" in err


def test_input_truncated_after_planning_leaves_no_file(models, tmp_path):
    """A file that changes under a running merge: the shard in progress is not published."""
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core.errors import InputError
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    t = models["t"]
    chat = _copy(t.chat, tmp_path / "chat")
    plan = build_plan(Recipe(cp=str(t.cp), vectors=[VectorSpec(base=str(t.base), chat=str(chat))]), shard_size=10**9)
    shard = _shard(chat, 3)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated|end of file"):
        run_merge_job(plan, str(tmp_path / "out"), progress=False)
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert left == [], left
