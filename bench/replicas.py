"""One model on one engine against the same model on two (`--replicas 2`), in the same run.

    python bench/replicas.py [--items 96] [--max-new-tokens 24] [--repeats 3] [--hidden 256] [--layers 4]

Builds a small random Llama with demo/tiny.py and a chat benchmark of ``--items`` questions, starts
one local Ray (2 CPUs), then times `run_eval` on that one model, ``workers=1`` (one engine) and
``workers=2, replicas=2`` (two engines, the cell's items in two chunks), alternating, each engine
on one CPU thread (``OMP_NUM_THREADS=1``). Each timing is the whole evaluation call: actor start,
model load, generation, the cell written. Prints medians over ``--repeats`` and the ratio of two
replicas to one; the rows written are checked to be the same, item for item.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")


def rows(out: Path) -> list[tuple]:
    from chatvec.core.storage import Store
    from chatvec.eval.results import read_table

    store = Store(str(out))
    return [
        (r["item_id"], r["metric"], r["response"], r["score"])
        for rel in store.list("samples")
        for r in read_table(store, rel).to_pylist()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import secrets

    import ray

    from chatvec.cluster.eval_driver import run_eval
    from chatvec.core.config import ChatvecConfig, EvalSettings
    from chatvec.demo.tiny import build_model_dir

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    try:
        model = str(build_model_dir(work / "m", seed=5, hidden=args.hidden, layers=args.layers, shard_size=None))
        data = work / "questions.jsonl"
        data.write_text(
            "".join(
                json.dumps({"id": f"q{i}", "question": f"Question {i}: why is the sky blue?"}) + "\n"
                for i in range(args.items)
            )
        )
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
        config = ChatvecConfig(eval=EvalSettings(cpus_per_engine=1, device="cpu", batch_size=16))
        common = dict(
            benchmarks=[f"long={data}:chat:en"],
            languages=["en"],
            device="cpu",
            max_new_tokens=args.max_new_tokens,
            config=config,
            show_progress=False,
        )
        times: dict[str, list[float]] = {"1 engine": [], "2 replicas": []}
        outs: dict[str, Path] = {}
        for r in range(args.repeats):
            for label, kw in (("1 engine", dict(workers=1)), ("2 replicas", dict(workers=2, replicas=2))):
                out = work / f"out-{label.replace(' ', '-')}-{r}"
                start = time.perf_counter()
                outcome = run_eval({"m": model}, out_uri=str(out), **kw, **common)
                times[label].append(time.perf_counter() - start)
                assert outcome.ok, outcome.failed
                outs[label] = out
        same = rows(outs["1 engine"]) == rows(outs["2 replicas"])
        base = statistics.median(times["1 engine"])
        print(
            f"\none model, {args.items} items, {args.max_new_tokens} new tokens each, hf engine, 1 CPU thread per engine"
        )
        print(f"{'engines':<12} {'median s':>9} {'runs':>24} {'vs 1 engine':>12}")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"{label:<12} {med:9.2f} {' '.join(f'{t:.2f}' for t in ts):>24} {med / base:11.2f}x")
        print(f"rows identical item for item: {same}")
    finally:
        try:
            ray.shutdown()
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
