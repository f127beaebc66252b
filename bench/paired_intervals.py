"""How much tighter are paired intervals than unpaired ones? Measured on the toy world's demo run.

Every merged model is compared with the CP model and with the chat model on the same 240 toy
instructions, per metric: the 95% interval of the difference from a seeded paired bootstrap
(eval/paired.py) against the unpaired ``diff +- 1.96 sqrt(se_a^2 + se_b^2)`` the nightly check
uses for runs that did not score the same items. The table prints both widths and their ratio,
then the median ratio, over the comparisons where both models vary (where one model scores the
same on every item, pairing cannot help and both intervals agree).

Usage:  python bench/paired_intervals.py                      # runs `chatvec demo` first (minutes)
        python bench/paired_intervals.py --results DIR/store/results/run=ID
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def demo_results(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "demo", "--out", str(out), "--workers", "0", "--eval-workers", "0"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    [run] = sorted((out / "store" / "results").glob("run=*"))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", help="a sweep run's results folder (default: run the demo into a temporary folder)")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    args = ap.parse_args()

    from chatvec.eval.browser import load_samples
    from chatvec.eval.report import ModelInfo, _layout
    from chatvec.eval.report_answers import paired_rows

    with tempfile.TemporaryDirectory() as tmp:
        results = Path(args.results) if args.results else demo_results(Path(tmp))
        info = json.loads((results / "sweep.json").read_text(encoding="utf-8"))
        samples = load_samples(str(results))
    layout = _layout([ModelInfo.from_dict(m) for m in info["models"]], [])
    rows = paired_rows(samples, layout, seed=args.seed)
    head = (
        f"{'target':8s} {'model':24s} {'against':8s} {'metric':14s} {'n':>4s} {'diff':>7s} "
        f"{'paired':>7s} {'unpaired':>8s} {'ratio':>6s}"
    )
    print(head)
    print("-" * len(head))
    ratios: dict[str, list[float]] = {}
    for r in rows:
        d = r["diff"]
        ratio = d.unpaired_width / d.width if d.width and d.unpaired_width else None
        if ratio is not None and d.mean_a not in (0.0, 1.0) and d.mean_b not in (0.0, 1.0):
            ratios.setdefault(r["metric"], []).append(ratio)
        print(
            f"{r['target'].name:8s} {r['label'][:24]:24s} {r['ref_label'][:8]:8s} {r['metric'][:14]:14s} {d.n:4d} "
            f"{d.diff:+7.3f} {d.width or 0:7.3f} {d.unpaired_width or 0:8.3f} "
            f"{'' if ratio is None else f'{ratio:5.2f}x':>6s}"
        )
    resolved = sum(
        1
        for r in rows
        if r["diff"].excludes_zero
        and r["diff"].unpaired_lo is not None
        and r["diff"].unpaired_lo <= 0 <= r["diff"].unpaired_hi
    )
    lost = sum(
        1
        for r in rows
        if not r["diff"].excludes_zero
        and r["diff"].unpaired_lo is not None
        and not r["diff"].unpaired_lo <= 0 <= r["diff"].unpaired_hi
    )
    print(f"\n{len(rows)} comparisons: {resolved} exclude 0 only when paired, {lost} only when unpaired")
    print()
    print("median unpaired/paired width, comparisons where both models vary:")
    _medians("merged against CP / chat", ratios)
    _medians(
        "merged against merged (same target: neighbouring ratios, all against skip)",
        _merged_pairs(samples, layout, args.seed),
    )


def _medians(title: str, ratios: dict[str, list[float]]) -> None:
    print(f"  {title}")
    every = [x for xs in ratios.values() for x in xs]
    for metric, xs in sorted(ratios.items()):
        print(f"    {metric:14s} {statistics.median(xs):5.2f}x  ({len(xs)} comparisons)")
    if every:
        print(f"    {'all':14s} {statistics.median(every):5.2f}x  ({len(every)} comparisons)")


def _merged_pairs(samples: list[dict], layout, seed: int) -> dict[str, list[float]]:
    """Ratios for pairs of merged models of one target that differ in one setting."""
    from chatvec.eval.paired import compare_models

    by_model: dict[str, list[dict]] = {}
    for r in samples:
        by_model.setdefault(r["model"], []).append(r)
    merged = [m for m in layout.models.values() if m.role == "merged"]
    ratios: dict[str, list[float]] = {}
    for i, a in enumerate(merged):
        for b in merged[i + 1 :]:
            if a.target != b.target:
                continue
            same_policy = a.embeddings == b.embeddings
            if not ((same_policy and a.ratio != b.ratio) or (not same_policy and a.ratio == b.ratio)):
                continue
            for t in layout.targets:
                if t.name != a.target:
                    continue
                ra = [r for r in by_model.get(a.name, []) if r["language"] == t.language]
                rb = [r for r in by_model.get(b.name, []) if r["language"] == t.language]
                for (_, _, metric), d in compare_models(ra, rb, seed=seed).items():
                    if d.width and d.unpaired_width and d.mean_a not in (0.0, 1.0) and d.mean_b not in (0.0, 1.0):
                        ratios.setdefault(metric, []).append(d.unpaired_width / d.width)
    return ratios


if __name__ == "__main__":
    main()
