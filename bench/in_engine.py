"""In-engine ratio sweeps against the checkpoint path, in the same run.

    python bench/in_engine.py [--worlds toy,100m] [--engines hf,vllm] [--ratios 6] [--limit 24]
                              [--max-new-tokens 16] [--threads 1] [--out DIR]

For each world and engine, the same sweep (one vector, one CP target, ``--ratios`` ratios, one
benchmark, no baselines, ``--workers 0``: everything in this process, so Ray's start-up is not
part of either figure) runs twice through ``chatvec.runs.sweep_run.run_sweep``:

* checkpoint: every point merged to a checkpoint under the store's models/, then loaded into a
  fresh engine and evaluated;
* in-engine: one engine loaded from the CP model; every point's merged tensors computed in memory
  and swapped in (``--in-engine``).

Worlds: ``toy`` is the shipped toy world (0.93M parameters, its toy-task benchmark in L2);
``100m`` a random Llama triple of about 95M parameters (hidden 768, 16 layers, head size 192)
built here, on the shipped chat sample in English. The table splits each sweep's wall time into
merge (writing checkpoints), engine start (model loads), swap (in-memory merge + weights in place)
and the rest (evaluation: prompts, generation, scoring, result files). vLLM's import is paid once
before timing. Each sweep gets a fresh store.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"

SWEEP = """\
name: bench-{mode}
vectors:
  v: {{base: {base}, chat: {chat}}}
targets:
  - {{language: {language}, cp: {cp}, benchmarks: [{benchmark}]}}
ratios: [{ratios}]
embeddings: [{embeddings}]
baselines: {{cp: false, chat: false}}
engine: {engine}
device: cpu
root: {root}
eval: {{limit: {limit}, max_new_tokens: {max_new_tokens}, batch_size: 16}}
"""


@dataclass
class Split:
    wall: float = 0.0
    merge: float = 0.0
    start: float = 0.0
    swap: float = 0.0
    starts: int = 0

    @property
    def rest(self) -> float:
        return self.wall - self.merge - self.start - self.swap


class _Collect(logging.Handler):
    """Engine loads and weight swaps as the code logs them (their own timings)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.split = Split()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg
        if record.name == "chatvec.eval.engines" and isinstance(msg, str) and msg.startswith("loaded "):
            self.split.start += float(record.args[-1])
            self.split.starts += 1
        elif record.name == "chatvec.cluster.in_engine" and isinstance(msg, str) and msg.startswith("swapped "):
            self.split.swap += float(record.args[3])


def build_world(kind: str, work: Path) -> dict:
    if kind == "toy":
        return {
            "cp": TOY / "cp",
            "base": TOY / "base",
            "chat": TOY / "chat",
            "language": "toy-l2",
            "benchmark": TOY / "benchmarks.yaml",
            "embeddings": "skip",
        }
    from chatvec.demo.tiny import build_triple

    folder = work / "world-100m"
    if not (folder / "cp" / "config.json").exists():
        print("building a ~95M-parameter triple (once) ...", flush=True)
        build_triple(folder, hidden=768, layers=16, shard_size="200MB")
    return {
        "cp": folder / "cp",
        "base": folder / "base",
        "chat": folder / "chat",
        "language": "en",
        "benchmark": "chat",
        "embeddings": "all",
    }


def run_one(world: dict, engine: str, in_engine: bool, args, work: Path) -> Split:
    import chatvec.runs.sweep_run as sweep_run
    from chatvec.core.config import ChatvecConfig, EvalSettings, VLLMSettings
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    mode = "in-engine" if in_engine else "checkpoint"
    root = work / f"store-{engine}-{mode}"
    shutil.rmtree(root, ignore_errors=True)
    ratios = [round(0.25 * (i + 1), 2) for i in range(args.ratios)]
    path = work / f"sweep-{engine}-{mode}.yaml"
    path.write_text(
        SWEEP.format(
            mode=mode,
            engine=engine,
            root=root.as_posix(),
            ratios=", ".join(map(str, ratios)),
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            **{k: (v.as_posix() if isinstance(v, Path) else v) for k, v in world.items()},
        )
    )
    sweep = load_sweep(str(path))
    sweep.in_engine = in_engine
    config = ChatvecConfig(eval=EvalSettings(vllm=VLLMSettings(enforce_eager=True, cpu_kvcache_gib=2)))
    collect = _Collect()
    for name in ("chatvec.eval.engines", "chatvec.cluster.in_engine"):
        logging.getLogger(name).addHandler(collect)
        logging.getLogger(name).setLevel(logging.INFO)
    merge_all = sweep_run._merge_all

    def timed_merge(*a, **kw):  # the checkpoint path's merges, timed where the sweep calls them
        start = time.perf_counter()
        try:
            return merge_all(*a, **kw)
        finally:
            collect.split.merge += time.perf_counter() - start

    sweep_run._merge_all = timed_merge
    start = time.perf_counter()
    try:
        outcome = run_sweep(sweep, run_id="bench", config=config, merge_workers=0, eval_workers=0, echo=lambda s: None)
    finally:
        sweep_run._merge_all = merge_all
        for name in ("chatvec.eval.engines", "chatvec.cluster.in_engine"):
            logging.getLogger(name).removeHandler(collect)
    collect.split.wall = time.perf_counter() - start
    if outcome.failed_cells:
        print("failed cells:", *outcome.failed_cells[:5], sep="\n  ")
    shutil.rmtree(root, ignore_errors=True)
    return collect.split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="toy,100m")
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--ratios", type=int, default=6)
    p.add_argument("--limit", type=int, default=24, help="items per cell")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (vLLM's CPU engine sets 1 in its process anyway; the same for both paths)",
    )
    p.add_argument("--out", default=None, help="work folder (default: a temporary one; the 100M triple is kept there)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="chatvec-bench-in-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    if "vllm" in engines:
        start = time.perf_counter()
        import vllm  # noqa: F401

        print(f"vLLM {vllm.__version__} imported in {time.perf_counter() - start:.1f} s (not counted below)")
    rows = []
    for kind in args.worlds.split(","):
        world = build_world(kind, work)
        for engine in engines:
            ckpt = run_one(world, engine, False, args, work)
            inside = run_one(world, engine, True, args, work)
            for mode, s in (("checkpoint", ckpt), ("in-engine", inside)):
                rows.append(
                    (kind, engine, mode, s.wall, s.merge, s.start, s.starts, s.swap, s.rest, s.wall / ckpt.wall)
                )
            print(f"{kind} {engine}: checkpoint {ckpt.wall:.1f} s, in-engine {inside.wall:.1f} s", flush=True)
    print(f"\n{args.ratios} ratios, {args.limit} items x {args.max_new_tokens} new tokens per point; seconds\n")
    heads = ("world", "engine", "path", "wall s", "merge s", "engine start s (n)", "swap s", "eval s", "x checkpoint")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for kind, engine, mode, wall, merge, start, starts, swap, rest, ratio in rows:
        print(
            f"| {kind} | {engine} | {mode} | {wall:.1f} | {merge:.1f} | {start:.1f} ({starts}) | {swap:.2f} | "
            f"{rest:.1f} | {ratio:.2f} |"
        )
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
