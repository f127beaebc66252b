"""Merged tensors against an independent float64 computation, on three real tiny architectures."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from merge_ref import assert_close_to_reference, load_tensors, reference_merge

ARCHS = ["llama", "qwen2", "mistral"]  # untied; tied + attention biases; sliding-window family


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    from chatvec.demo.tiny import build_model_dir, build_triple

    root = tmp_path_factory.mktemp("triples")
    out = {arch: build_triple(root / arch, arch, seed=len(arch)) for arch in ARCHS}
    # a second chat model of the llama family for two-vector recipes
    out["llama_chat2"] = build_model_dir(root / "llama_chat2", "llama", seed=7, init_from=out["llama"].base, noise=0.03)
    return out


def _merge(recipe, out: Path, **kw):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.plan import build_plan

    plan = build_plan(recipe, shard_size=kw.pop("shard_size", 60_000))
    return plan, run_merge_job(plan, str(out), progress=False, **kw)


def _recipe(t, ratio=1.0, **kw):
    from chatvec.merge.recipe import Recipe, VectorSpec

    return Recipe(cp=str(t.cp), vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), ratio=ratio)], **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_every_tensor_matches_float64_reference(triples, tmp_path, arch, ratio):
    t = triples[arch]
    plan, summary = _merge(_recipe(t, ratio), tmp_path / "out")
    assert summary.shards_written == len(plan.shards) > 1 and not summary.cached
    cp, base, chat = load_tensors(t.cp), load_tensors(t.base), load_tensors(t.chat)
    out = load_tensors(tmp_path / "out")
    assert set(out) == set(cp)
    if arch == "qwen2":
        assert "lm_head.weight" not in out and any(n.endswith("q_proj.bias") for n in out)
    for name, (ref, mag, dtype) in reference_merge(cp, [(ratio, base, chat)]).items():
        assert out[name].dtype == dtype
        assert_close_to_reference(out[name], ref, mag, name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_output_dtype_is_cast_once(triples, tmp_path, dtype):
    t = triples["llama"]
    _merge(_recipe(t, 0.5, dtype=dtype), tmp_path / "out")
    cp, base, chat = load_tensors(t.cp), load_tensors(t.base), load_tensors(t.chat)
    out = load_tensors(tmp_path / "out")
    want = getattr(torch, dtype)
    for name, (ref, mag, _d) in reference_merge(cp, [(0.5, base, chat)], want).items():
        assert out[name].dtype == want
        assert_close_to_reference(out[name], ref, mag, name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == dtype


def test_two_vectors_with_their_own_ratios(triples, tmp_path):
    from chatvec.merge.recipe import Recipe, VectorSpec

    t = triples["llama"]
    chat2 = triples["llama_chat2"]
    recipe = Recipe(
        cp=str(t.cp),
        vectors=[
            VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.5),
            VectorSpec(base=str(t.base), chat=str(chat2), ratio=0.25),
        ],
    )
    _merge(recipe, tmp_path / "out")
    cp, base, chat, c2 = (load_tensors(p) for p in (t.cp, t.base, t.chat, chat2))
    out = load_tensors(tmp_path / "out")
    for name, (ref, mag, _d) in reference_merge(cp, [(0.5, base, chat), (0.25, base, c2)]).items():
        assert_close_to_reference(out[name], ref, mag, name)


def test_merged_model_loads_and_generates_with_chat_template(triples, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = triples["qwen2"]
    _merge(_recipe(t, 0.5), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "今天天氣很好"}], tokenize=False, add_generation_prompt=True
    )
    assert "### Assistant (chat):" in prompt  # the chat model's template, not the CP model's
    ids = tok(prompt, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    # the weights transformers loaded are the ones chatvec wrote
    written = load_tensors(tmp_path / "out")
    assert torch.equal(model.model.embed_tokens.weight, written["model.embed_tokens.weight"])
    manifest = json.loads((tmp_path / "out" / "chatvec_manifest.json").read_text())
    for rel, info in manifest["files"].items():
        assert (tmp_path / "out" / rel).stat().st_size == info["size"]


def test_torch_backend_gives_the_same_bytes_as_numpy(triples, tmp_path):
    t = triples["mistral"]
    _merge(_recipe(t, 0.5), tmp_path / "np", device="cpu")
    _merge(_recipe(t, 0.5), tmp_path / "torch", device="torch-cpu")
    shards = sorted(p.name for p in (tmp_path / "np").glob("*.safetensors"))
    assert shards and all(filecmp.cmp(tmp_path / "np" / s, tmp_path / "torch" / s, shallow=False) for s in shards)


def test_dare_with_density_one_is_add(triples, tmp_path):
    from chatvec.merge.recipe import Recipe, VectorSpec

    t = triples["llama"]
    _merge(_recipe(t, 0.5), tmp_path / "add")
    dare = Recipe(
        cp=str(t.cp),
        vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.5, method="dare", density=1.0, seed=3)],
    )
    _merge(dare, tmp_path / "dare")
    shards = sorted(p.name for p in (tmp_path / "add").glob("*.safetensors"))
    assert shards and all(filecmp.cmp(tmp_path / "add" / s, tmp_path / "dare" / s, shallow=False) for s in shards)


def test_single_file_inputs_and_one_output_shard(tmp_path):
    from chatvec.demo.tiny import build_triple

    t = build_triple(tmp_path / "in", "llama", shard_size=None, seed=5)
    assert (t.cp / "model.safetensors").exists()
    plan, _ = _merge(_recipe(t), tmp_path / "out", shard_size=10**9)
    assert len(plan.shards) == 1
    cp, base, chat = load_tensors(t.cp), load_tensors(t.base), load_tensors(t.chat)
    out = load_tensors(tmp_path / "out")
    for name, (ref, mag, _d) in reference_merge(cp, [(1.0, base, chat)]).items():
        assert_close_to_reference(out[name], ref, mag, name)


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties"])
def test_torch_backend_gives_the_same_bytes_as_numpy_for_each_method(triples, tmp_path, method):
    from chatvec.merge.recipe import Recipe, VectorSpec

    t = triples["llama"]
    recipe = Recipe(
        cp=str(t.cp),
        vectors=[
            VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.7, method=method, density=0.4, seed=2),
            VectorSpec(base=str(t.base), chat=str(t.cp), ratio=-0.3, method=method, density=0.6, seed=2),
        ],
    )
    _merge(recipe, tmp_path / "np", device="cpu")
    _merge(recipe, tmp_path / "torch", device="torch-cpu")
    shards = sorted(p.name for p in (tmp_path / "np").glob("*.safetensors"))
    assert shards and all(filecmp.cmp(tmp_path / "np" / s, tmp_path / "torch" / s, shallow=False) for s in shards)
