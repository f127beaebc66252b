"""Paired comparisons: two models that answered the same items, compared item by item.

CP, chat and merged models answer the same prompts, so the question "is model B better than model
A?" is about the per-item differences ``b_i - a_i``. Items that are hard for one model are hard
for the other, so those differences vary much less than the scores do, and the paired interval
is much tighter than the unpaired ``mean_b - mean_a +- 1.96 sqrt(se_a^2 + se_b^2)``.

- The interval: a seeded paired bootstrap (items resampled with replacement, both models'
  scores of an item kept together), percentile 95% interval of the mean difference.
- 0/1 metrics (exact match, in-language, unsafe, ...) also get McNemar's exact test on the
  discordant items (B right where A is wrong, and the reverse): its two-sided p-value.
- Only items scored for both models are paired (an unscored row on either side leaves the pair
  out; ``n_only`` counts them), so a judge's unparseable output never biases the difference.

No Ray and no pyarrow compute here: rows are plain dicts (samples table rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000
SEED = 0
# kinds whose cell value is not the mean of its items' scores (perplexity: exp(total NLL / total
# tokens); lm-eval: the harness's own aggregates): an item-by-item mean difference would not be
# the difference of the numbers the summary shows, so they are compared unpaired
UNPAIRED_KINDS = frozenset({"perplexity", "lmeval"})


@dataclass(frozen=True)
class PairedDiff:
    """B minus A over the items both scored."""

    metric: str
    n: int  # paired items
    mean_a: float | None
    mean_b: float | None
    diff: float | None  # mean of b_i - a_i
    lo: float | None  # 95% paired bootstrap interval of ``diff``
    hi: float | None
    p_mcnemar: float | None = None  # 0/1 metrics only
    discordant: tuple[int, int] | None = None  # (b better, a better), 0/1 metrics only
    n_only: int = 0  # items scored for only one of the two
    unpaired_lo: float | None = None  # the interval that ignores the pairing, for comparison
    unpaired_hi: float | None = None

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    @property
    def width(self) -> float | None:
        return None if self.lo is None or self.hi is None else self.hi - self.lo

    @property
    def unpaired_width(self) -> float | None:
        if self.unpaired_lo is None or self.unpaired_hi is None:
            return None
        return self.unpaired_hi - self.unpaired_lo


def is_binary(values: Iterable[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def mcnemar_exact(b_better: int, a_better: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(n, 1/2)."""
    n = b_better + a_better
    if n == 0:
        return 1.0
    k = min(b_better, a_better)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_interval(
    diffs: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` under resampling of items."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no paired items")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    # in chunks: samples x n indices at once would be large for big benchmarks
    chunk = max(1, min(samples, 2_000_000 // d.size))
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _z(level: float) -> float:
    from statistics import NormalDist

    return Z95 if level == 0.95 else NormalDist().inv_cdf(0.5 + level / 2)


def level_of(k: float) -> float:
    """The coverage of mean +- k standard errors under a normal law (k = 2: 95.45%)."""
    from statistics import NormalDist

    return 2 * NormalDist().cdf(k) - 1


def _unpaired(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float | None, float | None]:
    if len(a) < 2 or len(b) < 2:
        return None, None
    ma, mb = float(np.mean(a)), float(np.mean(b))
    se = math.sqrt(float(np.var(a, ddof=1)) / len(a) + float(np.var(b, ddof=1)) / len(b))
    return mb - ma - z * se, mb - ma + z * se


def paired_difference(
    metric: str,
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_only: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> PairedDiff:
    """B minus A from aligned score lists (``a[i]`` and ``b[i]`` are the same item's)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores must align: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        return PairedDiff(metric, 0, None, None, None, None, None, n_only=n_only)
    diffs = [y - x for x, y in zip(a, b)]
    lo, hi = bootstrap_interval(diffs, samples=samples, seed=seed, level=level)
    p = disc = None
    if is_binary(a) and is_binary(b):
        b_better = sum(1 for x, y in zip(a, b) if y > x)
        a_better = sum(1 for x, y in zip(a, b) if x > y)
        disc = (b_better, a_better)
        p = mcnemar_exact(b_better, a_better)
    ulo, uhi = _unpaired(a, b, _z(level))
    return PairedDiff(
        metric,
        n,
        float(np.mean(a)),
        float(np.mean(b)),
        float(np.mean(diffs)),
        lo,
        hi,
        p_mcnemar=p,
        discordant=disc,
        n_only=n_only,
        unpaired_lo=ulo,
        unpaired_hi=uhi,
    )


def item_scores(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], float | None]:
    """(language, benchmark, metric, item_id) -> score, for one model's sample rows (kinds whose
    value is not a mean of item scores are left out)."""
    return {
        (r["language"], r["benchmark"], r["metric"], str(r["item_id"])): r["score"]
        for r in rows
        if r.get("kind") not in UNPAIRED_KINDS
    }


def compare_models(
    rows_a: Iterable[Mapping[str, Any]],
    rows_b: Iterable[Mapping[str, Any]],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> dict[tuple[str, str, str], PairedDiff]:
    """(language, benchmark, metric) -> B minus A, for every cell both models have."""
    sa, sb = item_scores(rows_a), item_scores(rows_b)
    cells: dict[tuple[str, str, str], tuple[list[float], list[float], int]] = {}
    for key in sorted(set(sa) | set(sb)):
        cell = key[:3]
        xs, ys, only = cells.setdefault(cell, ([], [], 0))
        x, y = sa.get(key), sb.get(key)
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y)):
            xs.append(float(x))
            ys.append(float(y))
        else:
            cells[cell] = (xs, ys, only + 1)
    return {
        cell: paired_difference(cell[2], xs, ys, n_only=only, samples=samples, seed=seed, level=level)
        for cell, (xs, ys, only) in cells.items()
    }


def same_items(rows_a: Iterable[Mapping[str, Any]], rows_b: Iterable[Mapping[str, Any]]) -> bool:
    """Both sides scored exactly the same items of each cell (the condition for pairing)."""

    def scored(rows):
        return {k for k, v in item_scores(rows).items() if v is not None}

    return scored(rows_a) == scored(rows_b)


def format_diff(d: PairedDiff, digits: int = 3) -> str:
    """``+0.125 [+0.080, +0.170] *`` (the star: the interval excludes 0), with McNemar's p."""
    if d.diff is None:
        return "–"
    text = f"{d.diff:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}]"
    if d.p_mcnemar is not None:
        text += f" p={d.p_mcnemar:.2g}"
    return text + (" *" if d.excludes_zero else "")


# -- two runs of the same models (nightly checks, ``chatvec results --compare``) -----------------
@dataclass
class PairedCheck:
    changes: list  # chatvec.eval.history.Change, the paired rule applied where it could be
    paired: dict[tuple[str, str, str, str], PairedDiff]  # (model, language, benchmark, metric) -> diff


def _by_cell(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """(model, language, benchmark, metric) -> item -> score; each gateable metric also under its
    gated name (``exact_match@lang``), scored as chatvec.eval.gating scores it, so a gated
    summary row is compared item by item like any other."""
    from chatvec.eval.gating import gated_name, gated_score

    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for r in rows:
        if r.get("kind") in UNPAIRED_KINDS:
            continue
        scores = [(r["metric"], r["score"])]
        failure = _gate_failure(r.get("kind"), r["metric"])
        if failure is not None:
            scores.append((gated_name(r["metric"]), gated_score(r["score"], r.get("in_language"), failure)))
        for metric, score in scores:
            cell = out.setdefault((r["model"], r["language"], r["benchmark"], metric), {})
            if score is not None and not math.isnan(score):
                cell[str(r["item_id"])] = float(score)
    return out


@lru_cache(maxsize=256)
def _gate_failure(kind_name: str | None, metric: str) -> float | None:
    from chatvec.core.errors import InputError
    from chatvec.eval.kinds import get_kind

    try:
        return get_kind(kind_name).gate_failure(metric) if kind_name else None
    except InputError:  # a kind this installation does not know: its rows are compared ungated only
        return None


def pair_changes(
    changes: Sequence[Any],
    rows_a: Iterable[Mapping[str, Any]],
    rows_b: Iterable[Mapping[str, Any]],
    *,
    k: float = 2.0,
    min_delta: float = 0.0,
    seed: int = SEED,
) -> PairedCheck:
    """Re-decide ``chatvec.eval.history.compare``'s changes item by item where both runs scored exactly the
    same items of a cell: a regression is then a paired interval (at the coverage of +-k standard
    errors, 95.45% for k = 2) that lies wholly on the bad side of 0, and a move of at least
    ``min_delta``. ``threshold`` becomes the distance from the change to the interval's end nearer
    0, so ``worse > threshold`` still reads as before. Other cells keep the unpaired rule."""
    from dataclasses import replace

    cells_a, cells_b = _by_cell(rows_a), _by_cell(rows_b)
    level = level_of(k)
    out, paired = [], {}
    for c in changes:
        key = (c.model, c.language, c.benchmark, c.metric)
        xa, xb = cells_a.get(key), cells_b.get(key)
        if c.status != "both" or not xa or not xb or set(xa) != set(xb) or len(xa) < 2:
            out.append(c)
            continue
        items = sorted(xa)
        d = paired_difference(c.metric, [xa[i] for i in items], [xb[i] for i in items], seed=seed, level=level)
        paired[key] = d
        delta = d.diff
        if delta is None or c.a is None or c.b is None or abs((c.b - c.a) - delta) > 1e-9 * max(1.0, abs(delta)):
            out.append(c)  # the summary's value is not the mean of these items: leave it unpaired
            continue
        threshold = max((delta - d.lo) if delta >= 0 else (d.hi - delta), min_delta)
        worse = -delta if not c.lower_is_better else delta
        out.append(
            replace(
                c,
                threshold=threshold,
                regression=worse > threshold and d.excludes_zero,
                improvement=-worse > threshold and d.excludes_zero,
            )
        )
    return PairedCheck(out, paired)


def paired_table_text(check: PairedCheck, a: str, b: str) -> str:
    """The cells compared item by item, for the terminal."""
    from chatvec.eval.tabulate import table

    if not check.paired:
        return f"no cell of {a} and {b} scored the same items: compared by k x the combined stderr only"
    rows = [[*key, d.n, format_diff(d)] for key, d in sorted(check.paired.items())]
    return (
        f"item by item ({b} minus {a}, paired bootstrap; McNemar's p for 0/1 metrics; * the interval "
        "excludes 0):\n" + table(["model", "language", "benchmark", "metric", "n", "difference [interval]"], rows)
    )
