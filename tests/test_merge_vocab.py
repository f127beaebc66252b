"""CP models with extra vocabulary: the three embedding policies, chat-only tokens, tied heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_ref import assert_close_to_reference, load_tensors, reference_merge

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from chatvec.demo.tiny import build_model_dir, build_triple

    root = tmp_path_factory.mktemp("vocab")
    out = {
        "qwen2": build_triple(root / "qwen2", "qwen2", cp_extra_tokens=3, chat_extra_tokens=2, seed=11),
        "llama": build_triple(root / "llama", "llama", cp_extra_tokens=2, chat_extra_tokens=2, seed=12),
    }
    # a CP model that already has one of the chat model's special tokens
    out["cp_with_chat_token"] = build_model_dir(
        root / "cp_tok",
        "llama",
        seed=13,
        init_from=out["llama"].base,
        noise=0.02,
        extra_tokens=["<|chat_1|>", "語彙"],
    )
    out["cp_swapped"] = _swap_tokens(out["llama"].cp, root / "cp_swapped", 10, 20)
    return out


def _swap_tokens(src: Path, dst: Path, a: int, b: int) -> Path:
    """A copy of `src` whose tokens a and b (and their embedding rows) trade places."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ta = next(t for t, i in vocab.items() if i == a)
    tb = next(t for t, i in vocab.items() if i == b)
    vocab[ta], vocab[tb] = b, a
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    tensors = load_tensors(src)
    for name in VOCAB:
        if name in tensors:
            w = tensors[name].clone()
            w[[a, b]] = w[[b, a]]
            tensors[name] = w
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _merge(cp, base, chat, out, **kw):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    recipe = Recipe(cp=str(cp), vectors=[VectorSpec(base=str(base), chat=str(chat), ratio=kw.pop("ratio", 1.0))], **kw)
    plan = build_plan(recipe, shard_size=80_000)
    run_merge_job(plan, str(out), progress=False)
    return plan


def _expected_vocab_rows(cp_w, base_w, chat_w, cp_vocab, base_vocab, chat_vocab, ratio, by):
    """float64 reference of an embedding matrix: which CP row gets which (chat - base) row."""
    ref = cp_w.to(torch.float64).clone()
    mag = cp_w.to(torch.float64).abs()
    inv_cp = {i: t for t, i in cp_vocab.items()}
    for row in range(cp_w.shape[0]):
        tok = inv_cp.get(row)
        if by == "index":
            src = row if row < min(base_w.shape[0], chat_w.shape[0]) else None
            b = c = src
        else:
            b, c = base_vocab.get(tok), chat_vocab.get(tok)
            if b is None or c is None:
                b = c = None
        if b is not None:
            h, bb = chat_w[c].to(torch.float64), base_w[b].to(torch.float64)
            ref[row] += ratio * (h - bb)
            mag[row] += abs(ratio) * (h.abs() + bb.abs())
    return ref, mag


def _check(out_dir, cp, base, chat, ratio, by, vocab_names):
    cp_t, base_t, chat_t = load_tensors(cp), load_tensors(base), load_tensors(chat)
    out = load_tensors(out_dir)
    cpv, bv, chv = _vocab(cp), _vocab(base), _vocab(chat)
    others = {n: v for n, v in cp_t.items() if n not in vocab_names}
    for name, (ref, mag, _d) in reference_merge(others, [(ratio, base_t, chat_t)]).items():
        assert_close_to_reference(out[name], ref, mag, name)
    for name in vocab_names:
        if by == "skip":
            assert torch.equal(out[name], cp_t[name]), name
            continue
        ref, mag = _expected_vocab_rows(cp_t[name], base_t[name], chat_t[name], cpv, bv, chv, ratio, by)
        assert_close_to_reference(out[name][: ref.shape[0]], ref, mag, name)
    return out


def test_no_policy_is_refused_naming_tensors_and_policies(models, tmp_path):
    from chatvec.core.errors import PlanError

    t = models["llama"]
    with pytest.raises(PlanError) as err:
        _merge(t.cp, t.base, t.chat, tmp_path / "out")
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and "lm_head.weight" in msg
    assert "skip" in msg and "overlap" in msg and "by-token" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch,names", [("llama", VOCAB), ("qwen2", VOCAB[:1])])
@pytest.mark.parametrize("policy,by", [("skip", "skip"), ("overlap", "index"), ("by-token", "token")])
def test_policies(models, tmp_path, arch, names, policy, by):
    t = models[arch]
    _merge(t.cp, t.base, t.chat, tmp_path / "out", ratio=0.5, embeddings=policy)
    out = _check(tmp_path / "out", t.cp, t.base, t.chat, 0.5, by, names)
    if arch == "qwen2":
        assert "lm_head.weight" not in out  # tied: one matrix serves both ends


def test_overlap_checks_the_prefix_and_by_token_follows_strings(models, tmp_path):
    from chatvec.core.errors import PlanError

    t = models["llama"]
    swapped = models["cp_swapped"]
    with pytest.raises(PlanError) as err:
        _merge(swapped, t.base, t.chat, tmp_path / "bad", embeddings="overlap")
    assert "at id 10" in str(err.value) and "by-token" in str(err.value)
    _merge(swapped, t.base, t.chat, tmp_path / "out", embeddings="by-token")
    _check(tmp_path / "out", swapped, t.base, t.chat, 1.0, "token", VOCAB)


def test_chat_only_tokens_are_appended_to_the_output_vocabulary(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = models["llama"]
    plan = _merge(t.cp, t.base, t.chat, tmp_path / "out", embeddings="by-token", chat_tokens_from_chat=True)
    assert plan.appended_tokens == ["<|chat_0|>", "<|chat_1|>"]
    cpv, chv = _vocab(t.cp), _vocab(t.chat)
    out = _check(tmp_path / "out", t.cp, t.base, t.chat, 1.0, "token", VOCAB)
    chat_t = load_tensors(t.chat)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for k, token in enumerate(plan.appended_tokens):
        new_id = len(cpv) + k
        assert tok.convert_tokens_to_ids(token) == new_id
        for name in VOCAB:
            assert torch.equal(out[name][new_id], chat_t[name][chv[token]])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tok) == len(cpv) + 2
    ids = tok("<|chat_0|> hello", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == len(cpv)
    model.generate(**ids, max_new_tokens=2, do_sample=False)


def test_chat_only_token_the_cp_has_takes_the_chat_row(models, tmp_path):
    t = models["llama"]
    cp = models["cp_with_chat_token"]
    plan = _merge(cp, t.base, t.chat, tmp_path / "out", embeddings="by-token", chat_tokens_from_chat=True)
    assert plan.appended_tokens == ["<|chat_0|>"]
    cpv, chv = _vocab(cp), _vocab(t.chat)
    out, chat_t = load_tensors(tmp_path / "out"), load_tensors(t.chat)
    for name in VOCAB:
        assert torch.equal(out[name][cpv["<|chat_1|>"]], chat_t[name][chv["<|chat_1|>"]])
        assert torch.equal(out[name][len(cpv)], chat_t[name][chv["<|chat_0|>"]])
        assert out[name].shape[0] == len(cpv) + 1
