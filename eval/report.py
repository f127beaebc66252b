"""A run's report: one self-contained HTML page with its PNG plots beside it.

What it shows, following the chat vector paper's evaluation:
  - first, the headline metrics (format, skill, instruction following, language fidelity) against
    the ratio, a line per embedding policy / vector / method, with the CP and chat models as
    reference lines, and a table of those numbers with their 95% intervals;
  - per metric, a target x model heatmap (the models as the paper names them: CP, chat,
    CP + 0.5 CV, ...) and the metric against the ratio per target, with the CP and chat models
    as reference lines;
  - the language-fidelity table (share of answers in the target language; the paper's Table 7);
  - for nightly runs, each metric's trend over the last runs and the regression table;
  - the whole summary, and the cells that failed.

Rows of several benchmarks that share a metric within one target are averaged (stderr combined as
independent); the full per-benchmark numbers are in the summary table at the end. The plots
are eval/report_plots.py; intervals are explained there. No Ray here.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chatvec.core.storage import Store
from chatvec.eval.gating import split_metric
from chatvec.eval.history import Change, lower_is_better
from chatvec.eval.report_answers import browser_html, judge_status_html, paired_html, paired_rows
from chatvec.eval.report_plots import (
    INTERVAL_NOTE,
    applies,
    fmt,
    fmt_interval,
    headline_metrics,
    interval95,
    plot_heatmap,
    plot_overview,
    plot_ratio,
    plot_trend,
    target_title,
)

logger = logging.getLogger(__name__)

FIDELITY_METRICS = ("in_language", "language_fidelity", "fidelity")
INDEX = "index.html"


@dataclass
class ModelInfo:
    """One evaluated model and where it sits in the sweep."""

    name: str
    role: str  # "merged", "cp", "chat" or "extra"
    uri: str = ""
    target: str | None = None  # None: evaluated in every target's language (chat, global extras)
    language: str | None = None
    vector: str | None = None
    ratio: float | None = None
    method: str | None = None
    embeddings: str | None = None
    reused: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Target:
    name: str
    language: str


@dataclass
class _Layout:
    """Who is who: targets (rows), variants (columns) and the label of every model."""

    targets: list[Target]
    variants: list[str]
    label: dict[str, str]  # model name -> variant label
    series: dict[str, str]  # merged model name -> series label (its label without the ratio)
    models: dict[str, ModelInfo] = field(default_factory=dict)


def _layout(models: Sequence[ModelInfo], summary_rows: list[dict]) -> _Layout:
    by_name = {m.name: m for m in models}
    for r in summary_rows:  # models the caller did not describe still get a column
        by_name.setdefault(r["model"], ModelInfo(name=r["model"], role="extra"))
    merged = [m for m in by_name.values() if m.role == "merged"]
    vary = {attr: len({getattr(m, attr) for m in merged}) > 1 for attr in ("vector", "method", "embeddings")}
    chats = [m for m in by_name.values() if m.role == "chat"]
    label, series = {}, {}
    for m in merged:
        vec = m.vector if vary["vector"] else "CV"
        extra = []
        if vary["method"] or (m.method or "add") != "add":
            extra.append(m.method or "add")
        if vary["embeddings"]:
            extra.append(f"emb {m.embeddings or 'all'}")
        tail = f" ({', '.join(extra)})" if extra else ""
        label[m.name] = f"CP + {m.ratio:g} {vec}{tail}" if m.ratio is not None else m.name
        # legends have room: spell the embedding policy out
        long = [e if not e.startswith("emb ") else f"embeddings: {e[4:]}" for e in extra]
        series[m.name] = f"CP + r {vec}" + (f" ({', '.join(long)})" if long else "")
    for m in by_name.values():
        if m.role == "cp":
            label[m.name] = "CP"
        elif m.role == "chat":
            label[m.name] = "chat" if len(chats) == 1 or not m.vector else f"chat ({m.vector})"
        elif m.role not in ("merged",):
            label[m.name] = m.name
    order = {"cp": 0, "chat": 1, "extra": 2, "merged": 3}
    ranked = sorted(
        by_name.values(),
        key=lambda m: (
            order.get(m.role, 2),
            m.vector or "",
            m.method or "",
            m.embeddings or "",
            m.ratio or 0.0,
            m.name,
        ),
    )
    variants = list(dict.fromkeys(label[m.name] for m in ranked))
    targets: dict[str, Target] = {}
    for m in by_name.values():  # in the caller's order: the sweep file's
        if m.target and m.language:
            targets.setdefault(m.target, Target(m.target, m.language))
    if not targets:  # no sweep layout given: one row per language
        for r in summary_rows:
            targets.setdefault(r["language"], Target(r["language"], r["language"]))
    return _Layout(list(targets.values()), variants, label, series, by_name)


def _pool(rows: list[dict]) -> tuple[float, float, int] | None:
    """Mean of the rows' values (one per benchmark), stderr combined as independent, total n."""
    vals = [(r["value"], r.get("stderr")) for r in rows if r.get("value") is not None and not math.isnan(r["value"])]
    if not vals:
        return None
    m = len(vals)
    mean = sum(v for v, _ in vals) / m
    se = math.sqrt(sum((s or 0.0) ** 2 for _, s in vals if s is None or not math.isnan(s))) / m
    return mean, se, sum(int(r.get("n") or 0) for r in rows)


def _cells(rows: list[dict], layout: _Layout, metric: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(target, variant) -> pooled (mean, stderr, n) of ``metric``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["metric"] != metric:
            continue
        m = layout.models[r["model"]]
        for t in layout.targets:
            if t.language == r["language"] and applies(m, t):
                groups.setdefault((t.name, layout.label[m.name]), []).append(r)
    return {k: p for k, v in groups.items() if (p := _pool(v)) is not None}


# -- HTML ----------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin:20px 0 6px} .meta{color:#555;font-size:14px}
.note{background:#fff7d6;border:1px solid #e6cf6a;padding:8px 12px;border-radius:4px;font-size:14px}
.bad{background:#fde2e1;border:1px solid #e08b86;padding:8px 12px;border-radius:4px}
.ok{background:#e3f4e1;border:1px solid #8cc585;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ccc;padding:4px 8px;white-space:nowrap} th{background:#f2f2f2;text-align:left}
td.long{white-space:normal;word-break:break-all;min-width:320px} td.num{text-align:right;font-variant-numeric:tabular-nums} tr.reg td{background:#fde2e1}
tr.imp td{background:#e9f6e7} img{max-width:100%;border:1px solid #eee;margin:4px 0}
img.heat{max-width:min(100%,900px)} img.wide{max-width:min(100%,1300px)}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_class: Sequence[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        tds = []
        for v in row:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tds.append(f'<td class="num">{fmt(float(v), 4)}</td>')
            else:
                text = "–" if v is None else str(v)
                wide = ' class="long"' if len(text) > 60 else ""  # URIs wrap instead of widening the page
                tds.append(f"<td{wide}>{html.escape(text)}</td>")
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    return "\n".join(out) + "</table>"


def _fidelity_html(rows: list[dict], layout: _Layout) -> str:
    metric = next((m for m in FIDELITY_METRICS if any(r["metric"] == m for r in rows)), None)
    if metric is None:
        return "<p>No generated answers were scored for language fidelity in this run.</p>"
    # pooled by n over benchmarks: the share of all answers, as the paper counts it
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["metric"] != metric or r.get("value") is None:
            continue
        m = layout.models[r["model"]]
        for t in layout.targets:
            if t.language == r["language"] and applies(m, t):
                groups.setdefault((layout.label[m.name], t.name), []).append(r)
    body = []
    for v in layout.variants:
        line: list[Any] = [v]
        for t in layout.targets:
            g = groups.get((v, t.name))
            n = sum(int(r.get("n") or 0) for r in g) if g else 0
            if not g or n == 0:
                line.append(None)
                continue
            share = sum(r["value"] * int(r.get("n") or 0) for r in g) / n
            lo, hi = interval95(metric, share, None, n)
            unscored = sum(int(r.get("n_unscored") or 0) for r in g)
            extra = f", {unscored} undetermined" if unscored else ""
            line.append(f"{100 * share:.0f}% (n={n}{extra}) [{100 * lo:.0f}–{100 * hi:.0f}]")
        if any(x is not None for x in line[1:]):
            body.append(line)
    heads = ["model"] + [target_title(t) for t in layout.targets]
    return (
        f"<p>Share of generated answers written in the target language (metric <code>{metric}</code>, "
        "all generating benchmarks of the target pooled), with its 95% Wilson interval in brackets. "
        "Only the answer's prose is read (code, links, numbers and formulas are stripped); answers with "
        "too little prose to tell are undetermined and left out of the share. "
        "The paper's Table 7 reports this for ratios 0.5 and 1.0: too strong a vector makes the model "
        "answer in English.</p>" + _table(heads, body)
    )


def headline_table(summary: pa.Table, models: Sequence[ModelInfo] = ()) -> tuple[list[str], list[list[str]]]:
    """The headline metrics of every model, per target: ``mean [95% interval]`` strings.

    Headers are ``target, model`` and then the headline metrics present (eval/report_plots.py
    HEADLINE); rows follow the report's model order. Empty when no headline metric was scored."""
    rows = summary.to_pylist()
    layout = _layout(list(models), rows)
    return _headline_rows(rows, layout, headline_metrics({r["metric"] for r in rows}))


def _headline_rows(rows: list[dict], layout: _Layout, headline) -> tuple[list[str], list[list[str]]]:
    cells = {metric: _cells(rows, layout, metric) for metric, _ in headline}
    heads = ["target", "model"] + [metric for metric, _ in headline]
    body = []
    for t in layout.targets:
        for v in layout.variants:
            if not any((t.name, v) in cells[metric] for metric, _ in headline):
                continue
            line = [target_title(t), v]
            for metric, _ in headline:
                c = cells[metric].get((t.name, v))
                if c is None:
                    line.append("–")
                    continue
                line.append(fmt_interval(metric, c[0], *interval95(metric, *c)))
            body.append(line)
    return heads, body


def _overview_html(rows: list[dict], layout: _Layout, metrics: Sequence[str], images: list[tuple[str, bytes]]) -> str:
    headline = headline_metrics(metrics)
    if not headline:
        return ""
    out = ["<h2>At a glance</h2>"]
    png = plot_overview(headline, {m: _cells(rows, layout, m) for m, _ in headline}, layout)
    if png is not None:
        images.append(("overview.png", png))
        out.append('<img class="wide" src="overview.png" alt="headline metrics against ratio">')
    what = "; ".join(f"<code>{html.escape(m)}</code>: {html.escape(w)}" for m, w in headline)
    out.append(
        f'<p class="meta">{what}. {html.escape(INTERVAL_NOTE)} Lines: merged models, one per '
        "embedding policy / vector / method; solid grey: the CP model; dashed purple: the chat "
        "model (shaded: their intervals).</p>"
    )
    policies = {m.embeddings or "all" for m in layout.models.values() if m.role == "merged"}
    if policies - {"all"}:
        said = {
            "all": "all: the vector is added to every tensor",
            "skip": "skip: the embedding and LM-head rows stay as the CP model has them (as the paper did for Breeze)",
            "overlap": "overlap: added to the rows both vocabularies share by index",
            "by-token": "by-token: added to the rows of the same token string",
        }
        out.append(
            '<p class="meta">Embedding policies: '
            + "; ".join(html.escape(said.get(p, p)) for p in sorted(policies))
            + ".</p>"
        )
    heads, body = _headline_rows(rows, layout, headline)
    out.append(_table(heads, body))
    return "\n".join(out)


def _changes_html(
    changes: list[Change], previous: str | None, k: float, paired: Mapping[tuple, Any] | None = None
) -> str:
    paired = paired or {}
    if previous is None:
        return '<p class="note">No earlier run of this sweep to compare with: this run is the baseline.</p>'
    regs = [c for c in changes if c.regression]
    head = ["model", "language", "benchmark", "metric", previous, "this run", "change", "threshold", "better", "rule"]

    def line(c: Change) -> list[Any]:
        rule = "paired" if (c.model, c.language, c.benchmark, c.metric) in paired else "k x se"
        return [
            c.model,
            c.language,
            c.benchmark,
            c.metric,
            c.a,
            c.b,
            c.delta,
            c.threshold,
            "lower" if c.lower_is_better else "higher",
            rule,
        ]

    rule = (
        f"a move in the bad direction larger than {k:g} x the combined stderr; where both runs scored "
        "the same items (rule: paired), a paired bootstrap interval of the same coverage wholly on the "
        "bad side of 0"
        if paired
        else f"a move in the bad direction larger than {k:g} x the combined stderr"
    )
    if regs:
        out = (
            f'<p class="bad"><b>{len(regs)} regression(s)</b> against run {html.escape(previous)} '
            f"({html.escape(rule)}).</p>"
        )
        out += _table(head, [line(c) for c in regs], ["reg"] * len(regs))
    else:
        out = f'<p class="ok">No regression against run {html.escape(previous)} ({html.escape(rule)}).</p>'
    both = [c for c in changes if c.status == "both"]
    cls = ["reg" if c.regression else "imp" if c.improvement else "" for c in both]
    out += f"<details><summary>All {len(both)} comparable rows</summary>{_table(head, [line(c) for c in both], cls)}</details>"
    other = [c for c in changes if c.status != "both"]
    if other:
        out += "<details><summary>Rows in only one of the two runs</summary>"
        out += _table(
            ["model", "language", "benchmark", "metric", "only in"],
            [
                [c.model, c.language, c.benchmark, c.metric, previous if c.status == "gone" else "this run"]
                for c in other
            ],
        )
        out += "</details>"
    return out


def write_report(
    out_uri: str,
    *,
    run_id: str,
    summary: pa.Table,
    models: Sequence[ModelInfo] = (),
    title: str | None = None,
    history: pa.Table | None = None,
    history_runs: Sequence[str] = (),
    changes: list[Change] | None = None,
    previous_run: str | None = None,
    k: float = 2.0,
    failed_cells: Sequence[str] = (),
    notes: Sequence[str] = (),
    created_at: str | None = None,
    results_uri: str | None = None,
    samples: Sequence[dict] | None = None,
    paired_changes: Mapping[tuple, Any] | None = None,
) -> str:
    """Write ``index.html`` and its PNGs under ``out_uri`` (index last); return the index's URI.

    With the run's sample rows (``samples``, or read from ``results_uri``) the report also holds
    the paired comparisons, the judge's bookkeeping and the answer browser (answers/*.html).
    ``paired_changes`` (``chatvec.eval.paired.pair_changes(...).paired``) marks the regression rows that
    were decided item by item."""
    from chatvec.eval.browser import load_samples, write_pages

    store = Store(out_uri)
    rows = summary.to_pylist()
    if samples is None and results_uri is not None:
        samples = load_samples(results_uri)
    layout = _layout(list(models), rows)
    metrics = sorted({r["metric"] for r in rows})
    hist_rows = history.to_pylist() if history is not None else []
    parts = [f"<h1>{html.escape(title or 'chatvec report')}: run {html.escape(run_id)}</h1>"]
    meta = [f"{len(layout.models)} models", f"{len(layout.targets)} targets", f"{len(rows)} summary rows"]
    if created_at:
        meta.insert(0, html.escape(created_at))
    parts.append(f'<p class="meta">{" · ".join(meta)}</p>')
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if failed_cells:
        parts.append(f'<p class="bad"><b>{len(failed_cells)} cell(s) failed</b>; their rows are missing below:</p>')
        parts.append("<ul>" + "".join(f"<li><code>{html.escape(c)}</code></li>" for c in failed_cells) + "</ul>")
    if changes is not None:
        parts.append("<h2>Regressions</h2>" + _changes_html(changes, previous_run, k, paired_changes))
    images: list[tuple[str, bytes]] = []
    parts.append(_overview_html(rows, layout, metrics, images))
    parts.append("<h2>Language fidelity</h2>" + _fidelity_html(rows, layout))
    pages = []
    if samples:
        parts.append("<h2>Paired comparisons</h2>" + paired_html(paired_rows(samples, layout), lower_is_better))
        judged = judge_status_html(samples, layout)
        if judged:
            parts.append("<h2>Judging</h2>" + judged)
        # CP first, chat last, the merged models between them, as a reader compares them
        rank = {"cp": 0, "merged": 1, "extra": 2, "chat": 3}
        order = sorted(
            (m for v in layout.variants for m in layout.models if layout.label[m] == v),
            key=lambda m: rank.get(layout.models[m].role, 2),
        )
        pages = write_pages(
            store,
            samples,
            labels=layout.label,
            roles={m.name: m.role for m in layout.models.values()},
            order=order,
            title=title or "",
        )
        parts.append("<h2>Answers</h2>" + browser_html(pages))
    parts.append("<h2>Metrics</h2>")
    if not metrics:
        parts.append("<p>No results.</p>")
    else:
        parts.append(f'<p class="meta">{html.escape(INTERVAL_NOTE)}</p>')
        if any(split_metric(m)[1] for m in metrics):
            parts.append(
                '<p class="meta">A metric ending in <code>@lang</code> is its benchmark\'s metric counting only '
                "answers in the target language (<code>gate: in_language</code>): an answer in another "
                "language fails, one whose language could not be told is left out of n. It follows the "
                "plain metric, so the two sit side by side.</p>"
            )
    for i, metric in enumerate(metrics):
        cells = _cells(rows, layout, metric)
        if not cells:
            unscored = sum(int(r.get("n_unscored") or 0) for r in rows if r["metric"] == metric)
            parts.append(
                f"<h3>{html.escape(metric)}</h3><p class='note'>No item has a score for this metric "
                f"({unscored} unscored): without a judge, or when every judgment was unparseable, "
                "judged metrics stay empty rather than guessed. The samples files hold the judge's raw output.</p>"
            )
            continue
        benchmarks = sorted({r["benchmark"] for r in rows if r["metric"] == metric})
        parts.append(
            f"<h3>{html.escape(metric)}</h3><p class='meta'>benchmarks: {html.escape(', '.join(benchmarks))}</p>"
        )
        stem = f"{i:02d}-{_slug(metric)}"
        images.append((f"heatmap-{stem}.png", plot_heatmap(metric, cells, layout)))
        parts.append(f'<img class="heat" src="heatmap-{stem}.png" alt="{html.escape(metric)} heatmap">')
        ratio_png = plot_ratio(metric, cells, layout)
        if ratio_png is not None:
            images.append((f"ratio-{stem}.png", ratio_png))
            parts.append(f'<br><img class="wide" src="ratio-{stem}.png" alt="{html.escape(metric)} against ratio">')
        trend_png = _trend(metric, hist_rows, list(history_runs), layout) if hist_rows else None
        if trend_png is not None:
            images.append((f"trend-{stem}.png", trend_png))
            parts.append(f'<p class="meta">trend over runs {html.escape(", ".join(history_runs))}:</p>')
            parts.append(f'<img class="wide" src="trend-{stem}.png" alt="{html.escape(metric)} trend">')
    parts.append("<h2>Models</h2>")
    parts.append(
        _table(
            ["label", "name", "role", "target", "ratio", "vector", "method", "embeddings", "uri"],
            [
                [
                    layout.label[m.name],
                    m.name,
                    m.role,
                    m.target or "all",
                    m.ratio,
                    m.vector,
                    m.method,
                    m.embeddings,
                    m.uri,
                ]
                for m in layout.models.values()
            ],
        )
    )
    cols = ["model", "language", "benchmark", "metric", "value", "stderr", "n", "n_unscored"]
    parts.append(f"<details><summary>Summary table ({len(rows)} rows)</summary>")
    parts.append(
        _table(cols, [[r.get(c) for c in cols] for r in sorted(rows, key=lambda r: tuple(str(r[c]) for c in cols[:4]))])
    )
    parts.append("</details>")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or 'chatvec')} {html.escape(run_id)}</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    for name, data in images:
        store.write_bytes(name, data)
    store.write_text(INDEX, page)
    return store.describe(INDEX)


def _trend(metric: str, hist_rows: list[dict], runs: list[str], layout: _Layout) -> bytes | None:
    per_run = {rid: _cells([r for r in hist_rows if r["run"] == rid], layout, metric) for rid in runs}
    return plot_trend(metric, per_run, runs, layout)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:60]
