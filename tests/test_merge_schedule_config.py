"""Schedules as configuration: the forms a recipe, a mergekit config and a sweep file accept, the
errors they give, depth and layer counts, and fingerprints of scalar recipes that do not move."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from chatvec.core.errors import ConfigError, PlanError

ROOT = Path(__file__).resolve().parents[1]


def _recipe(ratio=1.0, **kw):
    from chatvec.merge.recipe import Recipe, VectorSpec

    vec = VectorSpec(base="s3://bucket/base", chat="s3://bucket/chat", ratio=ratio, **kw)
    return Recipe(cp="s3://bucket/cp", vectors=[vec])


def _sha(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def test_scalar_recipes_keep_their_fingerprint():
    from chatvec.merge.recipe import Recipe, VectorSpec

    recipe = Recipe(
        cp="s3://bucket/cp",
        vectors=[
            VectorSpec(base="s3://bucket/base", chat="s3://bucket/chat", ratio=0.5),
            VectorSpec(vector="s3://bucket/vec", ratio=1, method="dare", density=0.9, seed=3),
        ],
        embeddings="skip",
        dtype="bfloat16",
    )
    # computed with the recipe code before schedules existed
    assert _sha(recipe.fingerprint_payload()) == "647aa25bd2545da9b1a9ec6901faa91c8f9bd175c96c74654945866aadbe1696"
    assert recipe.describe() == (
        "s3://bucket/cp + 0.5 x (s3://bucket/chat - s3://bucket/base) + 1 x (s3://bucket/vec, dare density 0.9 seed 3)"
    )
    # {default: x} is x
    assert _recipe({"default": 0.5}).fingerprint_payload() == _recipe(0.5).fingerprint_payload()


def test_schedules_in_the_fingerprint_keep_their_order():
    a = _recipe({"self_attn": 0.5, "q_proj": 1.0, "default": 1.0})
    b = _recipe({"q_proj": 1.0, "self_attn": 0.5, "default": 1.0})
    assert a.fingerprint_payload()["vectors"][0]["ratio"] == {
        "groups": [["self_attn", 0.5], ["q_proj", 1.0]],
        "default": 1.0,
    }
    assert _sha(a.fingerprint_payload()) != _sha(b.fingerprint_payload())
    assert _sha(_recipe([0.5, 1.0]).fingerprint_payload()) != _sha(_recipe([0.5, 1.0, 1.0]).fingerprint_payload())
    assert _recipe([0.2, 1, 0.4], method="ties", density={"mlp": 0.5, "default": 1}).vectors[0].describe() == (
        "[0.2, 1, 0.4] x (s3://bucket/chat - s3://bucket/base, ties density {mlp: 0.5, default: 1} seed 0)"
    )


@pytest.mark.parametrize(
    "ratio, message",
    [
        ("[]", "empty list"),
        ("{}", "empty mapping"),
        ("[0.5, .nan]", "not a finite number"),
        ("[0.5, abc]", "'abc' is not a number"),
        ("{self_attn: {q: 1}}", "not a mapping"),
        ("{1: 0.5, default: 1}", "not a name pattern"),
    ],
)
def test_bad_ratio_values_name_the_key_and_line(tmp_path, ratio, message):
    from chatvec.merge.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"cp: /m/cp\nvectors:\n  - base: /m/base\n    chat: /m/chat\n    ratio: {ratio}\n")
    with pytest.raises(ConfigError, match="line 5") as err:
        load_recipe(str(path))
    assert "vectors.0.ratio" in str(err.value) and message in str(err.value)


def test_density_schedule_values_are_checked(tmp_path):
    from chatvec.merge.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("cp: /m/cp\nvectors:\n  - {base: /m/b, chat: /m/c, method: ties, density: [0.5, 1.5]}\n")
    with pytest.raises(ConfigError, match="must be at most 1"):
        load_recipe(str(path))


def test_layer_of_and_layer_counts():
    from chatvec.merge.schedule import Depth, layer_of, module_groups, num_layers

    assert layer_of("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("transformer.blocks.7.ffn.up_proj.weight") == 7
    assert layer_of("bert.encoder.layer.2.output.dense.weight") == 2
    assert layer_of("model.decoder.layers.5.fc1.weight") == 5
    assert layer_of("encoder.block.1.layer.0.SelfAttention.q.weight") == 1  # the first index found
    assert layer_of("model.layers.3.mlp.experts.7.w1.weight") == 3
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None
    assert num_layers({"num_hidden_layers": 32}) == 32 and num_layers({"n_layer": 12}) == 12
    assert num_layers({"text_config": {"num_hidden_layers": 26}, "vision_config": {"num_hidden_layers": 27}}) == 26
    assert num_layers({}) is None and num_layers(None) is None
    names = [f"model.layers.{i}.mlp.w" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    names += [f"vision.encoder.layers.{i}.attn.w" for i in range(3)]
    depth = Depth(names, {"num_hidden_layers": 5})
    assert [depth.t(f"model.layers.{i}.mlp.w") for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [depth.t(f"vision.encoder.layers.{i}.attn.w") for i in range(3)] == [0.0, 0.5, 1.0]  # its own stack
    assert depth.t("model.embed_tokens.weight") == 0.0 and depth.t("lm_head.weight") == 1.0
    assert Depth(names[:5], None).t("model.layers.2.mlp.w") == 0.5  # no config: the largest index + 1
    assert Depth(["model.layers.0.w"], {"num_hidden_layers": 1}).t("model.layers.0.w") == 1.0  # as mergekit
    assert module_groups(names) == ["mlp", "attn", "embed_tokens", "lm_head"]


def test_gradient_matches_mergekit_convention():
    from chatvec.merge.schedule import gradient_at

    assert gradient_at((0.2, 1.0, 0.4), 0.0) == 0.2 and gradient_at((0.2, 1.0, 0.4), 1.0) == 0.4
    assert gradient_at((0.2, 1.0, 0.4), 0.5) == 1.0
    assert gradient_at((0.0, 1.0), 1 / 3) == pytest.approx(1 / 3)
    assert gradient_at((0.7,), 0.4) == 0.7


def _hand_model(folder: Path, names: list[str], config: dict) -> str:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({n: torch.ones(2, 2) for n in names}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def tied(tmp_path):
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    names += ["model.embed_tokens.weight", "model.norm.weight"]
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}
    return {r: _hand_model(tmp_path / r, names, config) for r in ("cp", "base", "chat")}


def test_every_schedule_problem_in_one_plan_error(tied):
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    vectors = [
        VectorSpec(base=tied["base"], chat=tied["chat"], ratio={"self_atn": 1, "lm_head": 0, "mlp": 1}),
        VectorSpec(base=tied["base"], chat=tied["chat"], method="ties", density={"q_proj": 0.5, "default": 1}),
    ]
    with pytest.raises(PlanError) as err:
        build_plan(Recipe(cp=tied["cp"], vectors=vectors))
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert "vector 1 ratio: group 'self_atn' matches no tensor of the CP model" in problems[0]
    assert "module groups are mlp, self_attn, embed_tokens, norm" in problems[0]
    assert "ties its LM head to the input embeddings" in problems[1]
    assert "4 tensor(s) match no group and there is no `default`: self_attn, embed_tokens, norm" in problems[2]


def test_mergekit_settings_become_schedules(tmp_path):
    from chatvec.merge.mergekit_config import load_mergekit_config

    def load(models: list[dict], parameters: dict | None = None, method: str = "ties"):
        config = {"merge_method": method, "base_model": "/m/base", "models": models}
        if parameters:
            config["parameters"] = parameters
        path = tmp_path / "mk.yml"
        path.write_text(yaml.safe_dump(config))
        return load_mergekit_config(str(path))

    scalar = load([{"model": "/m/chat", "parameters": {"weight": 0.5, "density": 0.9}}])
    assert (scalar.vectors[0].ratio, scalar.vectors[0].density) == (0.5, 0.9)  # as before schedules
    grad = load([{"model": "/m/chat", "parameters": {"weight": [0.2, 1.0], "density": [0.5, 1.0]}}])
    assert (grad.vectors[0].ratio, grad.vectors[0].density) == ((0.2, 1.0), (0.5, 1.0))
    cond = load(
        [{"model": "/m/chat", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}],
        {"weight": [{"filter": "self_attn", "value": [0.1, 0.2]}, {"filter": "*", "value": 0.3}, {"value": 9}]},
    )
    assert cond.vectors[0].model_dump()["ratio"] == {"mlp": 1.0, "self_attn": [0.1, 0.2], "default": 0.3}
    # density falls back to mergekit's default 1; weight has none: tensors no filter names are a plan error
    only = load([{"model": "/m/chat", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}])
    assert only.vectors[0].model_dump()["ratio"] == {"mlp": 1.0} and only.vectors[0].density == 1.0
    with pytest.raises(ConfigError, match="density: 1.5 must be at most 1"):
        load([{"model": "/m/chat", "parameters": {"weight": 1, "density": [0.5, 1.5]}}])


SWEEP = """\
name: t
vectors:
  v1: {base: /m/base, chat: /m/chat}
targets:
  - language: zh-Hant
    cp: /m/cp
    benchmarks: [chat]
"""


def _sweep(text: str):
    from chatvec.core.yamlconfig import parse_model
    from chatvec.runs.sweep import Sweep

    return parse_model(textwrap.dedent(SWEEP + text), Sweep, "sweep.yaml")


def test_sweep_points_may_be_schedules(tmp_path):
    from chatvec.runs.sweep import MethodDef, PlannedMerge, load_sweep, model_name

    path = tmp_path / "s.yaml"
    path.write_text(
        SWEEP + "ratios: [0.5, [0.2, 1.0, 0.4], {default: 1, self_attn: [0.5, 1, 0.5]}, {default: 1, mlp: 0}]\n"
    )
    s = load_sweep(str(path))
    assert s.ratios[0] == 0.5 and s.ratios[1] == (0.2, 1.0, 0.4)
    names = [model_name("v1", "zh-Hant", MethodDef(), r, "all", s) for r in s.ratios]
    assert names[:2] == ["v1.zh-Hant.add.r0.5", "v1.zh-Hant.add.r0.2_1_0.4"]
    assert names[2].startswith("v1.zh-Hant.add.rs-") and len(set(names)) == 4
    point = PlannedMerge(names[2], "zh-Hant", "zh-Hant", "v1", s.ratios[2], "add", "all", recipe=None)
    assert point.info()["ratio"] is None and point.info()["schedule"] == "{self_attn: [0.5, 1, 0.5], default: 1}"
    target = "  - {language: ko, cp: /m/cp, benchmarks: [chat], ratios: [[0.5, 1]]}\n"
    assert _sweep(target).targets[1].ratios == [(0.5, 1.0)]


@pytest.mark.parametrize(
    "text",
    [
        "ratios: [[0.2, 1.0], [0.2, 1.0]]\n",  # twice
        "ratios: [[0.0, 0.0]]\n",  # the CP model
        "ratios: [{default: 1, mlp: -0.5}]\n",
        "ratios: [[0.2, x]]\n",
    ],
)
def test_bad_sweep_schedules(text):
    with pytest.raises(ConfigError, match="ratios"):
        _sweep(text)


def test_layer_swap_example_parses():
    from chatvec.merge.recipe import load_recipe
    from chatvec.merge.schedule import Depth, Resolver

    recipe = load_recipe(str(ROOT / "examples" / "layer_swap.yaml"))
    ratio = recipe.vectors[0].ratio
    names = [f"model.layers.{i}.mlp.w" for i in range(32)] + ["model.embed_tokens.weight", "lm_head.weight"]
    resolve = Resolver(ratio, Depth(names, {"num_hidden_layers": 32}))
    per_layer = [resolve(f"model.layers.{i}.mlp.w") for i in range(32)]
    assert per_layer[:4] == [0.0] * 4 and per_layer[-2:] == [0.0] * 2 and set(per_layer[6:28]) == {1.0}
    assert resolve("model.embed_tokens.weight") == 0.0 and resolve("lm_head.weight") == 0.0
