"""The hf engine and the kinds that score log-likelihoods, checked against transformers directly."""

from __future__ import annotations

import json
import logging
import math

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.core.errors import InputError  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.benchmarks import BenchmarkSpec, shipped_benchmarks  # noqa: E402
from chatvec.eval.contracts import Cell, RunContext, RunSettings  # noqa: E402
from chatvec.eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest, load_engine  # noqa: E402
from chatvec.eval.items import load_items  # noqa: E402
from chatvec.eval.prompts import PLAIN_ASSISTANT, Prompts  # noqa: E402
from chatvec.eval.results import read_samples  # noqa: E402
from chatvec.eval.runner import ModelEvaluator  # noqa: E402

QUESTIONS = [
    "hello",
    "Why is the sky blue? Explain briefly.",
    "今天天氣很好嗎？",
    "오늘 날씨가 좋네요. 공원에 갈까요?",
    "今日は何曜日ですか。",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_model_dir(tmp_path_factory.mktemp("eng") / "m", seed=3, shard_size="50KB"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = load_engine("hf", model_dir, device="cpu", batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def ref_logprob(model, ids: list[int], n: int) -> float:
    """log P(last n tokens | the rest), one sequence, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(ids) - n - 1 + k, ids[len(ids) - n + k]].item() for k in range(n))


def test_batched_generation_equals_one_at_a_time(engine):
    prompts = Prompts(engine.tokenizer)
    reqs = [
        GenerationRequest(prompts.chat_ids(prompts.conversation([("user", q)]))[1], Decoding(max_new_tokens=10))
        for q in QUESTIONS
    ]
    batched = engine.generate(reqs)
    engine.batch_size = 1
    try:
        single = engine.generate(reqs)
    finally:
        engine.batch_size = 4
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]
    assert [g.prompt_tokens for g in batched] == [len(r.prompt_ids) for r in reqs]


def test_generation_is_greedy_and_stops_at_eos(engine, reference):
    model, _tok = reference
    prompts = Prompts(engine.tokenizer)
    ids = prompts.chat_ids(prompts.conversation([("user", QUESTIONS[1])]))[1]
    # greedy decoding by hand, without the engine
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    greedy = seq[len(ids) :]
    (gen,) = engine.generate([GenerationRequest(ids, Decoding(max_new_tokens=8))])
    assert gen.text == engine.tokenizer.decode(greedy, skip_special_tokens=True)
    # make the 4th greedy token the end-of-sequence token: generation must stop there
    saved = engine.eos_ids
    engine.eos_ids = [greedy[3]]
    try:
        (stopped,) = engine.generate([GenerationRequest(ids, Decoding(max_new_tokens=8))])
    finally:
        engine.eos_ids = saved
    first = greedy.index(greedy[3])
    assert stopped.finished and stopped.completion_tokens == first + 1
    assert stopped.text == engine.tokenizer.decode(greedy[:first], skip_special_tokens=True)


def test_loglikelihood_matches_transformers(engine, reference):
    model, tok = reference
    reqs = [
        LoglikelihoodRequest(
            tok(q, add_special_tokens=True)["input_ids"], tok(" an answer", add_special_tokens=False)["input_ids"]
        )
        for q in QUESTIONS
    ]
    got = engine.loglikelihood(reqs)
    for r, g in zip(reqs, got):
        want = ref_logprob(model, r.context_ids + r.continuation_ids, len(r.continuation_ids))
        assert g.logprob == pytest.approx(want, abs=1e-3)
        assert g.tokens == len(r.continuation_ids)


def run_cell(model_dir, spec: BenchmarkSpec, language: str, tmp_path) -> list[dict]:
    """One cell through the evaluator, its rows read back from the samples file it wrote."""
    run = RunContext(
        out_uri=str(tmp_path / "out"),
        run_id="t",
        settings=RunSettings(device="cpu", batch_size=3),
        languages=(language,),
        judged=False,
    )
    ev = ModelEvaluator("m", model_dir, run=run)
    cell = Cell("m", language, spec.name, spec)
    try:
        result = ev.run_cell(cell)
    finally:
        ev.close()
    assert result.state == "done", result.error
    return read_samples(ev.store, cell).to_pylist()


@pytest.mark.parametrize("language", ["en", "ko"])
def test_choice_accuracy_against_independent_loglikelihoods(model_dir, reference, tmp_path, language):
    model, tok = reference
    spec = {s.name: s for s in shipped_benchmarks()}["choice"]
    rows = run_cell(model_dir, spec, language, tmp_path)
    by_metric = {m: {r["item_id"]: r for r in rows if r["metric"] == m} for m in ("acc", "acc_norm")}
    items = load_items(spec, language)
    correct = correct_norm = 0
    for item in items:
        context = tok.apply_chat_template(
            [{"role": "user", "content": item["question"]}], tokenize=False, add_generation_prompt=True
        )
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        lps = []
        for choice in item["choices"]:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            lps.append(ref_logprob(model, ctx_ids + cont, len(cont)))
        pred = max(range(len(lps)), key=lambda i: lps[i])
        pred_norm = max(range(len(lps)), key=lambda i: lps[i] / len(item["choices"][i]))
        correct += pred == item["answer"]
        correct_norm += pred_norm == item["answer"]
        details = json.loads(by_metric["acc"][item["id"]]["details"])
        assert details["logprobs"] == pytest.approx(lps, abs=1e-3)
        assert details["pred"] == pred and details["pred_norm"] == pred_norm
        assert by_metric["acc"][item["id"]]["score"] == float(pred == item["answer"])
    assert sum(r["score"] for r in by_metric["acc"].values()) == correct
    assert sum(r["score"] for r in by_metric["acc_norm"].values()) == correct_norm


def test_perplexity_against_transformers(model_dir, reference, tmp_path):
    model, tok = reference
    spec = {s.name: s for s in shipped_benchmarks()}["perplexity"]
    rows = run_cell(model_dir, spec, "zh-Hant", tmp_path)
    for item in load_items(spec, "zh-Hant"):
        ids = [tok.bos_token_id] + tok(item["text"], add_special_tokens=False)["input_ids"]
        nll = -ref_logprob(model, ids, len(ids) - 1)
        (ppl,) = [r["score"] for r in rows if r["item_id"] == item["id"] and r["metric"] == "perplexity"]
        assert ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-3)


def test_long_text_is_scored_in_windows(engine, reference):
    model, tok = reference
    prompts = Prompts(engine.tokenizer)
    from chatvec.eval.kinds.perplexity import windows

    ids = prompts.start_ids() + prompts.encode("The quick brown fox jumps over the lazy dog. " * 3)
    short = windows(ids, 1, 16)  # as if the model took 16 tokens at most
    got = sum(r.logprob for r in engine.loglikelihood([LoglikelihoodRequest(c, t) for c, t in short]))
    want = sum(ref_logprob(model, c + t, len(t)) for c, t in short)
    assert len(short) > 2 and got == pytest.approx(want, abs=1e-2)


def test_prompts_use_the_chat_template_or_a_plain_format(model_dir, caplog):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    msgs = Prompts.conversation([("user", "hi")], system="Be brief.")
    assert Prompts(tok).render(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tok.chat_template = None
    with caplog.at_level(logging.WARNING):
        plain = Prompts(tok, model_name="nochat").render(msgs)
    assert "nochat has no chat template" in caplog.text
    assert plain.startswith(tok.bos_token) and plain.endswith(PLAIN_ASSISTANT) and "Be brief." in plain


def test_loading_refuses_missing_models_and_pickles(tmp_path, model_dir):
    with pytest.raises(InputError, match="does not exist"):
        load_engine("hf", str(tmp_path / "nothing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="safetensors only"):
        load_engine("hf", str(pickled))
    with pytest.raises(InputError, match="unknown engine"):
        load_engine("onnx", model_dir)


def test_options_sharing_a_context_score_as_if_alone(engine):
    prompts = Prompts(engine.tokenizer)
    contexts = [prompts.chat_ids(prompts.conversation([("user", q)]))[1] for q in QUESTIONS[:3]]
    options = [prompts.encode(t) for t in ("A", "yes", "no thanks", "今天天氣很好", "I think it is blue")]
    reqs = [LoglikelihoodRequest(c, o) for c in contexts for o in options]
    engine.batch_size = 7  # pieces of a context's options spill over batches
    try:
        shared = engine.loglikelihood(reqs)
        engine.batch_size = 1  # one request per forward pass, nothing shared
        alone = engine.loglikelihood(reqs)
    finally:
        engine.batch_size = 4
    assert [r.tokens for r in shared] == [len(o) for _ in contexts for o in options]
    for s, a in zip(shared, alone):
        assert s.logprob == pytest.approx(a.logprob, abs=1e-4) and s.greedy == a.greedy


def test_repetition_penalty_does_not_see_the_padding(engine):
    """Batched generation with a repetition penalty equals one request at a time, even when the
    pad token is one the model generates (models that pad with eos are common)."""
    prompts = Prompts(engine.tokenizer)
    reqs = [
        GenerationRequest(
            prompts.chat_ids(prompts.conversation([("user", q)]))[1],
            Decoding(max_new_tokens=12, repetition_penalty=5.0),
        )
        for q in QUESTIONS
    ]
    assert len({len(r.prompt_ids) for r in reqs}) > 1, "prompts of different lengths are needed for padding"
    saved_pad, saved_batch = engine.pad_id, engine.batch_size
    try:
        engine.batch_size = 1
        single = engine.generate(reqs)
        # pad with a token the model generates but no prompt holds, so a penalty on padding shows
        in_prompts = {t for r in reqs for t in r.prompt_ids}
        generated = [
            t for g in single for t in engine.tokenizer.encode(g.text, add_special_tokens=False) if t not in in_prompts
        ]
        assert generated, "the test needs a generated token that no prompt holds"
        engine.pad_id = max(set(generated), key=generated.count)
        engine.batch_size = len(reqs)
        batched = engine.generate(reqs)
    finally:
        engine.pad_id, engine.batch_size = saved_pad, saved_batch
    assert [g.text for g in batched] == [g.text for g in single]


def test_a_long_prompt_does_not_shorten_the_others_budgets(engine):
    """Each request's window is fitted on its own: a long prompt in the same batch shortens its own
    answer only (it used to give every request of its batch the longest prompt's budget)."""
    prompts = Prompts(engine.tokenizer)
    saved = engine._max_length
    engine._max_length = 64
    try:
        dec = Decoding(max_new_tokens=40)  # more than half the window: a long prompt keeps 32 and gets 32
        item = GenerationRequest(prompts.chat_ids(prompts.conversation([("user", QUESTIONS[0])]))[1], dec)
        long_prompt = GenerationRequest(prompts.encode("The quick brown fox jumps over the lazy dog. " * 8), dec)
        assert len(long_prompt.prompt_ids) > 64 and len(item.prompt_ids) < 24
        (alone,) = engine.generate([item])
        together = engine.generate([long_prompt, item])
    finally:
        engine._max_length = saved
    assert (together[1].text, together[1].completion_tokens) == (alone.text, alone.completion_tokens)
    assert alone.completion_tokens == 40 or alone.finished
    assert together[0].prompt_tokens == 32 and together[0].completion_tokens <= 32


def test_an_engine_starts_without_importing_scikit_learn(model_dir):
    """transformers would import scikit-learn (installed here by lm-eval) for assisted decoding,
    1 to 2 s at every engine start; the engine loads and generates without it."""
    pytest.importorskip("sklearn")
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from chatvec.eval.engines import Decoding, GenerationRequest, load_engine\n"
        f"engine = load_engine('hf', {model_dir!r}, device='cpu', batch_size=2)\n"
        "ids = engine.tokenizer('hello')['input_ids']\n"
        "out = engine.generate([GenerationRequest(ids, Decoding(max_new_tokens=3))])\n"
        "assert out[0].completion_tokens > 0\n"
        "print('sklearn' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
