"""Throughput of the hf engine: batched against one request at a time, in the same run.

    python bench/eval.py [--device cpu|cuda] [--batch 16] [--repeats 5] [--hidden 256] [--layers 4]
                         [--items 32] [--max-new-tokens 32] [--threads 1]

Builds a small random Llama with demo/tiny.py (its byte-level BPE tokenizer handles every script),
then times, with the same engine object:

* generation: ``--items`` chat prompts from the shipped samples (all five languages, rendered
  with the chat template), greedy, ``--max-new-tokens`` each;
* choice: every shipped multiple-choice item (all languages), one log-likelihood per option.

Each is run at batch size 1 and at ``--batch``; the table shows medians over ``--repeats`` runs
(after one warm-up round; the two modes alternate run by run) of items/s and tokens/s (generated tokens for generation, scored option
tokens for choice) and the batched/one-at-a-time ratio. A random model seldom emits its eos
token, so nearly every answer runs to the token limit and both modes generate the same amount.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def build_requests(engine, n_items: int, max_new_tokens: int):
    from chatvec.eval.benchmarks import shipped_benchmarks
    from chatvec.eval.engines import Decoding, GenerationRequest, LoglikelihoodRequest
    from chatvec.eval.items import load_items
    from chatvec.eval.prompts import Prompts

    prompts = Prompts(engine.tokenizer)
    specs = {s.name: s for s in shipped_benchmarks()}
    questions = [i["question"] for lang in specs["chat"].languages for i in load_items(specs["chat"], lang)]
    gen = []
    while len(gen) < n_items:
        q = questions[len(gen) % len(questions)]
        gen.append(
            GenerationRequest(
                prompts.chat_ids(prompts.conversation([("user", q)]))[1], Decoding(max_new_tokens=max_new_tokens)
            )
        )
    choice, n_choice_items = [], 0
    for lang in specs["choice"].languages:
        for item in load_items(specs["choice"], lang):
            ctx = prompts.chat_ids(prompts.conversation([("user", item["question"])]))[1]
            choice += [LoglikelihoodRequest(ctx, prompts.encode(c)) for c in item["choices"]]
            n_choice_items += 1
    return gen, choice, n_choice_items


def timed(fn) -> tuple[float, object]:
    import torch

    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from chatvec.demo.tiny import build_model_dir
    from chatvec.eval.engines import load_engine

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model_dir(
            Path(tmp) / "bench-model", seed=0, hidden=args.hidden, layers=args.layers, shard_size=None, dtype="float32"
        )
        engine = load_engine("hf", str(model), device=args.device, batch_size=args.batch)
        gen, choice, n_choice = build_requests(engine, args.items, args.max_new_tokens)
        params = sum(p.numel() for p in engine.model.parameters())
        device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
        print(
            f"model: llama hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M parameters, "
            f"vocab {engine.model.config.vocab_size}; device: {device_name}"
        )
        print(
            f"generation: {len(gen)} prompts (mean {statistics.mean(len(r.prompt_ids) for r in gen):.0f} tokens), "
            f"{args.max_new_tokens} new tokens max; choice: {n_choice} items, {len(choice)} options\n"
        )

        rows = []
        batches = (1, args.batch)
        for task in ("generation", "choice"):
            # alternate the two modes run by run, so a busy machine slows both alike
            runs: dict[int, list[tuple[float, float]]] = {b: [] for b in batches}
            for rep in range(args.repeats + 1):
                for batch in batches:
                    engine.batch_size = batch
                    if task == "generation":
                        seconds, out = timed(lambda: engine.generate(gen))
                        items, tokens = len(gen), sum(g.completion_tokens for g in out)
                    else:
                        seconds, out = timed(lambda: engine.loglikelihood(choice))
                        items, tokens = n_choice, sum(r.tokens for r in out)
                    if rep:  # the first round warms up
                        runs[batch].append((items / seconds, tokens / seconds))
            per_batch = {
                b: (statistics.median(r[0] for r in runs[b]), statistics.median(r[1] for r in runs[b])) for b in batches
            }
            base = per_batch[1][0]
            for batch, (items_s, tok_s) in per_batch.items():
                rows.append((task, batch, f"{items_s:.2f}", f"{tok_s:.1f}", f"{items_s / base:.2f}x"))
        engine.close()

    from chatvec.eval.tabulate import table

    print(table(("task", "batch", "items/s", "tokens/s", "vs batch 1"), rows))
    print(
        f"\nmedians of {args.repeats} runs after one warm-up; tokens/s counts generated tokens (generation) "
        "or scored option tokens (choice)"
    )


if __name__ == "__main__":
    main()
