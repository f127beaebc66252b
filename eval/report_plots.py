"""The report's plots (matplotlib, no pyplot) and the 95% intervals they and its tables show.

Every function takes cells already pooled by eval/report.py: ``{(target, variant label): (mean,
stderr, n)}``, so the plots only draw. Intervals: for rates (a share of items scored 0 or 1, e.g.
``exact_match``, ``in_language``, ``acc``) the Wilson score interval from the mean and ``n``,
which stays inside [0, 1] and is not empty at 0 or 1 (a stderr is 0 there); for any other metric
(a judge's 0-10 score, a perplexity) mean +- 1.96 stderr. No Ray here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from chatvec.eval.history import lower_is_better

Z95 = 1.959963984540054
# metrics whose every item scores 0 or 1: their mean is a rate
RATE_METRICS = frozenset(
    {
        "exact_match",
        "either_script",
        "closed",
        "in_language",
        "language_fidelity",
        "fidelity",
        "unsafe",
        "refusal",
        "acc",
        "acc_norm",
        "accuracy",
        "toxic_rate",
        "toxicity_probability",
    }
)
INTERVAL_NOTE = (
    "Error bars and bracketed ranges are 95% intervals: Wilson score intervals from n for rates "
    "(metrics where each item scores 0 or 1), mean \u00b1 1.96 stderr for other metrics."
)
# The report's first figure: what the chat vector paper asks of a merged model, in this order.
# (metric, what it measures); only the metrics a run has are drawn.
HEADLINE = (
    ("closed", "format: answers closed like the chat model"),
    ("either_script", "skill: right words, either script"),
    ("exact_match", "skill in the target language"),
    ("judge_score", "instruction following (judge 0-10)"),
    ("in_language", "language fidelity: answers in the target language"),
    ("unsafe", "unsafe answers"),
    ("toxicity", "TOX: toxicity of continuations (the paper's column; lower is better)"),
)


def is_rate(metric: str, mean: float) -> bool:
    from chatvec.eval.gating import base_metric

    return base_metric(metric) in RATE_METRICS and 0.0 <= mean <= 1.0


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (math.nan, math.nan)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval95(metric: str, mean: float, se: float | None, n: int) -> tuple[float, float]:
    """The 95% interval of a cell's mean (see the module docstring for which kind)."""
    if is_rate(metric, mean) and n > 0:
        return wilson(mean, n)
    if se is None or math.isnan(se):
        return (mean, mean)
    return (mean - Z95 * se, mean + Z95 * se)


def fmt_interval(metric: str, mean: float, lo: float, hi: float) -> str:
    """``0.34 [0.28, 0.40]``: rates with two decimals, so a column of them lines up."""
    if is_rate(metric, mean):
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{fmt(mean, 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]"


def applies(model: Any, target: Any) -> bool:
    """A model belongs to one target's panel, or (no target: chat, global extras) to every one."""
    return model.target == target.name if model.target else True


def target_title(t: Any) -> str:
    return t.name if t.name == t.language else f"{t.name} ({t.language})"


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "\u2013"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def color(i: int) -> Any:
    """The same model keeps its colour in every panel of a figure."""
    from matplotlib import colormaps

    if i < 10:
        return colormaps["tab10"](i)
    return colormaps["tab20"]((2 * (i - 10) + 1) % 20)  # the lighter shades of the same hues


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(w: float, h: float):
    # Figure without pyplot: no global state, no GUI backend, safe in any thread
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _target_panels(layout):
    """A figure with a panel per target, at most three a row: (figure, axes grid, [(panel, target)])."""
    n = len(layout.targets)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _figure(4.6 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes, [(axes[idx // ncols][idx % ncols], t) for idx, t in enumerate(layout.targets)]


def _finish(fig, axes, n: int) -> None:
    """Hide unused panels; one legend for the whole figure, below it, so no line is covered."""
    ncols = len(axes[0])
    for idx in range(n, len(axes) * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 5),
            fontsize=10,
            frameon=False,
        )


# -- plots ---------------------------------------------------------------------------------------
def plot_heatmap(metric: str, cells: dict, layout) -> bytes:
    import numpy as np
    from matplotlib import colormaps

    cols = [v for v in layout.variants if any((t.name, v) in cells for t in layout.targets)]
    rows = [t for t in layout.targets if any((t.name, v) in cells for v in cols)]
    data = np.full((len(rows), len(cols)), np.nan)
    for i, t in enumerate(rows):
        for j, v in enumerate(cols):
            if (t.name, v) in cells:
                data[i, j] = cells[(t.name, v)][0]
    fig = _figure(max(4.5, 1.1 * len(cols) + 2.5), max(2.2, 0.6 * len(rows) + 1.6))
    ax = fig.add_subplot()
    # green is good whichever way the metric points; grey where a model has no value
    cmap = colormaps["RdYlGn_r" if lower_is_better(metric) else "RdYlGn"].with_extremes(bad="#dddddd")
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=[target_title(t) for t in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) < 0.2 or (v - vmin) / (vmax - vmin) > 0.8
                ax.text(j, i, fmt(float(v)), ha="center", va="center", fontsize=9, color="white" if dark else "black")
    arrow = "lower is better" if lower_is_better(metric) else "higher is better"
    ax.set_title(f"{metric} ({arrow})", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _merged(layout) -> list:
    return [m for m in layout.models.values() if m.role == "merged" and m.ratio is not None]


def _draw_ratio(ax, metric: str, cells: dict, layout, t, names: list[str], ratios: list[float]) -> None:
    """One panel: a line per series (vector, method, embedding policy) over the ratios, with 95%
    error bars; the CP and chat models as horizontal lines with their interval as a band."""
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for m in _merged(layout):
        key = (t.name, layout.label[m.name])
        if not applies(m, t) or key not in cells:
            continue
        mean, se, n = cells[key]
        lo, hi = interval95(metric, mean, se, n)
        series.setdefault(layout.series[m.name], []).append((m.ratio, mean, lo, hi))
    step = min((b - a for a, b in zip(ratios, ratios[1:])), default=1.0)
    # series side by side around each ratio, so their error bars do not hide each other
    shift = 0.06 * step
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        dx = (k - (len(series) - 1) / 2) * shift
        ax.errorbar(
            [p[0] + dx for p in pts],
            [p[1] for p in pts],
            yerr=[[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]],
            marker="o",
            ms=5,
            capsize=3,
            lw=1.8,
            label=name,
            color=color(names.index(name)),
        )
    lo_x, hi_x = (ratios[0] - 0.6 * step, ratios[-1] + 0.6 * step) if ratios else (0, 1)
    for variant, style in (("CP", dict(color="0.3", ls="-")), ("chat", dict(color="tab:purple", ls="--"))):
        if (t.name, variant) not in cells:
            continue
        mean, se, n = cells[(t.name, variant)]
        lo, hi = interval95(metric, mean, se, n)
        ax.axhline(mean, lw=1.4, label=variant, **style)
        if hi > lo:
            ax.axhspan(lo, hi, color=style["color"], alpha=0.12, lw=0)
    ax.set_xlim(lo_x, hi_x)
    ax.set_xticks(ratios, labels=[f"{r:g}" for r in ratios])
    ax.set_xlabel("ratio")
    if any(is_rate(metric, v[0]) for (tn, _), v in cells.items() if tn == t.name):
        ax.set_ylim(-0.04, 1.04)
    ax.grid(alpha=0.3)


def plot_ratio(metric: str, cells: dict, layout) -> bytes | None:
    """The metric against the ratio, one panel per target; CP and chat as reference lines."""
    merged = _merged(layout)
    if not merged:
        return None
    fig, axes, panels = _target_panels(layout)
    ratios = sorted({m.ratio for m in merged})
    names = sorted({layout.series[m.name] for m in merged})
    for ax, t in panels:
        _draw_ratio(ax, metric, cells, layout, t, names, ratios)
        ax.set_title(target_title(t), fontsize=10)
        ax.set_ylabel(metric)
    _finish(fig, axes, len(panels))
    return _png(fig)


def headline_metrics(metrics: Sequence[str]) -> list[tuple[str, str]]:
    """The headline metrics present, each followed by its gated form when a benchmark is gated
    (``exact_match@lang``: only answers in the target language count), so they sit side by side."""
    from chatvec.eval.gating import gated_name

    have = set(metrics)
    out = []
    for m, what in HEADLINE:
        if m in have:
            out.append((m, what))
        if m != "in_language" and gated_name(m) in have:
            out.append((gated_name(m), f"{what}, counting only answers in the target language"))
    return out


def plot_overview(headline: Sequence[tuple[str, str]], cells_by_metric: dict[str, dict], layout) -> bytes | None:
    """The first figure: each headline metric against the ratio, a line per embedding policy /
    vector / method, CP and chat as reference lines. One target: a 2-column grid of metrics;
    several: a row per metric, a column per target, so the languages sit side by side. None when
    there is no merged model to plot."""
    merged = _merged(layout)
    if not merged or not headline:
        return None
    ratios = sorted({m.ratio for m in merged})
    names = sorted({layout.series[m.name] for m in merged})
    if len(layout.targets) == 1:
        panels = [(layout.targets[0], metric, what) for metric, what in headline]
        ncols = min(len(headline), 2)
    else:
        panels = [(t, metric, what) for metric, what in headline for t in layout.targets]
        ncols = len(layout.targets)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.6 * ncols, 3.7 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for idx, (t, metric, what) in enumerate(panels):
        ax = axes[idx // ncols][idx % ncols]
        _draw_ratio(ax, metric, cells_by_metric.get(metric, {}), layout, t, names, ratios)
        where = "" if len(layout.targets) == 1 else f"{target_title(t)} \u00b7 "
        ax.set_title(f"{where}{what}", fontsize=11)
        ax.set_ylabel(metric, fontsize=10)
    _finish(fig, axes, len(panels))
    return _png(fig)


def plot_trend(metric: str, per_run: dict[str, dict], runs: list[str], layout) -> bytes | None:
    """The metric over the last runs, one panel per target, one line per model."""
    if len(runs) < 2:
        return None
    fig, axes, panels = _target_panels(layout)
    x = list(range(len(runs)))
    for ax, t in panels:
        for v in layout.variants:
            ys = [per_run[rid].get((t.name, v), (math.nan,))[0] for rid in runs]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(x, ys, marker="o", label=v, color=color(layout.variants.index(v)))
        ax.set_xticks(x, labels=runs, rotation=30, ha="right", fontsize=8)
        ax.set_title(target_title(t), fontsize=10)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    _finish(fig, axes, len(panels))
    return _png(fig)
