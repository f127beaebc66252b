"""`--mergekit-config`: mergekit's formulas, checked against those formulas written out here with
torch, on small hand-made tensors in float32 and on random ones in bfloat16 and float16, where
torch rounds after every operation (dare's drop follows chatvec's documented rule on both sides)."""

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
    return _small_models(tmp_path)


def _run(
    models,
    method: str,
    entries: list[dict],
    parameters: dict | None = None,
    name: str = "out",
    dtype: str | None = "float32",
    device: str = "cpu",
):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.mergekit_config import load_mergekit_config
    from chatvec.merge.plan import build_plan

    config = {
        "merge_method": method,
        "base_model": models["base"],
        "models": [{"model": models[e.pop("model")], "parameters": e} for e in entries],
    }
    if dtype is not None:
        config["dtype"] = dtype
    if parameters:
        config["parameters"] = parameters
    path = models["root"] / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    plan = build_plan(load_mergekit_config(str(path)))
    run_merge_job(plan, str(models["root"] / name), device=device, progress=False)
    return load_tensors(models["root"] / name)


def _l1_rescale(tensor: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's rescaled_masked_tensor with the L1 norm, in the tensor's dtype. torch adds
    the two sums in float32 (in an order of its own); here, as chatvec does, in float64, rounded
    to the dtype (through float32): the same numbers unless a sum's last bit differs."""

    def norm(t: torch.Tensor) -> torch.Tensor:
        return t.abs().sum(dtype=torch.float64).to(torch.float32).to(t.dtype)

    before, after = norm(tensor), norm(masked)
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _reference(deltas, weights, **formula) -> torch.Tensor:
    """mergekit's (0.1.5) generalized task arithmetic, step by step, in float32, for the
    hand-made vectors added to BASE (exact in float32)."""
    base = torch.tensor(BASE)
    return _mergekit_formula(base, [base + torch.tensor(d) for d in deltas], weights, torch.float32, **formula)


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
    from chatvec.core.errors import ConfigError
    from chatvec.merge.mergekit_config import load_mergekit_config

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

    from chatvec.cli.main import cli

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


# -- bfloat16 and float16: mergekit computes every step in the config's dtype ------------------

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (torch.equal on floats would let -0 == +0 and fail on NaN)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _half_models(root: Path, dtype: torch.dtype, seed: int = 0) -> dict:
    """A base and three models of random values of mixed magnitudes, stored in `dtype`; the tensor
    (300 x 256) spans two of the numpy backend's blocks."""
    g = torch.Generator().manual_seed(seed)
    shape = (300, 256)

    def mixed(spread: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * spread)

    base = mixed(1.5).to(dtype)
    tensors = {"base": base}
    for i in (1, 2, 3):
        tensors[f"m{i}"] = (base.float() + 0.1 * mixed(1.5)).to(dtype)
    return _save_models(root, tensors)


def _distinct_tau_models(root: Path, dtype: torch.dtype, seed: int = 0) -> dict:
    """Models whose |tau| in `dtype` are all distinct, so no entry ties with a TIES threshold:
    every |tau| a different pattern of `dtype` (a few steps apart), the base smaller than it."""
    g = torch.Generator().manual_seed(seed)
    shape = (32, 48)
    n = shape[0] * shape[1]
    start, spacing = (0x3C00, 2) if dtype == torch.bfloat16 else (0x1C00, 8)
    taus = []
    for _ in range(3):
        magnitude = (start + spacing * torch.randperm(n, generator=g)).to(torch.int16).view(dtype).float()
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        taus.append((sign * magnitude).reshape(shape))
    smallest = torch.stack([t.abs() for t in taus]).min(0).values
    base = (smallest * (torch.rand(shape, generator=g) - 0.5) * 0.5).to(dtype)
    tensors = {"base": base}
    for i, tau in enumerate(taus, 1):
        tensors[f"m{i}"] = (base.float() + tau).to(dtype)
    return _save_models(root, tensors)


def _save_models(root: Path, tensors: dict) -> dict:
    models = {name: _ckpt(root / name, t) for name, t in tensors.items()}
    return {**models, "root": root, "tensors": tensors}


def _mergekit_formula(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    dtype: torch.dtype,
    *,
    density: float = 1.0,
    sparsify: str | None = None,
    rescale: bool = False,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    keep_ties: bool = False,
) -> torch.Tensor:
    """mergekit's (0.1.5) generalized task arithmetic written out with torch in `dtype`, as mergekit
    runs it on the CPU (torch rounds each operation's result to `dtype`); dare's keep mask is
    chatvec's, and the L1 rescale's sums are taken as _l1_rescale says."""
    base = base.to(dtype)
    deltas = []
    for i, x in enumerate(xs):
        delta = x.to(dtype) - base
        if sparsify == "magnitude" and density < 1:
            k = max(1, int(density * delta.numel()))
            if keep_ties:  # chatvec's rule: every entry equal to the k-th largest stays
                kth = delta.abs().view(-1).float().sort(descending=True).values[k - 1]
                mask = (delta.abs().float() >= kth).to(delta.dtype)
            else:
                mask = torch.zeros_like(delta)
                mask.view(-1)[torch.argsort(delta.abs().view(-1).float(), descending=True)[:k]] = 1
            delta = _l1_rescale(delta, delta * mask) if rescale else delta * mask
        elif sparsify == "random" and density < 1:
            # mergekit's bernoulli: bfloat16 stays bfloat16 on the CPU, float16 works in float32
            work = dtype if dtype == torch.bfloat16 else torch.float32
            keep = torch.tensor(_splitmix_keep_n(i, density, delta.numel()), dtype=work).reshape(delta.shape)
            res = delta.to(work) * keep
            if rescale:
                res = _l1_rescale(delta.to(work), res)
            delta = res.to(dtype)
        deltas.append(delta)
    deltas = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=deltas.dtype)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    weighted = deltas * w
    if consensus:
        sign = weighted.sign()
        majority = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = sign == majority
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(dtype)


def _splitmix_keep_n(vector: int, density: float, n: int) -> list[bool]:
    from test_merge_methods import _splitmix_keep

    return _splitmix_keep(0, "w", vector, n, density)


def _both(models, names: list[str], weights: list[float], dtype: torch.dtype, **kw):
    """(the formula in `dtype`, the formula in float32 rounded once to `dtype`)."""
    t = models["tensors"]
    xs = [t[n] for n in names]
    per_step = _mergekit_formula(t["base"], xs, weights, dtype, **kw)
    once = _mergekit_formula(t["base"].float(), [x.float() for x in xs], weights, torch.float32, **kw).to(dtype)
    return per_step, once


TASK_ARITHMETIC_CASES = [
    pytest.param(["m1", "m2"], [0.3, 0.7], {}, id="two-models"),
    pytest.param(
        ["m1", "m2", "m3"], [0.3, 0.45, 0.2], {"normalize": True, "lambda": 0.7}, id="three-normalized-lambda"
    ),
    pytest.param(["m1", "m2", "m3"], [1.0, -0.3, 0.6], {"lambda": 1.3}, id="three-negative-weight"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(("names", "weights", "parameters"), TASK_ARITHMETIC_CASES)
def test_half_task_arithmetic_is_mergekit_bit_for_bit(tmp_path, dtype, names, weights, parameters):
    models = _half_models(tmp_path, HALF[dtype])
    entries = [{"model": n, "weight": w} for n, w in zip(names, weights)]
    out = _run(models, "task_arithmetic", entries, parameters, dtype=dtype)["w"]
    per_step, once = _both(
        models,
        names,
        weights,
        HALF[dtype],
        normalize=parameters.get("normalize", False),
        lam=parameters.get("lambda", 1.0),
    )
    assert out.dtype == HALF[dtype]
    assert torch.equal(_bits(out), _bits(per_step))
    assert not torch.equal(_bits(per_step), _bits(once))  # rounding each step matters here


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_zero_divisor_is_replaced_only_where_torch_replaces_it(tmp_path, dtype):
    """mergekit sets divisor = 1 where |divisor| < 1e-8, compared in the dtype: 1e-8 is 0 in
    float16, so weights summing to 0 divide by 0 there (infinities and NaN), as mergekit does."""
    models = _half_models(tmp_path, HALF[dtype], seed=5)
    entries = [{"model": "m1", "weight": 0.5}, {"model": "m2", "weight": -0.5}]
    out = _run(models, "task_arithmetic", entries, {"normalize": True}, dtype=dtype)["w"]
    per_step, _ = _both(models, ["m1", "m2"], [0.5, -0.5], HALF[dtype], normalize=True)
    nan = per_step.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(_bits(out[~nan]), _bits(per_step[~nan]))
    assert per_step.isinf().any() == (dtype == "float16")


SPARSE_CASES = [
    pytest.param("ties", {}, dict(sparsify="magnitude", consensus=True, normalize=True), id="ties"),
    pytest.param(
        "ties", {"normalize": False, "lambda": 0.9}, dict(sparsify="magnitude", consensus=True, lam=0.9), id="ties-raw"
    ),
    pytest.param("dare_ties", {}, dict(sparsify="random", rescale=True, consensus=True), id="dare_ties"),
    pytest.param(
        "dare_linear", {"normalize": True}, dict(sparsify="random", rescale=True, normalize=True), id="dare_linear"
    ),
    pytest.param("dare_linear", {"rescale": False}, dict(sparsify="random"), id="dare_linear-no-rescale"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(("method", "parameters", "formula"), SPARSE_CASES)
def test_half_ties_and_dare_follow_mergekit_step_by_step(tmp_path, dtype, method, parameters, formula):
    torch_dtype = HALF[dtype]
    models = _distinct_tau_models(tmp_path, torch_dtype)
    names, weights, density = ["m1", "m2", "m3"], [0.3, 0.45, 0.7], 0.3
    if formula["sparsify"] == "magnitude":
        k = max(1, int(density * models["tensors"]["base"].numel()))
        for n in names:  # no entry ties with the threshold, so mergekit's sort picks no other entries
            mag = (models["tensors"][n] - models["tensors"]["base"]).abs().flatten()
            assert int((mag == mag.sort(descending=True).values[k - 1]).sum()) == 1
    entries = [{"model": n, "weight": w, "density": density} for n, w in zip(names, weights)]
    out = _run(models, method, entries, parameters, dtype=dtype)["w"]
    per_step, once = _both(models, names, weights, torch_dtype, density=density, **formula)
    assert torch.equal(_bits(out), _bits(per_step))
    assert not torch.equal(_bits(per_step), _bits(once))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_without_dtype_the_stored_dtype_is_the_compute_dtype(tmp_path, dtype):
    models = _half_models(tmp_path, HALF[dtype], seed=1)
    entries = [{"model": "m1", "weight": 0.3}, {"model": "m2", "weight": 0.45}]
    out = _run(models, "task_arithmetic", entries, {"normalize": True}, dtype=None)["w"]
    per_step, once = _both(models, ["m1", "m2"], [0.3, 0.45], HALF[dtype], normalize=True)
    assert out.dtype == HALF[dtype]
    assert torch.equal(_bits(out), _bits(per_step))
    assert not torch.equal(_bits(per_step), _bits(once))


@pytest.mark.parametrize("stored", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_inputs_stored_wider_are_converted_to_the_dtype_first(tmp_path, dtype, stored):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(64, 96, generator=g, dtype=torch.float64) * 3
    # values just above halfway between two bfloat16 (float16) numbers, by less than float32 can
    # hold: torch converts float64 to a half type through float32, so they go to the even neighbour
    base[0, :8] = torch.tensor([1 + 2**-8 + 2**-40, 1 + 2**-11 + 2**-40] * 4, dtype=torch.float64)
    tensors = {"base": base.to(stored)}
    for i in (1, 2):
        tensors[f"m{i}"] = (base + 0.01 * torch.randn(64, 96, generator=g, dtype=torch.float64)).to(stored)
    tensors["m1"][0, 8:16] = tensors["base"][0, :8]
    models = _save_models(tmp_path, tensors)
    entries = [{"model": "m1", "weight": 0.3}, {"model": "m2", "weight": 0.45}]
    out = _run(models, "task_arithmetic", entries, {"lambda": 0.7}, dtype=dtype)["w"]
    per_step, _ = _both(models, ["m1", "m2"], [0.3, 0.45], HALF[dtype], lam=0.7)
    assert out.dtype == HALF[dtype]
    assert torch.equal(_bits(out), _bits(per_step))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    ("method", "parameters", "density"),
    [
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}, None),
        ("ties", {}, 0.3),
        ("dare_ties", {}, 0.3),
        ("dare_linear", {"normalize": True}, 0.3),
    ],
)
def test_numpy_and_torch_cpu_give_the_same_bytes(tmp_path, dtype, method, parameters, density):
    models = _half_models(tmp_path, HALF.get(dtype, torch.bfloat16), seed=2)
    entries = [{"model": n, "weight": w} for n, w in (("m1", 0.3), ("m2", 0.45), ("m3", -0.2))]
    if density is not None:
        for e in entries:
            e["density"] = density
    out = {}
    for device in ("cpu", "torch-cpu"):
        run = [dict(e) for e in entries]
        out[device] = _run(models, method, run, parameters, name=device, dtype=dtype, device=device)["w"]
    assert out["cpu"].dtype == {**HALF, "float32": torch.float32}[dtype]
    assert torch.equal(_bits(out["cpu"]), _bits(out["torch-cpu"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_rounding_is_torchs(dtype):
    """merge/gta.py's in-place rounding of float32 arrays against torch's conversion, on values of
    every magnitude, halfway cases, the largest finite values (which round to infinity), NaN."""
    import numpy as np

    from chatvec.merge.gta import round_to

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 16, generator=g) * torch.exp(torch.randn(1 << 16, generator=g) * 20)
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0])
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 65520.0, 1e-40, -0.0, 0.0])
    x = torch.cat([x, halfway, special])
    got = x.numpy().copy()
    round_to(got, {"bfloat16": "BF16", "float16": "F16"}[dtype])
    want = x.to(HALF[dtype]).float().numpy()
    assert np.array_equal(got, want, equal_nan=True)
    number = ~np.isnan(want)  # (a NaN's sign and payload are torch's own)
    assert np.array_equal(np.signbit(got[number]), np.signbit(want[number]))


# -- mergekit 0.1.5's L1 rescale and trim count -----------------------------------------------


def _native_factor(tensor: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """before / after as mergekit's torch computes it (its own float32 summation)."""
    return tensor.abs().sum() / masked.abs().sum()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_rescales_to_the_l1_norm(tmp_path, dtype, method):
    stored = torch.bfloat16
    models = _distinct_tau_models(tmp_path, stored, seed=6)
    names, weights, density = ["m1", "m2", "m3"], [0.3, 0.45, 0.7], 0.4
    entries = [{"model": n, "weight": w, "density": density} for n, w in zip(names, weights)]
    out = _run(models, method, entries, dtype=dtype)["w"]
    compute = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    t = models["tensors"]
    consensus = method == "dare_ties"
    want = _mergekit_formula(
        t["base"],
        [t[n] for n in names],
        weights,
        compute,
        density=density,
        sparsify="random",
        rescale=True,
        consensus=consensus,
    )
    assert out.dtype == compute
    assert torch.equal(_bits(out), _bits(want))
    # not chatvec's 1 / density
    by_density = _mergekit_formula(
        t["base"], [t[n] for n in names], weights, compute, density=density, sparsify="random", consensus=consensus
    )
    assert not torch.equal(_bits(out), _bits(by_density))
    # torch's own float32 sums give the same factor, or one a unit in the last place away
    for i, n in enumerate(names):
        delta = t[n].to(compute) - t["base"].to(compute)
        keep = torch.tensor(_splitmix_keep_n(i, density, delta.numel()), dtype=compute).reshape(delta.shape)
        ours = _l1_rescale(delta, delta * keep)[keep.bool()] / delta[keep.bool()]
        native = _native_factor(delta, delta * keep).float()
        assert torch.allclose(ours.float(), native.expand_as(ours), rtol=2 * torch.finfo(compute).eps, atol=0)


def test_ties_with_rescale_true_rescales_to_the_l1_norm(tmp_path):
    models = _distinct_tau_models(tmp_path, torch.bfloat16, seed=7)
    names, weights, density = ["m1", "m2", "m3"], [0.3, 0.45, 0.7], 0.3
    entries = [{"model": n, "weight": w, "density": density} for n, w in zip(names, weights)]
    out = _run(models, "ties", entries, {"rescale": True}, dtype="bfloat16")["w"]
    t = models["tensors"]
    xs = [t[n] for n in names]
    kw = dict(density=density, sparsify="magnitude", consensus=True, normalize=True)
    want = _mergekit_formula(t["base"], xs, weights, torch.bfloat16, rescale=True, **kw)
    assert torch.equal(_bits(out), _bits(want))
    assert not torch.equal(_bits(want), _bits(_mergekit_formula(t["base"], xs, weights, torch.bfloat16, **kw)))
    # in float32 as well, on the small hand-made tensors
    small = _small_models(tmp_path / "small")
    entries = [{"model": "m1", "weight": 1.0, "density": 0.5}, {"model": "m2", "weight": 0.5, "density": 0.5}]
    out = _run(small, "ties", entries, {"rescale": True})["w"]
    kw = dict(density=0.5, sparsify="magnitude", consensus=True, normalize=True)
    want = _reference([TAU1, TAU2], [1.0, 0.5], rescale=True, **kw)
    assert torch.equal(out, want)
    assert not torch.equal(want, _reference([TAU1, TAU2], [1.0, 0.5], **kw))


def test_ties_keeps_at_least_one_entry(models):
    """k = max(1, int(density * entries)): at density 0.05 of 8 entries each vector keeps its
    largest |tau| (int gives 0)."""
    entries = [{"model": "m1", "weight": 1.0, "density": 0.05}, {"model": "m2", "weight": 0.5, "density": 0.05}]
    out = _run(models, "ties", entries)["w"]
    want = _reference([TAU1, TAU2], [1.0, 0.5], density=0.05, sparsify="magnitude", consensus=True, normalize=True)
    assert torch.equal(out, want)
    changed = (out != torch.tensor(BASE)).nonzero().tolist()
    assert changed == [[0, 3]]  # TAU1's -4.0 and TAU2's 4.5 there: 4.5 * 0.5 wins the election


# (ties keeps the largest entries, so its after is under 1e-7 only where before is small too)
@pytest.mark.parametrize(("method", "which"), [("dare_linear", "before"), ("dare_linear", "after"), ("ties", "before")])
def test_no_rescale_where_a_norm_is_under_1e_7(tmp_path, which, method):
    """mergekit leaves the masked vector as it is where sum |tau| or sum |masked| < 1e-7."""
    density = 0.5
    keep = torch.tensor(_splitmix_keep_n(0, density, 8)).reshape(2, 4)
    if which == "before":  # every |tau| tiny
        tau = torch.where(keep, 2e-9, -1e-9) * torch.arange(1, 9).reshape(2, 4)
    else:  # the kept entries tiny, the dropped ones large
        tau = torch.where(keep, torch.tensor(2e-9), torch.tensor(1.5))
    base = torch.tensor(BASE)
    models = {"base": _ckpt(tmp_path / "base", base), "m1": _ckpt(tmp_path / "m1", base + tau), "root": tmp_path}
    tau = (base + tau) - base  # as stored
    entries = [{"model": "m1", "weight": 0.7, "density": density}]
    parameters = {"rescale": True, "normalize": False}
    out = _run(models, method, entries, parameters)["w"]
    sparsify = "random" if method == "dare_linear" else "magnitude"
    kw = dict(density=density, sparsify=sparsify, consensus=method == "ties")
    want = _reference([tau.tolist()], [0.7], rescale=True, **kw)
    assert torch.equal(out, want)
    assert torch.equal(want, _reference([tau.tolist()], [0.7], **kw))  # not rescaled
    before = tau.abs().sum()
    assert before < 1e-7 if which == "before" else before > 1e-7


def _small_models(root: Path) -> dict:
    base = torch.tensor(BASE)
    return {
        "base": _ckpt(root / "base", base),
        "m1": _ckpt(root / "m1", base + torch.tensor(TAU1)),
        "m2": _ckpt(root / "m2", base + torch.tensor(TAU2)),
        "root": root,
    }


def test_the_ties_threshold_is_taken_in_the_dtype_when_inputs_are_stored_wider(tmp_path):
    """float32 models merged in bfloat16: the trim threshold is the k-th largest |tau| of the
    models converted to bfloat16 (mergekit's tau), not the float32 one's rounded."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(64, 96, generator=g)
    tensors = {"base": base, "m1": base + 0.02 * torch.randn(64, 96, generator=g)}
    tensors["m2"] = base + 0.02 * torch.randn(64, 96, generator=g)
    models = _save_models(tmp_path, tensors)
    density, weights = 0.3, [0.6, 0.4]
    entries = [{"model": n, "weight": w, "density": density} for n, w in zip(("m1", "m2"), weights)]
    out = _run(models, "ties", entries, dtype="bfloat16")["w"]
    xs = [tensors["m1"], tensors["m2"]]
    formula = dict(density=density, sparsify="magnitude", consensus=True, normalize=True, keep_ties=True)
    want = _mergekit_formula(base, xs, weights, torch.bfloat16, **formula)
    assert torch.equal(_bits(out), _bits(want))
    # the float32 |tau|'s k-th largest, rounded to bfloat16, would trim otherwise
    k = max(1, int(density * base.numel()))
    differs = False
    for x in xs:
        in_dtype = (x.to(torch.bfloat16) - base.to(torch.bfloat16)).abs().flatten().float()
        kth = in_dtype.sort(descending=True).values[k - 1]
        rounded = (x - base).abs().flatten().sort(descending=True).values[k - 1].to(torch.bfloat16).float()
        differs |= bool(((in_dtype >= kth) != (in_dtype >= rounded)).any())
    assert differs
