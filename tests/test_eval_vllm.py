"""The vllm engine against the hf engine on the same tiny model (GPU machines with vLLM only)."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a GPU", allow_module_level=True)

from demo.tiny import build_model_dir  # noqa: E402
from eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest, load_engine  # noqa: E402
from eval.prompts import Prompts  # noqa: E402


def test_vllm_and_hf_agree(tmp_path):
    model = str(build_model_dir(tmp_path / "m", seed=9, hidden=128, layers=2, dtype="float32", shard_size=None))
    hf = load_engine("hf", model, device="cuda", dtype="float32")
    prompts = Prompts(hf.tokenizer)
    reqs = [GenerationRequest(prompts.chat_ids(prompts.conversation([("user", q)]))[1], Decoding(max_new_tokens=8))
            for q in ("hello", "今天天氣很好嗎？", "오늘 날씨가 좋네요.")]
    lls = [LoglikelihoodRequest(r.prompt_ids, prompts.encode("yes, indeed")) for r in reqs]
    want_gen, want_ll = hf.generate(reqs), hf.loglikelihood(lls)
    hf.close()
    vl = load_engine("vllm", model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        got_gen, got_ll = vl.generate(reqs), vl.loglikelihood(lls)
    finally:
        vl.close()
    assert [g.text for g in got_gen] == [g.text for g in want_gen]
    for g, w in zip(got_ll, want_ll):
        assert g.tokens == w.tokens and g.logprob == pytest.approx(w.logprob, abs=1e-2)
