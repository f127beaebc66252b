"""The report's sections built from the samples (not only the summary): paired comparisons, the
judge's bookkeeping and the links to the answer browser.

- Paired comparisons: each merged model against the CP model of its target and against the chat
  model, per benchmark and metric of the target's language, on the items both scored
  (eval/paired.py): the difference, its 95% paired bootstrap interval, whether it excludes 0,
  McNemar's p for 0/1 metrics, and how much wider the unpaired interval would have been.
- Judging: per model and benchmark, how many judged rows were read (``ok``), unparseable, out of
  range, failed at the judge, or not judged (no judge given); unscored rows never enter a mean.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from chatvec.eval.browser import Page
from chatvec.eval.paired import PairedDiff, compare_models
from chatvec.eval.schema import NOT_JUDGED


def paired_rows(samples: Sequence[Mapping[str, Any]], layout: Any, *, seed: int = 0) -> list[dict]:
    """One dict per (target, merged model, reference, benchmark, metric)."""
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in samples:
        by_model[r["model"]].append(r)
    out = []
    for t in layout.targets:
        in_target = [m for m in layout.models.values() if (m.target == t.name if m.target else True)]
        refs = [m for m in in_target if m.role in ("cp", "chat")]
        for m in in_target:
            if m.role != "merged":
                continue
            for ref in refs:
                mine = [r for r in by_model.get(m.name, []) if r["language"] == t.language]
                theirs = [r for r in by_model.get(ref.name, []) if r["language"] == t.language]
                if not mine or not theirs:
                    continue
                for (_lang, bench, metric), d in sorted(compare_models(theirs, mine, seed=seed).items()):
                    if d.n == 0:
                        continue
                    out.append(
                        {
                            "target": t,
                            "model": m.name,
                            "label": layout.label[m.name],
                            "ref": ref.name,
                            "ref_label": layout.label[ref.name],
                            "benchmark": bench,
                            "metric": metric,
                            "diff": d,
                        }
                    )
    return out


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _signed(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def paired_html(rows: list[dict], lower_is_better) -> str:
    if not rows:
        return (
            "<p>No merged model shares scored items with a CP or chat model in this run, so there is "
            "nothing to pair.</p>"
        )
    head = [
        "target",
        "model",
        "against",
        "benchmark",
        "metric",
        "n",
        "model",
        "against",
        "difference",
        "95% paired interval",
        "excludes 0",
        "McNemar p",
        "unpaired width / paired",
    ]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        d: PairedDiff = r["diff"]
        better = (d.diff or 0) < 0 if lower_is_better(r["metric"]) else (d.diff or 0) > 0
        cls = ("imp" if better else "reg") if d.excludes_zero else ""
        ratio = f"{d.unpaired_width / d.width:.1f}x" if d.width and d.unpaired_width else "–"
        cells = [
            r["target"].name,
            r["label"],
            r["ref_label"],
            r["benchmark"],
            r["metric"],
            str(d.n),
            _num(d.mean_b),
            _num(d.mean_a),
            _signed(d.diff),
            f"[{_signed(d.lo)}, {_signed(d.hi)}]",
            "yes" if d.excludes_zero else "no",
            "–" if d.p_mcnemar is None else f"{d.p_mcnemar:.2g}",
            ratio,
        ]
        tds = "".join(
            f'<td class="num">{html.escape(c)}</td>' if i >= 5 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        lines.append(f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>")
    lines.append("</table>")
    n_only = sum(r["diff"].n_only for r in rows)
    note = (
        "<p class='meta'>Model minus the model it is compared with, item by item, on the items both "
        "scored: a seeded paired bootstrap (2,000 resamples of items) gives the 95% interval; for 0/1 "
        "metrics McNemar's exact test on the items where exactly one of the two is right gives p. Green: "
        "better beyond doubt, red: worse beyond doubt (the interval excludes 0). The last column: how "
        "many times wider the interval would be if the two models had answered different items "
        "(mean difference ± 1.96·√(se₁²+se₂²))."
        + (f" {n_only} item(s) scored for only one side are left out." if n_only else "")
        + "</p>"
    )
    decided = sum(r["diff"].excludes_zero for r in rows)
    head_line = f"<p><b>{decided} of {len(rows)}</b> comparisons exclude 0.</p>"
    return (
        note + head_line + "<details open><summary>All paired comparisons</summary>" + "\n".join(lines) + "</details>"
    )


def judge_status_html(samples: Sequence[Mapping[str, Any]], layout: Any) -> str:
    """Counts of judged rows by outcome, per model and benchmark; '' when nothing was judged."""
    counts: dict[tuple[str, str, str, str], Counter] = defaultdict(Counter)
    for r in samples:
        status = r.get("judge_status")
        if status in (None, NOT_JUDGED):
            continue
        label = layout.label.get(r["model"], r["model"])
        counts[(label, r["language"], r["benchmark"], r["metric"])][status] += 1
    if not counts:
        return ""
    statuses = sorted({s for c in counts.values() for s in c}, key=lambda s: (s != "ok", s))
    judges = sorted({r.get("judge_model") for r in samples if r.get("judge_model")})
    head = ["model", "language", "benchmark", "metric"] + statuses
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for key in sorted(counts):
        c = counts[key]
        bad = any(c[s] for s in statuses if s != "ok")
        tds = "".join(f"<td>{html.escape(k)}</td>" for k in key)
        tds += "".join(f'<td class="num">{c[s]}</td>' for s in statuses)
        lines.append(f'<tr class="reg">{tds}</tr>' if bad else f"<tr>{tds}</tr>")
    lines.append("</table>")
    total = sum(sum(c.values()) for c in counts.values())
    unread = sum(c[s] for c in counts.values() for s in c if s != "ok")
    who = ", ".join(f"<code>{html.escape(j)}</code>" for j in judges) or "none"
    return (
        f"<p>Judge: {who}. {total} judged row(s); {unread} without a score (unparseable, out of range, "
        "failed at the judge or not judged): they count in <code>n_unscored</code>, never in a mean. "
        "The raw judgments are in the answer browser and the samples files.</p>" + "\n".join(lines)
    )


def browser_html(pages: Sequence[Page]) -> str:
    if not pages:
        return "<p>No benchmark in this run generated answers.</p>"
    items = "".join(
        f'<li><a href="{html.escape(p.rel)}">{html.escape(p.benchmark)} in {html.escape(p.language)}</a> '
        f'<span class="meta">({p.items} items, {p.models} models)</span></li>'
        for p in pages
    )
    return (
        "<p>Every prompt with the answers of the CP, merged and chat models side by side, their scores, "
        "detected language and the judge's reasoning; filter by outcome (e.g. merged wrong, chat right).</p>"
        f"<ul>{items}</ul>"
    )
