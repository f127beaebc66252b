"""A recipe search on the toy world, timed, and its winner against the grid on test.

    python bench/tune.py [--file examples/demo-tune.yaml] [--workers 0] [--seeds 0 1 2]
                         [--trials 24] [--limit N] [--out DIR]

Runs ``chatvec tune`` (``chatvec.runs.tune_run.run_tune``) on the file once per seed (the seed of
the search and of its dev/test split), each in a fresh store, and prints two tables:

* time: trials per minute of the search, and the search's engine time split into engine start
  (loading the CP model), swaps (the in-memory merge and the weights put in place), generation
  (the cells: prompts, generation, scoring, result files) and judging;
* test: the tuned recipe (the best trial on dev) against the grid's best point on dev, both on
  the held-out test items: their values and the paired bootstrap interval of the difference.

The file's paths are relative to the project root, where this script runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in text]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="examples/demo-tune.yaml")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--trials", type=int, default=None, help="default: the file's budget")
    ap.add_argument("--limit", type=int, default=None, help="items per benchmark and language before the split")
    ap.add_argument("--out", default=None, help="where the stores go (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.chdir(ROOT)

    from chatvec.core.config import load_config
    from chatvec.runs.tune_config import load_tune
    from chatvec.runs.tune_run import run_tune

    out = Path(args.out or tempfile.mkdtemp(prefix="chatvec-bench-tune-"))
    config = load_config(None)
    times, tests = [], []
    for seed in args.seeds:
        tune = load_tune(args.file)
        tune.root = str(out / f"seed{seed}")
        tune.search.seed = seed
        if args.trials:
            tune.search.trials = args.trials
        if args.limit:
            tune.eval.limit = args.limit
        start = time.perf_counter()
        outcome = run_tune(
            tune, source=args.file, run_id=f"bench-{seed}", config=config, workers=args.workers, echo=lambda s: None
        )
        wall = time.perf_counter() - start
        t = outcome.timings
        other = t["search_s"] - t["swap_s"] - t["generate_s"] - t["judge_s"] - t["engine_start_s"]
        times.append(
            [
                seed,
                t["trials"],
                t["search_s"],
                t["trials_per_min"],
                t["engine_start_s"],
                t["swap_s"] / max(t["swaps"], 1),
                t["swap_s"],
                t["generate_s"],
                t["judge_s"],
                max(other, 0.0),
                wall,
            ]
        )
        by_role = {f.role: f for f in outcome.finalists}
        best, grid = by_role.get("best"), by_role.get("grid")
        key = next(iter(best.dev)) if best else None
        c = outcome.verdict.comparison
        tests.append(
            [
                seed,
                best.name if best else "-",
                best.dev.get(key) if best else "-",
                best.test.get(key) if best else "-",
                grid.name if grid else "-",
                grid.dev.get(key) if grid and key else "-",
                grid.test.get(key) if grid and key else "-",
                c.text() if c else "-",
                "yes" if c and c.better else "no",
            ]
        )
    print(f"time (s; {args.workers} worker(s), stores under {out}):")
    print(
        table(
            [
                "seed",
                "trials",
                "search",
                "trials/min",
                "engine start",
                "swap/trial",
                "swap total",
                "generation",
                "judging",
                "other",
                "wall",
            ],
            times,
        )
    )
    print("\ntest (the first objective; tuned minus grid, paired 95% bootstrap interval, McNemar's p):")
    print(table(["seed", "tuned", "dev", "test", "grid best", "dev", "test", "tuned - grid [interval]", "wins"], tests))


if __name__ == "__main__":
    main()
