"""Merge points computed from inputs held in memory (chatvec.merge.resident) and swapped into
running engines (cluster/weight_swap.py:Swapper): the bytes `chatvec merge` writes, for every
method and for per-tensor ratios; engines that then answer exactly as the written checkpoint
does; and the streamed swap, said so, when the inputs do not fit the memory budget.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from chatvec.merge.plan import build_plan  # noqa: E402
from chatvec.merge.recipe import Recipe, VectorSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
METHODS = {
    "add": dict(ratio=0.5),
    "ties": dict(ratio=0.7, method="ties", density=0.4),
    # the same inputs at another density: the trim thresholds found for 0.4 must not be reused
    "ties-0.7": dict(ratio=0.7, method="ties", density=0.7),
    "dare": dict(ratio=0.5, method="dare", density=0.6, seed=5),
    "dare_ties": dict(ratio=0.8, method="dare_ties", density=0.5, seed=3),
}
PROMPTS = ["hello", "Why is the sky blue? Explain briefly.", "今天天氣很好嗎？", "def add(a, b):"]


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    root = tmp_path_factory.mktemp("resident")
    return {
        # hidden 128 over 4 heads: head size 32, which vLLM's CPU build takes
        "same": build_triple(root / "same", "llama", seed=31, hidden=128),
        "vocab": build_triple(root / "vocab", "llama", seed=32, cp_extra_tokens=2, chat_extra_tokens=2),
        "other": build_triple(root / "other", "llama", seed=33, hidden=128),
    }


def _plan(t, *, shard_size: int = 60_000, more=(), **spec):
    vectors = [VectorSpec(base=str(t.base), chat=str(t.chat), **spec), *more]
    return build_plan(Recipe(cp=str(t.cp), vectors=vectors), shard_size=shard_size)


def _scheduled(plan):
    """Different ratios on different tensors (what a per-layer schedule resolves to), 0 and 1 included."""
    for i, task in enumerate(plan.tasks.values()):
        for term in task.terms:
            term.ratio = 1.0 if i % 7 == 3 else term.ratio * (0.0, 1.0, 0.35, 1.7, -0.4)[i % 5]
    return plan


def _bytes_equal(resident, plan) -> None:
    from chatvec.merge.in_memory import merged_tensors

    got = list(resident.tensors(plan))
    want = list(merged_tensors(plan))
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for (name, _, _, a), (_, _, _, b) in zip(got, want):
        assert a.tobytes() == b.tobytes(), name


# -- the bytes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resident():
    from chatvec.merge.resident import ResidentMerge

    return ResidentMerge("cpu")  # one for every case: later plans reuse what the first read


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("schedule", [False, True], ids=["recipe-ratio", "per-tensor-ratio"])
def test_resident_bytes_equal_the_merge(triples, resident, method, schedule):
    from chatvec.merge.resident import ResidentMerge

    plan = _plan(triples["same"], **METHODS[method])
    if schedule:
        _scheduled(plan)
    resident.load(plan)
    _bytes_equal(resident, plan)
    # the add path in torch alone (where numba's one-pass kernel is not used) gives them too
    twin = ResidentMerge("cpu", kernel="torch")
    twin.entries, twin.amax = resident.entries, resident.amax
    _bytes_equal(twin, plan)


def test_the_one_pass_kernel_is_the_one_used(triples, resident, monkeypatch):
    pytest.importorskip("numba")
    import chatvec.merge.resident as module

    calls = []
    kernels = module._numba_kernels()
    for name in ("add_bf16", "add_f32"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name: calls.append((_name, a[-1].dtype.name)) or _real(*a)
        )
    for spec in (METHODS["add"], METHODS["dare"]):
        calls.clear()
        plan = _plan(triples["same"], **spec)
        resident.load(plan)
        _bytes_equal(resident, plan)
        target = {t.name: torch.empty(t.numel) for t in plan.tasks.values()}
        list(resident.write(plan, lambda t, target=target: target[t.name]))
        assert {("add_bf16", "uint16"), ("add_bf16", "uint32")} <= set(calls)  # bf16 words, and widened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", list(METHODS))
def test_resident_bytes_on_cuda_equal_the_merge(triples, method):
    from chatvec.merge.resident import ResidentMerge

    plan = _scheduled(_plan(triples["same"], **METHODS[method]))
    resident = ResidentMerge("cuda")
    resident.load(plan)
    assert all(t.device.type == "cuda" for t in resident.entries.values())
    _bytes_equal(resident, plan)


def test_resident_bytes_equal_the_written_checkpoint(triples, resident, tmp_path):
    from test_merge_in_memory import _written

    from chatvec.cluster.merge_driver import run_merge_job

    plan = _scheduled(_plan(triples["same"], ratio=0.5))
    run_merge_job(plan, str(tmp_path / "out"), progress=False)
    resident.load(plan)
    got = list(resident.tensors(plan))
    assert [(n, d, s, a.tobytes()) for n, d, s, a in got] == _written(tmp_path / "out")


@pytest.mark.parametrize(
    "case",
    ["two-vectors", "by-token-rows", "f32-output", "toy-world-f32"],
)
def test_resident_bytes_other_shapes_of_merge(triples, case):
    from chatvec.merge.resident import ResidentMerge

    if case == "two-vectors":
        o = triples["other"]
        plan = _plan(triples["same"], ratio=0.6, more=[VectorSpec(base=str(o.base), chat=str(o.chat), ratio=0.3)])
    elif case == "by-token-rows":
        t = triples["vocab"]
        recipe = Recipe(
            cp=str(t.cp),
            vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.5)],
            embeddings="by-token",
            chat_tokens_from_chat=True,
        )
        plan = build_plan(recipe, shard_size=60_000)
    elif case == "f32-output":
        t = triples["same"]
        vectors = [VectorSpec(base=str(t.base), chat=str(t.chat), ratio=1.0)]
        plan = build_plan(Recipe(cp=str(t.cp), vectors=vectors, dtype="float32"), shard_size=60_000)
    else:
        vectors = [VectorSpec(base=str(TOY / "base"), chat=str(TOY / "chat"), ratio=1.25)]
        plan = build_plan(Recipe(cp=str(TOY / "cp"), vectors=vectors, embeddings="skip"))
    resident = ResidentMerge("cpu")
    resident.load(plan)
    _bytes_equal(resident, plan)


def test_non_finite_inputs_take_the_kernels_path(tmp_path):
    """NaN and infinities in an input: the torch add path would write another NaN bit pattern, so
    such tensors go through the merge kernels, and the bytes still agree."""
    import struct

    from chatvec.demo.tiny import build_triple
    from chatvec.merge.resident import ResidentMerge

    t = build_triple(tmp_path / "t", "llama", seed=34)
    name = "model.layers.0.mlp.down_proj.weight"
    index = json.loads((t.chat / "model.safetensors.index.json").read_text())
    path = t.chat / index["weight_map"][name]
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    data[start : start + 6] = struct.pack("<3H", 0x7FC0, 0x7F80, 0xFF80)  # bf16 NaN, +inf, -inf
    path.write_bytes(bytes(data))
    plan = _plan(t, ratio=0.5)
    resident = ResidentMerge("cpu")
    resident.load(plan)
    _bytes_equal(resident, plan)
    out = {n: a for n, _, _, a in resident.tensors(plan)}
    assert out[name][:2].view("<u2")[0] == 0x7FC0


# -- engines ---------------------------------------------------------------------------------------
def _checkpoint(plan, folder: Path) -> Path:
    from chatvec.cluster.merge_driver import run_merge_job

    run_merge_job(plan, str(folder), progress=False)
    return folder


def _checkpoint_tensors(folder: Path) -> list[tuple[str, object]]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = []
    for shard in sorted(set(index["weight_map"].values())):
        out += list(load_file(str(folder / shard)).items())
    return out


def _answers(engine):
    from chatvec.eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest

    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gens = engine.generate([GenerationRequest(i, Decoding(max_new_tokens=12)) for i in ids])
    scores = engine.loglikelihood([LoglikelihoodRequest(i[:2], i[2:]) for i in ids if len(i) > 2])
    return [(g.text, g.completion_tokens) for g in gens], [s.logprob for s in scores]


@pytest.fixture(scope="module")
def hf_engine(triples):
    from chatvec.eval.engines import load_engine

    engine = load_engine("hf", str(triples["same"].cp), device="cpu", dtype="float32")
    yield engine
    engine.close()


@pytest.mark.parametrize("method", ["add", "dare_ties"])
def test_hf_swap_in_place_equals_the_checkpoint(triples, hf_engine, tmp_path, method):
    from chatvec.cluster.weight_swap import Swapper
    from chatvec.eval.engines import load_engine

    swapper = Swapper(hf_engine)
    before = {n: p.data_ptr() for n, p in hf_engine.model.named_parameters()}
    for ratio in (0.5, 1.25):
        plan = _scheduled(_plan(triples["same"], **{**METHODS[method], "ratio": ratio}))
        timing = swapper.load_point(plan)
        assert timing.resident and timing.tensors == len(plan.tasks) and timing.held_bytes > 0
    assert {n: p.data_ptr() for n, p in hf_engine.model.named_parameters()} == before  # in place
    reference = load_engine("hf", str(_checkpoint(plan, tmp_path / "ckpt")), device="cpu", dtype="float32")
    try:
        want = dict(reference.model.named_parameters())
        for name, param in hf_engine.model.named_parameters():
            assert torch.equal(param, want[name]), name
        assert _answers(hf_engine) == _answers(reference)
    finally:
        reference.close()
        swapper.close()


def test_hf_over_budget_streams_and_says_so(triples, hf_engine, tmp_path, caplog):
    from chatvec.cluster.weight_swap import Swapper
    from chatvec.eval.engines import load_engine

    plan = _plan(triples["same"], ratio=0.9)
    with caplog.at_level(logging.WARNING, logger="chatvec.cluster.weight_swap"):
        timing = Swapper(hf_engine, budget=1000).load_point(plan)
    assert not timing.resident and "over the budget of 1 KB" in timing.why
    assert any("streaming swap from storage" in r.getMessage() for r in caplog.records)
    reference = load_engine("hf", str(_checkpoint(plan, tmp_path / "ckpt")), device="cpu", dtype="float32")
    try:
        want = dict(reference.model.named_parameters())
        assert all(torch.equal(p, want[n]) for n, p in hf_engine.model.named_parameters())
    finally:
        reference.close()


def test_in_engine_sweep_prints_how_swaps_went(tmp_path):
    from chatvec.core.config import ChatvecConfig, EvalSettings
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    text = f"""\
name: budget
vectors:
  toy: {{base: {TOY / "base"}, chat: {TOY / "chat"}}}
targets:
  - {{language: toy-l2, cp: {TOY / "cp"}, benchmarks: [{TOY / "benchmarks.yaml"}]}}
ratios: [0.5, 1.0]
embeddings: [skip]
baselines: {{cp: false, chat: false}}
engine: hf
device: cpu
root: {tmp_path / "root"}
eval: {{limit: 4, max_new_tokens: 4}}
"""
    (tmp_path / "s.yaml").write_text(text)
    for memory, want in (("auto", "2 of 2 from memory"), ("10KB", "0 of 2 from memory")):
        lines: list[str] = []
        sweep = load_sweep(str(tmp_path / "s.yaml"))
        sweep.in_engine = True
        config = ChatvecConfig(eval=EvalSettings(in_engine_memory=memory))
        outcome = run_sweep(sweep, run_id=memory, config=config, merge_workers=0, eval_workers=0, echo=lines.append)
        assert not outcome.failed_cells
        assert any(want in line for line in lines), lines
        streamed = [line for line in lines if "streamed from storage" in line]
        assert len(streamed) == (2 if memory != "auto" else 0), lines
        assert all("over the budget of 10 KB" in line for line in streamed)


# -- vLLM --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_engine(triples):
    pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")
    from chatvec.cluster.weight_swap import EXTENSION
    from chatvec.eval.engines import load_engine

    engine = load_engine(
        "vllm",
        str(triples["same"].cp),
        device="cpu",
        dtype="float32",
        options={"enforce_eager": True, "cpu_kvcache_gib": 1},
        worker_extension=EXTENSION,
    )
    yield engine
    engine.close()


def _load_checkpoint_into(engine, folder: Path) -> None:
    """The written checkpoint's tensors through vLLM's own loader: what an engine started from it holds."""
    tensors = _checkpoint_tensors(folder)

    def load(worker):
        worker.model_runner.reload_weights(weights_iterator=iter(tensors))

    engine.llm.collective_rpc(load)
    engine.llm.reset_prefix_cache()


@pytest.mark.parametrize("method", ["add", "ties"])
def test_vllm_resident_swap_answers_as_the_checkpoint(triples, vllm_engine, tmp_path, method):
    from chatvec.cluster.weight_swap import Swapper

    swapper = Swapper(vllm_engine)
    plan = _scheduled(_plan(triples["same"], **METHODS[method]))
    timing = swapper.load_point(plan)
    assert timing.resident and timing.tensors == len(plan.tasks), timing
    swapped = _answers(vllm_engine)
    _load_checkpoint_into(vllm_engine, _checkpoint(plan, tmp_path / "ckpt"))
    assert _answers(vllm_engine) == swapped
    # and the comparison can tell points apart: another ratio answers otherwise
    assert swapper.load_point(_plan(triples["same"], ratio=3.0)).resident
    assert _answers(vllm_engine) != swapped


def test_vllm_over_budget_streams(triples, vllm_engine, tmp_path):
    from chatvec.cluster.weight_swap import Swapper

    plan = _plan(triples["same"], ratio=0.75)
    timing = Swapper(vllm_engine, budget=2000).load_point(plan)
    assert not timing.resident and "over the budget of 2 KB" in timing.why
    swapped = _answers(vllm_engine)
    _load_checkpoint_into(vllm_engine, _checkpoint(plan, tmp_path / "ckpt"))
    assert _answers(vllm_engine) == swapped
