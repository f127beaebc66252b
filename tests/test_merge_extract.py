"""`chatvec extract` then `merge --vector` gives exactly the direct merge."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from merge_ref import load_tensors
from safetensors import safe_open


def _cli(args: list[str]) -> tuple[int, str]:
    from chatvec.cli.main import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0), ""
    return 0, ""


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("x") / "t", "llama", cp_extra_tokens=2, chat_extra_tokens=2, seed=31)


def _same_shards(a, b) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return (
        bool(names)
        and names == sorted(p.name for p in b.glob("*.safetensors"))
        and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    )


@pytest.mark.parametrize("extra", [[], ["--embeddings", "by-token", "--chat-tokens-from-chat"]])
def test_extract_then_merge_equals_direct_merge(triple, tmp_path, capsys, extra):
    t = triple
    common = ["--workers", "0", "--shard-size", "70KB", "--ratio", "0.5"]
    if not extra:
        extra = ["--embeddings", "overlap"]
    assert (
        _cli(
            ["extract", "--base", str(t.base), "--chat", str(t.chat), "--out", str(tmp_path / "vec"), "--workers", "0"]
        )[0]
        == 0
    )
    assert (
        _cli(
            [
                "merge",
                "--cp",
                str(t.cp),
                "--vector",
                str(tmp_path / "vec"),
                "--out",
                str(tmp_path / "via"),
                *common,
                *extra,
            ]
        )[0]
        == 0
    )
    assert (
        _cli(
            [
                "merge",
                "--cp",
                str(t.cp),
                "--base",
                str(t.base),
                "--chat",
                str(t.chat),
                "--out",
                str(tmp_path / "direct"),
                *common,
                *extra,
            ]
        )[0]
        == 0
    )
    assert _same_shards(tmp_path / "via", tmp_path / "direct")
    assert (tmp_path / "via" / "tokenizer.json").read_bytes() == (tmp_path / "direct" / "tokenizer.json").read_bytes()
    assert "merged" in capsys.readouterr().out


def test_vector_file_holds_chat_minus_base_with_metadata(triple, tmp_path):
    t = triple
    assert (
        _cli(
            ["extract", "--base", str(t.base), "--chat", str(t.chat), "--out", str(tmp_path / "vec"), "--workers", "0"]
        )[0]
        == 0
    )
    vec = load_tensors(tmp_path / "vec")
    base, chat = load_tensors(t.base), load_tensors(t.chat)
    for name, v in vec.items():
        assert v.dtype == torch.float32
        rows = min(base[name].shape[0], chat[name].shape[0]) if base[name].shape != chat[name].shape else None
        c, b = chat[name].float(), base[name].float()
        if rows is None:
            assert torch.equal(v, c - b), name
        else:  # base rows first, then the chat-only rows as the chat model has them
            assert torch.equal(v[:rows], c[:rows] - b[:rows]) and torch.equal(v[rows:], c[rows:]), name
    shard = next((tmp_path / "vec").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "chatvec-vector" and meta["dtype"] == "float32"
    assert meta["base"].endswith("base") and meta["chat"].endswith("chat")
    info = json.loads((tmp_path / "vec" / "chatvec_vector.json").read_text())
    rows = base["model.embed_tokens.weight"].shape[0]
    assert info["raw_rows"]["model.embed_tokens.weight"] == [[rows, 2]]


def test_bfloat16_vector_merges(triple, tmp_path):
    t = triple
    assert (
        _cli(
            [
                "extract",
                "--base",
                str(t.base),
                "--chat",
                str(t.chat),
                "--out",
                str(tmp_path / "vec"),
                "--workers",
                "0",
                "--dtype",
                "bfloat16",
            ]
        )[0]
        == 0
    )
    assert next(iter(load_tensors(tmp_path / "vec").values())).dtype == torch.bfloat16
    assert (
        _cli(
            [
                "merge",
                "--cp",
                str(t.cp),
                "--vector",
                str(tmp_path / "vec"),
                "--out",
                str(tmp_path / "m"),
                "--workers",
                "0",
                "--embeddings",
                "skip",
            ]
        )[0]
        == 0
    )
    assert (tmp_path / "m" / "chatvec_manifest.json").exists()


def test_vector_and_model_roles_are_not_mixed(triple, tmp_path, capsys):
    t = triple
    assert (
        _cli(
            ["extract", "--base", str(t.base), "--chat", str(t.chat), "--out", str(tmp_path / "vec"), "--workers", "0"]
        )[0]
        == 0
    )
    code, _ = _cli(
        ["merge", "--cp", str(t.cp), "--vector", str(t.chat), "--out", str(tmp_path / "m"), "--workers", "0"]
    )
    assert code != 0 and "not a chat vector" in capsys.readouterr().err
    code, _ = _cli(
        [
            "merge",
            "--cp",
            str(t.cp),
            "--base",
            str(t.base),
            "--chat",
            str(tmp_path / "vec"),
            "--out",
            str(tmp_path / "m"),
            "--workers",
            "0",
            "--embeddings",
            "skip",
        ]
    )
    assert code != 0 and "--vector" in capsys.readouterr().err


def test_vector_with_chat_only_rows_needs_a_policy_like_the_direct_merge(triple, tmp_path, capsys):
    """CP and chat both have 2 extra rows (same shape), but they are different tokens."""
    t = triple
    assert (
        _cli(
            ["extract", "--base", str(t.base), "--chat", str(t.chat), "--out", str(tmp_path / "vec"), "--workers", "0"]
        )[0]
        == 0
    )
    capsys.readouterr()
    code, _ = _cli(
        ["merge", "--cp", str(t.cp), "--vector", str(tmp_path / "vec"), "--out", str(tmp_path / "m"), "--workers", "0"]
    )
    assert code == 2 and "no embeddings policy" in capsys.readouterr().err
    code, _ = _cli(
        [
            "merge",
            "--cp",
            str(t.cp),
            "--base",
            str(t.base),
            "--chat",
            str(t.chat),
            "--out",
            str(tmp_path / "m"),
            "--workers",
            "0",
        ]
    )
    assert code == 2 and "no embeddings policy" in capsys.readouterr().err
