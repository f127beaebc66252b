"""`--mergekit-config`: mergekit's formulas, checked against those formulas written out here with
torch on small hand-made tensors (dare's drop follows chatvec's documented rule on both sides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from merge_ref import load_tensors

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}
BASE = [[1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 1.0, -2.0]]
TAU1 = [[3.0, -1.0, 0.5, -4.0], [2.0, 2.5, -2.25, 1.25]]
TAU2 = [[-1.0, -2.0, 1.0, 4.5], [-3.0, 1.0, 1.5, 0.75]]


def _ckpt(folder: Path, w: torch.Tensor) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {"w": w.contiguous(), "ids": torch.arange(3)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return str(folder)


@pytest.fixture
def models(tmp_path):
    base = torch.tensor(BASE)
    return {
        "base": _ckpt(tmp_path / "base", base),
        "m1": _ckpt(tmp_path / "m1", base + torch.tensor(TAU1)),
        "m2": _ckpt(tmp_path / "m2", base + torch.tensor(TAU2)),
        "root": tmp_path,
    }


def _run(models, method: str, entries: list[dict], parameters: dict | None = None, name: str = "out"):
    from merge.mergekit_config import load_mergekit_config
    from merge.pipeline import merge_local
    from merge.plan import build_plan

    config = {
        "merge_method": method,
        "base_model": models["base"],
        "dtype": "float32",
        "models": [{"model": models[e.pop("model")], "parameters": e} for e in entries],
    }
    if parameters:
        config["parameters"] = parameters
    path = models["root"] / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    merge_local(build_plan(load_mergekit_config(str(path))), str(models["root"] / name), progress=False)
    return load_tensors(models["root"] / name)


def _keep(vector: int, density: float) -> torch.Tensor:
    from test_merge_methods import _splitmix_keep

    return torch.tensor(_splitmix_keep(0, "w", vector, 8, density), dtype=torch.float32).reshape(2, 4)


def _reference(
    deltas, weights, *, density=None, sparsify=None, rescale=False, consensus=False, normalize=False, lam=1.0
) -> torch.Tensor:
    """mergekit's generalized task arithmetic, step by step, in float32."""
    out = []
    for i, d in enumerate(deltas):
        d = torch.tensor(d)
        if sparsify == "magnitude":
            k = int(density * d.numel())
            mask = torch.zeros_like(d)
            mask.view(-1)[torch.topk(d.abs().view(-1), k).indices] = 1
            d = d * mask
        elif sparsify == "random":
            d = d * _keep(i, density)
            if rescale:
                d = d / density
        out.append(d)
    stacked = torch.stack(out)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1)
    weighted = stacked * w
    if consensus:
        majority = (weighted.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        mask = (weighted.sign() == majority).to(torch.float32)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return torch.tensor(BASE) + mixed


def test_task_arithmetic(models):
    out = _run(models, "task_arithmetic", [{"model": "m1", "weight": 1.0}, {"model": "m2", "weight": 0.5}])
    assert torch.equal(out["w"], _reference([TAU1, TAU2], [1.0, 0.5]))
    assert torch.equal(out["ids"], torch.arange(3))


def test_task_arithmetic_normalized_and_scaled(models):
    out = _run(
        models,
        "task_arithmetic",
        [{"model": "m1", "weight": 0.3}, {"model": "m2", "weight": 0.45}],
        {"normalize": True, "lambda": 0.7},
    )
    want = _reference([TAU1, TAU2], [0.3, 0.45], normalize=True, lam=0.7)
    assert torch.equal(out["w"], want)
    assert not torch.equal(want, _reference([TAU1, TAU2], [0.3, 0.45]))


def test_ties_trims_int_density_n_elects_and_divides_by_the_agreeing_weights(models):
    out = _run(
        models, "ties", [{"model": "m1", "weight": 1.0, "density": 0.5}, {"model": "m2", "weight": 0.5, "density": 0.5}]
    )
    want = _reference([TAU1, TAU2], [1.0, 0.5], density=0.5, sparsify="magnitude", consensus=True, normalize=True)
    assert torch.equal(out["w"], want)


def test_dare_ties_and_dare_linear(models):
    entries = [{"model": "m1", "weight": 1.0, "density": 0.5}, {"model": "m2", "weight": 0.5, "density": 0.5}]
    out = _run(models, "dare_ties", [dict(e) for e in entries], name="ties")
    want = _reference([TAU1, TAU2], [1.0, 0.5], density=0.5, sparsify="random", rescale=True, consensus=True)
    assert torch.equal(out["w"], want)
    out = _run(models, "dare_linear", [dict(e) for e in entries], {"rescale": False}, name="linear")
    assert torch.equal(out["w"], _reference([TAU1, TAU2], [1.0, 0.5], density=0.5, sparsify="random"))


def test_the_manifest_names_the_mode_and_base_model_entries_are_skipped(models):
    _run(models, "task_arithmetic", [{"model": "base", "weight": 3.0}, {"model": "m1", "weight": 1.0}])
    manifest = json.loads((models["root"] / "out" / "chatvec_manifest.json").read_text())
    assert manifest["mode"] == "mergekit task_arithmetic"
    assert manifest["recipe"]["mergekit"]["method"] == "task_arithmetic"
    assert torch.equal(load_tensors(models["root"] / "out")["w"], _reference([TAU1], [1.0]))


def test_bad_configs_say_what_to_fix(models, tmp_path):
    from merge.errors import ConfigError
    from merge.mergekit_config import load_mergekit_config

    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": models["base"],
                "models": [{"model": models["m1"], "parameters": {"weight": 1}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="merge_method"):
        load_mergekit_config(str(bad))
    bad.write_text(
        yaml.safe_dump({"merge_method": "ties", "base_model": models["base"], "models": [{"model": models["m1"]}]})
    )
    with pytest.raises(ConfigError, match="no weight"):
        load_mergekit_config(str(bad))


def test_cli_runs_a_mergekit_config(models):
    from click.testing import CliRunner

    from cluster.cli import cli

    path = models["root"] / "cli.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": models["base"],
                "dtype": "float32",
                "models": [{"model": models["m1"], "parameters": {"weight": 0.5}}],
            }
        )
    )
    out = models["root"] / "cli-out"
    result = CliRunner().invoke(cli, ["merge", "--mergekit-config", str(path), "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_tensors(out)["w"], _reference([TAU1], [0.5]))
    clash = CliRunner().invoke(cli, ["merge", "--mergekit-config", str(path), "--ratio", "1", "--out", str(out)])
    assert clash.exit_code != 0 and "--ratio" in str(clash.exception)
