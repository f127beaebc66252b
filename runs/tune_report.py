"""The search's report section: ``<root>/reports/<run_id>/tune.html`` with its PNGs beside it.

What it shows: the verdict (the winner against the reference on test, with its paired interval),
the finalists' dev and test values and every paired comparison, the objective over the trials
(with the grid's best point and the CP model as reference lines), the Pareto front when there are
two objectives or more, the finalists' ratios over layer depth, and the table of every trial.
Plots use matplotlib without pyplot (as eval/report_plots.py does).
"""

from __future__ import annotations

import html
from typing import Any

from chatvec.core.storage import Store
from chatvec.eval.report_plots import _figure, _png
from chatvec.runs.tune_plan import TunePlan
from chatvec.runs.tune_space import ratio_value
from chatvec.runs.tune_study import COMPLETE, metric_key, pareto

PAGE = "tune.html"
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}.verdict{font-size:16px;padding:8px;background:#f6f8ff}"
    "img{max-width:100%}"
)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _objective_plot(plan: TunePlan, outcome, grid_dev: dict) -> bytes:
    o = plan.objectives[0]
    key, sign = metric_key(o), 1 if o.direction == "maximize" else -1
    done = [r for r in outcome.trials if r.state == COMPLETE]
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot()
    ax.scatter(
        [r.number for r in done],
        [r.values[0] for r in done],
        c=["tab:blue" if r.feasible else "tab:gray" for r in done],
        s=18,
        label="trial (gray: breaks a constraint)",
    )
    best, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r.number):
        if r.feasible and (best is None or sign * r.values[0] > sign * best):
            best = r.values[0]
        if best is not None:
            xs.append(r.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:blue", label="best so far")
    refs = {f.role: f for f in outcome.finalists}
    for role, color in (("grid", "tab:orange"), ("cp", "tab:red"), ("chat", "tab:green")):
        f = refs.get(role)
        if f is not None and f.dev.get(key) is not None:
            ax.axhline(f.dev[key], color=color, ls="--", lw=1, label=f"{role} ({f.name})")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{o.metric} on dev")
    ax.legend(fontsize=7)
    return _png(fig)


def _pareto_plot(plan: TunePlan, outcome) -> bytes:
    a, b = plan.objectives[:2]
    done = [r for r in outcome.trials if r.feasible]
    front = pareto(done, [o.direction for o in plan.objectives])
    fig = _figure(5, 4)
    ax = fig.add_subplot()
    ax.scatter([r.values[0] for r in done], [r.values[1] for r in done], s=16, c="tab:gray", label="feasible trial")
    ax.scatter([r.values[0] for r in front], [r.values[1] for r in front], s=28, c="tab:blue", label="Pareto front")
    ax.set_xlabel(f"{a.metric} ({a.direction})")
    ax.set_ylabel(f"{b.metric} ({b.direction})")
    ax.legend(fontsize=7)
    return _png(fig)


def _layer_plot(plan: TunePlan, outcome) -> bytes:
    """Each trial finalist's ratio against layer depth (0: first layer, 1: last): a flat line
    for a scalar ratio, the interpolated control points for a per-layer one."""
    import numpy as np

    fig = _figure(6, 3.2)
    ax = fig.add_subplot()
    depth = np.linspace(0, 1, 50)
    for f in outcome.finalists:
        if f.record is None:
            continue
        for vector in plan.space.vectors:
            value = ratio_value(f.record.params, vector, plan.space)
            value = value["default"] if isinstance(value, dict) else value
            points = value if isinstance(value, list) else [value, value]
            ys = np.interp(depth, np.linspace(0, 1, len(points)), points)
            ax.plot(depth, ys, label=f"{f.role} {f.name} ({vector})")
    ax.set_xlabel("layer depth")
    ax.set_ylabel("ratio")
    ax.legend(fontsize=7)
    return _png(fig)


def write_tune_report(plan: TunePlan, outcome, grid_dev: dict) -> str:
    store = Store(plan.report_uri)
    keys = [metric_key(o) for o in plan.objectives + plan.constraints]
    parts = [f"<h1>{html.escape(plan.tune.name or 'tune')}: search run {html.escape(plan.run_id)}</h1>"]
    parts.append(f'<p class="verdict">{html.escape(outcome.verdict.text)}</p>')
    objectives = "; ".join(f"{o.direction} {o.label()}" for o in plan.objectives)
    constraints = "; ".join(c.text() + f" ({c.benchmark}, {c.language})" for c in plan.constraints) or "none"
    n_dev = sum(len(s.dev) for s in plan.splits)
    n_test = sum(len(s.test) for s in plan.splits)
    parts.append(
        f"<p>Objective: {html.escape(objectives)}. Constraints: {html.escape(constraints)}. "
        f"{len(outcome.trials)} trial(s) ({html.escape(plan.tune.search.sampler or 'default')} sampler, seed "
        f"{plan.tune.search.seed}); {n_dev} dev and {n_test} test item(s), split recorded in tune/split.json.</p>"
    )
    parts.append("<h2>Dev against test</h2>")
    rows = [[f.role, f.name] + [v for k in keys for v in (f.dev.get(k), f.test.get(k))] for f in outcome.finalists]
    parts.append(_table(["role", "model"] + [f"{k} {part}" for k in keys for part in ("dev", "test")], rows))
    if outcome.comparisons:
        parts.append(
            "<h2>Paired comparisons on test</h2><p>finalist minus reference, 95% paired bootstrap interval, McNemar's p for 0/1 metrics; * the interval excludes 0.</p>"
        )
        parts.append(
            _table(
                ["finalist", "reference", "metric", "n", "difference [interval]", "better"],
                [[c.b, c.a, c.objective, c.diff.n, c.text(), "yes" if c.better else "no"] for c in outcome.comparisons],
            )
        )
    figures = {
        "tune-objective.png": _objective_plot(plan, outcome, grid_dev),
        "tune-layers.png": _layer_plot(plan, outcome),
    }
    if len(plan.objectives) > 1:
        figures["tune-pareto.png"] = _pareto_plot(plan, outcome)
    for name, data in figures.items():
        store.write_bytes(name, data)
        parts.append(f'<h2>{html.escape(name[5:-4])}</h2><img src="{name}">')
    parts.append("<h2>Trials</h2>")
    names = sorted({k for r in outcome.trials for k in r.params})
    parts.append(
        _table(
            ["trial", "model", "state", "feasible"] + names + keys,
            [
                [r.number, r.name, r.state, "yes" if r.feasible else "no"]
                + [r.params.get(n) for n in names]
                + [r.metrics.get(k) for k in keys]
                for r in outcome.trials
            ],
        )
    )
    if outcome.timings:
        parts.append("<h2>Time</h2>" + _table(list(outcome.timings), [list(outcome.timings.values())]))
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>tune {html.escape(plan.run_id)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    store.write_text(PAGE, page)
    return store.describe(PAGE)
