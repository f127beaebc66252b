"""Ratios per layer and per module (merge/schedule.py), merged and checked bit for bit against
results computed here from the inputs with torch in float32 and cast once: on every architecture
the tests build, with add, ties and dare, mergekit's gradient form, and the `--ratio` forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from merge_ref import load_tensors

# architecture -> (config class, model class, extra config, decoder layers' prefix, input embedding)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "model.layers.", "model.embed_tokens.weight"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "model.layers.", None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, "model.layers.", None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, "model.layers.", None),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
        },
        "model.layers.",
        None,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16, "head_dim": 16},
        "model.layers.",
        None,
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, "model.layers.", None),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, "model.layers.", None),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "model.layers.", None),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 2, "num_experts_per_tok": 1},
        "model.layers.",
        None,
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "model.layers.", None),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, "gpt_neox.layers.", "gpt_neox.embed_in.weight"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}, "model.layers.", None),
}
LAYERS = 4
# the same schedule on every architecture (module names differ: Mixtral's checkpoints say
# block_sparse_moe where others say mlp): one module by its own gradient, layer 1 left out, the
# rest by another gradient
SCHEDULE = {"post_attention_layernorm": [1.0, 0.5], "layers.1.": 0, "default": [0.2, 1.0, 0.4]}


def mergekit_value(points: list[float], t: float) -> float:
    """mergekit's gradient (mergekit/config.py evaluate_setting), written out."""
    scaled = t * (len(points) - 1)
    i0 = math.floor(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


def expected_ratio(schedule, name: str, layer: int | None, n: int, embedding: bool) -> float:
    if isinstance(schedule, dict):
        schedule = next((v for k, v in schedule.items() if k != "default" and k in name), schedule.get("default"))
    if not isinstance(schedule, list):
        return float(schedule)
    t = (0.0 if embedding else 1.0) if layer is None else layer / (n - 1)
    return mergekit_value(schedule, t)


def expected_add(cp: torch.Tensor, pairs: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """CP + sum ratio * (chat - base) as chatvec's kernels do it: float32, each step rounded, one cast."""
    acc = cp.float()
    for ratio, base, chat in pairs:
        if ratio == 0.0:
            continue
        acc = acc + (chat.float() - base.float()) * torch.tensor(ratio, dtype=torch.float32)
    return acc.to(cp.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _arch_triple(root: Path, arch: str) -> dict[str, Path]:
    """base (seeded random), chat and cp (base + two different noises), bfloat16, sharded."""
    import transformers

    config_name, model_name, extra, _prefix, _emb = ARCHS[arch]
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = getattr(transformers, config_name)(**{**kwargs, **extra})
    torch.manual_seed(len(arch))
    model = getattr(transformers, model_name)(config)
    params = dict(model.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    out = {}
    for role, noise_seed in (("base", None), ("chat", 1), ("cp", 2)):
        gen = torch.Generator().manual_seed(noise_seed or 0)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k] + (torch.randn(p.shape, generator=gen) * 0.02 if noise_seed else 0.0))
        model.to(torch.bfloat16).save_pretrained(root / role, max_shard_size="20KB")
        model.to(torch.float32)
        out[role] = root / role
    return out


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-archs")
    return {arch: _arch_triple(root / arch, arch) for arch in ARCHS}


def _merge(recipe, out: Path):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.plan import build_plan

    plan = build_plan(recipe, shard_size=40_000)
    run_merge_job(plan, str(out), progress=False)
    return plan, load_tensors(out)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_layer_by_layer(archs, tmp_path, arch):
    from chatvec.merge.recipe import Recipe, VectorSpec
    from chatvec.merge.schedule import layer_of

    m = archs[arch]
    _c, _m, _x, prefix, embedding = ARCHS[arch]
    embedding = embedding or "model.embed_tokens.weight"
    recipe = Recipe(cp=str(m["cp"]), vectors=[VectorSpec(base=str(m["base"]), chat=str(m["chat"]), ratio=SCHEDULE)])
    plan, out = _merge(recipe, tmp_path / "out")
    cp, base, chat = load_tensors(m["cp"]), load_tensors(m["base"]), load_tensors(m["chat"])
    assert len(plan.shards) > 1 and set(out) == set(cp)
    layers_seen = set()
    for name, c in cp.items():
        layer = int(name[len(prefix) :].split(".")[0]) if name.startswith(prefix) else None
        assert layer_of(name) == layer, name
        layers_seen.add(layer)
        ratio = expected_ratio(SCHEDULE, name, layer, LAYERS, name == embedding)
        assert [t.ratio for t in plan.tasks[name].terms] == ([ratio] if ratio else []), name
        assert torch.equal(bits(out[name]), bits(expected_add(c, [(ratio, base[name], chat[name])]))), name
    assert layers_seen == {None, *range(LAYERS)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("sched-llama"), "llama", seed=5, layers=3)


def test_groups_and_zero_ratio_keep_the_cp_bytes(llama, tmp_path):
    from chatvec.merge.recipe import Recipe, VectorSpec

    ratio = {"self_attn": [0.5, 1.0, 0.5], "layers.1.": 0.25, "embed_tokens": 0, "lm_head": 0, "default": 1.5}
    spec = VectorSpec(base=str(llama.base), chat=str(llama.chat), ratio=ratio)
    plan, out = _merge(Recipe(cp=str(llama.cp), vectors=[spec]), tmp_path / "out")
    cp, base, chat = load_tensors(llama.cp), load_tensors(llama.base), load_tensors(llama.chat)
    assert not plan.tasks["model.embed_tokens.weight"].terms and not plan.tasks["lm_head.weight"].terms
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(bits(out[name]), bits(cp[name]))
    checked = {
        "model.layers.0.self_attn.q_proj.weight": 0.5,
        "model.layers.1.self_attn.q_proj.weight": 1.0,  # self_attn comes first in the mapping
        "model.layers.1.mlp.up_proj.weight": 0.25,
        "model.layers.2.mlp.up_proj.weight": 1.5,
        "model.norm.weight": 1.5,
    }
    for name, c in cp.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        r = expected_ratio(ratio, name, layer, 3, name == "model.embed_tokens.weight")
        assert checked.get(name, r) == r
        assert torch.equal(bits(out[name]), bits(expected_add(c, [(r, base[name], chat[name])]))), name
    manifest = json.loads((tmp_path / "out" / "chatvec_manifest.json").read_text())
    assert manifest["recipe"]["vectors"][0]["ratio"]["groups"][0] == ["self_attn", [0.5, 1.0, 0.5]]
    assert "{self_attn: [0.5, 1, 0.5], layers.1.: 0.25" in manifest["recipe_text"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ratio {self_attn: [0.5, 1, 0.5]" in card and "i / (n - 1)" in card


# -- ties and dare on small hand-made layers -------------------------------------------------------
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}
TAU1 = torch.tensor([[3.0, -1.0, 0.5, -4.0], [2.0, 2.0, -2.0, 1.0]])
TAU2 = torch.tensor([[-1.0, -2.0, 1.0, 4.0], [-3.0, 1.0, 1.0, 0.5]])
NAMES = [f"model.layers.{i}.mlp.w" for i in range(3)]


def _ckpt(folder: Path, tensors: dict[str, torch.Tensor], config: dict = CONFIG) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def hand(tmp_path):
    scale = [1.0, 0.5, 2.0]  # a different tau per layer
    return {
        "base": _ckpt(tmp_path / "base", {n: torch.zeros(2, 4) for n in NAMES}),
        "chat1": _ckpt(tmp_path / "chat1", {n: TAU1 * s for n, s in zip(NAMES, scale)}),
        "chat2": _ckpt(tmp_path / "chat2", {n: TAU2 * s for n, s in zip(NAMES, scale)}),
        "cp": _ckpt(tmp_path / "cp", {n: torch.full((2, 4), 1.0 + i) for i, n in enumerate(NAMES)}),
        "root": tmp_path,
    }


def _hand_merge(hand, specs):
    from chatvec.merge.recipe import Recipe, VectorSpec

    vectors = [VectorSpec(base=hand["base"], chat=hand[c], **kw) for c, kw in specs]
    return _merge(Recipe(cp=hand["cp"], vectors=vectors), hand["root"] / "out")


def _ties_reference(cp: torch.Tensor, taus: list[torch.Tensor], ratios: list[float], density: float) -> torch.Tensor:
    weighted = []
    for tau, r in zip(taus, ratios):
        k = max(1, math.ceil(density * tau.numel() - 1e-9))
        threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
        weighted.append(torch.where(tau.abs() >= threshold, tau, 0.0) * torch.tensor(r, dtype=torch.float32))
    total = sum(weighted)
    agree = [(torch.sign(w) == torch.sign(total)) & (w != 0) for w in weighted]
    count = torch.clamp(sum(a.float() for a in agree), min=1)
    return cp.float() + sum(torch.where(a, w, 0.0) for a, w in zip(agree, weighted)) / count


def test_ties_with_a_gradient_and_a_group_at_zero(hand):
    # vector 1: 1, 0.75, 0.5 over the three layers; vector 2: 1 but 0 in layer 1 (left out there)
    specs = [
        ("chat1", dict(method="ties", density=0.5, ratio=[1.0, 0.5])),
        ("chat2", dict(method="ties", density=0.5, ratio={"layers.1.": 0, "default": 1})),
    ]
    plan, out = _hand_merge(hand, specs)
    assert [t.ratio for t in plan.tasks[NAMES[1]].terms] == [0.75]
    cp, t1, t2 = load_tensors(hand["cp"]), load_tensors(hand["chat1"]), load_tensors(hand["chat2"])
    for name, r1, r2 in zip(NAMES, [1.0, 0.75, 0.5], [1.0, 0.0, 1.0]):
        taus, ratios = ([t1[name], t2[name]], [r1, r2]) if r2 else ([t1[name]], [r1])
        assert torch.equal(out[name], _ties_reference(cp[name], taus, ratios, 0.5)), name


def _splitmix_keep(seed: int, name: str, vector: int, n: int, density: float) -> torch.Tensor:
    """DARE's documented drop rule (merge/kernels.py), written out."""
    import hashlib

    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}\0{vector}".encode()).digest()[:8], "little")
    mask, keep = (1 << 64) - 1, []
    for j in range(n):
        z = (key + j + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        keep.append((z >> 40) < round(density * (1 << 24)))
    return torch.tensor(keep)


def test_dare_with_ratio_and_density_schedules(hand):
    density = {"layers.2.": 1.0, "default": 0.5}
    plan, out = _hand_merge(hand, [("chat1", dict(method="dare", ratio=[0.5, 1.0], density=density, seed=3))])
    assert [(t.ratio, t.density) for t in plan.tasks[NAMES[2]].terms] == [(1.0, 1.0)]
    cp, t1 = load_tensors(hand["cp"]), load_tensors(hand["chat1"])
    for name, r, d in zip(NAMES, [0.5, 0.75, 1.0], [0.5, 0.5, 1.0]):
        tau = t1[name]
        if d < 1.0:
            tau = tau * _splitmix_keep(3, name, 0, tau.numel(), d).reshape(tau.shape)
        expected = cp[name].float() + tau * torch.tensor(r / d, dtype=torch.float32)
        assert torch.equal(out[name], expected), name


def test_mergekit_gradient_and_filters(hand):
    """mergekit's `weight: [{filter: ..., value: [gradient]}, {value: ...}]`: base + W * tau, W per tensor."""
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.mergekit_config import load_mergekit_config
    from chatvec.merge.plan import build_plan

    names = [f"model.layers.{i}.{m}.w" for i in range(4) for m in ("self_attn", "mlp")]
    names += ["model.embed_tokens.weight", "lm_head.weight"]
    config = {**CONFIG, "num_hidden_layers": 4}
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(2, 4, generator=g) for n in names}
    model = {n: b + torch.randn(2, 4, generator=g) for n, b in base.items()}
    root = hand["root"] / "mk"
    paths = {"base": _ckpt(root / "base", base, config), "m1": _ckpt(root / "m1", model, config)}
    weight = [{"filter": "self_attn", "value": [0.2, 1.0, 0.4]}, {"filter": "lm_head", "value": [0.0, 2.0]}]
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": paths["base"],
        "dtype": "float32",
        "models": [{"model": paths["base"]}, {"model": paths["m1"], "parameters": {"weight": weight}}],
        "parameters": {"weight": 0.5},  # what the model's own conditions do not cover
    }
    (root / "mk.yml").write_text(yaml.safe_dump(mk))
    recipe = load_mergekit_config(str(root / "mk.yml"))
    assert recipe.vectors[0].model_dump()["ratio"] == {
        "self_attn": [0.2, 1.0, 0.4],
        "lm_head": [0.0, 2.0],
        "default": 0.5,
    }
    run_merge_job(build_plan(recipe), str(root / "out"), progress=False)
    out = load_tensors(root / "out")
    for name in names:
        layer = int(name.split(".")[2]) if "layers" in name else None
        if "self_attn" in name:
            w = mergekit_value([0.2, 1.0, 0.4], layer / 3)
        elif name == "lm_head.weight":
            w = 2.0  # a "post" weight: mergekit evaluates it at t = 1
        else:
            w = 0.5
        expected = base[name] + (model[name] - base[name]) * torch.tensor(w, dtype=torch.float32)
        assert torch.equal(out[name], expected), name


# -- the command line ----------------------------------------------------------------------------
def _cli(args: list[str], capsys) -> tuple[int, str]:
    from chatvec.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "text, schedule",
    [
        ("0.5", 0.5),
        ("[0.2, 1.0, 0.4]", [0.2, 1.0, 0.4]),
        (
            "{default: 1, self_attn: [0.5, 1, 0.5], embed_tokens: 0}",
            {"default": 1, "self_attn": [0.5, 1, 0.5], "embed_tokens": 0},
        ),
    ],
)
def test_cli_ratio_forms(llama, tmp_path, capsys, text, schedule):
    out = tmp_path / "out"
    args = ["merge", "--cp", str(llama.cp), "--base", str(llama.base), "--chat", str(llama.chat)]
    code, err = _cli([*args, "--ratio", text, "--workers", "0", "--out", str(out)], capsys)
    assert code == 0, err
    merged = load_tensors(out)
    cp, base, chat = load_tensors(llama.cp), load_tensors(llama.base), load_tensors(llama.chat)
    for name, c in cp.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        r = expected_ratio(schedule, name, layer, 3, name == "model.embed_tokens.weight")
        assert torch.equal(bits(merged[name]), bits(expected_add(c, [(r, base[name], chat[name])]))), name


def test_cli_bad_ratio_and_unknown_group(llama, tmp_path, capsys):
    args = ["merge", "--cp", str(llama.cp), "--base", str(llama.base), "--chat", str(llama.chat), "--workers", "0"]
    code, err = _cli([*args, "--ratio", "[0.2, x]", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--ratio" in err and "'x' is not a number" in err
    code, err = _cli([*args, "--ratio", "{default: 1, self_atn: 0.5}", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "'self_atn' matches no tensor" in err
    assert "self_attn, mlp" in err or ("self_attn" in err and "mlp" in err and "lm_head" in err)
    assert not (tmp_path / "b").exists()
