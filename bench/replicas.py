"""One model on one engine against the same model on two (`--replicas 2`), in the same run.

    python bench/replicas.py [--items 512,1024,2048] [--max-new-tokens 64] [--repeats 3] [--hidden 512] [--layers 4]

Builds a small random Llama with demo/tiny.py and, for each size in ``--items``, a chat benchmark
of that many questions; starts one local Ray (2 CPUs), then times `run_eval` on that one model,
``workers=1`` (one engine) and ``workers=2, replicas=2`` (two engines pulling chunks of the cell's
items), alternating, each engine on one CPU thread (``OMP_NUM_THREADS=1``). Each timing is the
whole evaluation call: actor start, model load, generation, the cell written. Prints medians over
``--repeats`` and the ratio of two replicas to one per size; the rows written are checked to be
the same, item for item.
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
    ap.add_argument("--items", default="512,1024,2048", help="comma-separated cell sizes")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
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
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
        config = ChatvecConfig(eval=EvalSettings(cpus_per_engine=1, device="cpu", batch_size=16))
        arms = (("1 engine", dict(workers=1)), ("2 replicas", dict(workers=2, replicas=2)))
        table = []
        for items in [int(x) for x in args.items.split(",")]:
            data = work / f"questions-{items}.jsonl"
            data.write_text(
                "".join(
                    json.dumps({"id": f"q{i}", "question": f"Question {i}: why is the sky blue?"}) + "\n"
                    for i in range(items)
                )
            )
            common = dict(
                benchmarks=[f"long={data}:chat:en"],
                languages=["en"],
                device="cpu",
                max_new_tokens=args.max_new_tokens,
                config=config,
                show_progress=False,
            )
            times: dict[str, list[float]] = {label: [] for label, _kw in arms}
            outs: dict[str, Path] = {}
            for r in range(args.repeats):
                for label, kw in arms:
                    out = work / f"out-{items}-{label.replace(' ', '-')}-{r}"
                    start = time.perf_counter()
                    outcome = run_eval({"m": model}, out_uri=str(out), **kw, **common)
                    times[label].append(time.perf_counter() - start)
                    assert outcome.ok, outcome.failed
                    outs[label] = out
            same = rows(outs["1 engine"]) == rows(outs["2 replicas"])
            table.append((items, times, same))
        print(
            f"\none model, {args.max_new_tokens} new tokens per item, hf engine, 1 CPU thread per engine, "
            f"medians of {args.repeats}"
        )
        print(f"{'items':>6} {'1 engine s':>11} {'2 replicas s':>13} {'ratio':>6}  {'runs (1 | 2)':<40} same rows")
        for items, times, same in table:
            one, two = (statistics.median(times[label]) for label, _kw in arms)
            runs = " | ".join(" ".join(f"{t:.1f}" for t in times[label]) for label, _kw in arms)
            print(f"{items:>6} {one:>11.2f} {two:>13.2f} {two / one:>5.2f}x  {runs:<40} {same}")
    finally:
        try:
            ray.shutdown()
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
