"""The vllm engine against the hf engine on the same tiny model (GPU machines with vLLM only).

Both engines get the same token ids; they must cut them alike, decode greedily to the same text
(repetition penalty included), stop alike and score the same continuation tokens.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a GPU", allow_module_level=True)

from demo.tiny import build_model_dir  # noqa: E402
from eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest, load_engine  # noqa: E402
from eval.prompts import Prompts  # noqa: E402

WINDOW = 64  # the vllm engine's window under max_model_len=WINDOW + 1 (one slot for the output token)


def greedy_ids(model, ids: list[int], steps: int) -> list[int]:
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out], device=model.device)).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_vllm_and_hf_agree(tmp_path):
    model = str(build_model_dir(tmp_path / "m", seed=9, hidden=128, layers=2, dtype="float32", shard_size=None))
    hf = load_engine("hf", model, device="cuda", dtype="float32")
    # the same window for both, so that truncation is compared too (the tiny model allows 4096)
    hf._max_length = WINDOW
    prompts = Prompts(hf.tokenizer)
    chats = [prompts.chat_ids(prompts.conversation([("user", q)]))[1]
             for q in ("hello", "今天天氣很好嗎？", "오늘 날씨가 좋네요.")]
    long_ids = prompts.encode("The quick brown fox jumps over the lazy dog. " * 12)
    assert len(long_ids) > 2 * WINDOW
    reqs = [GenerationRequest(ids, Decoding(max_new_tokens=8)) for ids in chats]
    # alone in their decoding groups, so the hf engine neither pads them nor shares their window
    reqs.append(GenerationRequest(chats[0], Decoding(max_new_tokens=12, repetition_penalty=1.3)))
    reqs.append(GenerationRequest(long_ids, Decoding(max_new_tokens=20)))  # cut from the left
    cont = prompts.encode("yes, indeed")
    lls = [LoglikelihoodRequest(ids, cont) for ids in chats]
    lls.append(LoglikelihoodRequest(chats[1], greedy_ids(hf.model, chats[1], 3)))  # greedy by construction
    lls.append(LoglikelihoodRequest(long_ids, cont))  # context cut to fit the window
    lls.append(LoglikelihoodRequest([], long_ids))  # continuation cut too
    lls.append(LoglikelihoodRequest(chats[0], []))  # nothing to score
    want_gen, want_ll = hf.generate(reqs), hf.loglikelihood(lls)
    hf.close()
    assert want_ll[3].greedy

    free_before = torch.cuda.mem_get_info()[0]
    vl = load_engine("vllm", model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True,
                     max_model_len=WINDOW + 1)
    try:
        assert vl.max_length == WINDOW
        assert vl.tokenizer(["hello"])["input_ids"] == hf.tokenizer(["hello"])["input_ids"]
        got_gen, got_ll = vl.generate(reqs, progress=True), vl.loglikelihood(lls, progress=True)
    finally:
        vl.close()
    vl.close()  # twice is harmless
    assert torch.cuda.mem_get_info()[0] > free_before - 2 * 2**30, "vLLM kept its GPU memory after close()"

    for g, w in zip(got_gen, want_gen):
        assert (g.text, g.prompt_tokens, g.completion_tokens, g.finished) == \
               (w.text, w.prompt_tokens, w.completion_tokens, w.finished)
    assert got_gen[-1].prompt_tokens < len(long_ids)
    for g, w in zip(got_ll, want_ll):
        assert g.tokens == w.tokens and g.greedy == w.greedy
        assert g.logprob == pytest.approx(w.logprob, abs=1e-2)
    assert got_ll[-1].tokens == 0 and got_ll[-2].tokens == WINDOW - 1
