"""The answer browser: per benchmark and language, one page with every prompt and the answers of
the CP model, every merged model and the chat model side by side.

Each answer shows its scores, the language it was detected in and the judge's reasoning (the raw
judgment, folded). The page filters by outcome: "model X worse than / better than / same as
model Y on metric M" (for a 0/1 metric "merged wrong, chat right" is "merged worse than chat"),
with ready-made filters for each merged model against the CP and chat models, and a text search.
Plain JavaScript in the page; it loads nothing from the network.

Only benchmarks whose kind generates answers get a page (perplexity and multiple choice have
none to show). No Ray here.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatvec.core.storage import Store

FOLDER = "answers"


@dataclass(frozen=True)
class Page:
    benchmark: str
    language: str
    rel: str  # relative to the report's folder
    items: int
    models: int


def load_samples(results: str | Store) -> list[dict]:
    """Every sample row of a run's results folder (``<out>/samples/...parquet``)."""
    from chatvec.eval.results import read_table

    store = results if isinstance(results, Store) else Store(results)
    rows: list[dict] = []
    for rel in store.list("samples"):
        if rel.endswith(".parquet"):
            rows.extend(read_table(store, rel).to_pylist())
    return rows


def page_rel(benchmark: str, language: str) -> str:
    return f"{FOLDER}/{_slug(benchmark)}--{_slug(language)}.html"


def write_pages(
    store: Store,
    rows: Iterable[Mapping[str, Any]],
    *,
    labels: Mapping[str, str],
    roles: Mapping[str, str],
    order: Sequence[str],
    title: str = "",
) -> list[Page]:
    """Write one page per (benchmark, language) with answers under ``store``/answers/.

    ``labels``: model name -> its label in the report ("CP", "chat", "CP + 0.5 CV"); ``roles``:
    model name -> cp / chat / merged / extra; ``order``: the models' column order."""
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["benchmark"], r["language"])].append(r)
    pages = []
    for (benchmark, language), cell_rows in sorted(cells.items()):
        if not any(r.get("response") is not None for r in cell_rows):
            continue
        text, n_items, n_models = render_page(
            cell_rows, benchmark=benchmark, language=language, labels=labels, roles=roles, order=order, title=title
        )
        rel = page_rel(benchmark, language)
        store.write_text(rel, text)
        pages.append(Page(benchmark, language, rel, n_items, n_models))
    return pages


# -- one page ------------------------------------------------------------------------------------
def _question(details: dict, rows: list[Mapping[str, Any]]) -> str:
    for key in ("question", "request"):
        if isinstance(details.get(key), str):
            return details[key]
    if isinstance(details.get("turns"), list):
        return "\n\n".join(f"({i}) {t}" for i, t in enumerate(details["turns"], start=1))
    return next((r["prompt"] for r in rows if r.get("prompt")), "")


def _reference(details: dict) -> str | None:
    for key in ("reference", "answer"):
        if isinstance(details.get(key), str) and details[key]:
            return details[key]
    return None


def _item_key(item_id: str) -> tuple:
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


def render_page(
    rows: Sequence[Mapping[str, Any]],
    *,
    benchmark: str,
    language: str,
    labels: Mapping[str, str],
    roles: Mapping[str, str],
    order: Sequence[str],
    title: str = "",
) -> tuple[str, int, int]:
    """(HTML, items, models) of one (benchmark, language) page."""
    by_item: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_item[str(r["item_id"])][r["model"]].append(r)
    present = {r["model"] for r in rows}
    models = [m for m in order if m in present] + sorted(present - set(order))
    metrics = sorted(
        {r["metric"] for r in rows if r.get("score") is not None}
        | {r["metric"] for r in rows if r.get("judge_status") not in (None, "not_needed")}
    )
    binary = {
        m
        for m in metrics
        if all(r["score"] in (0.0, 1.0) for r in rows if r["metric"] == m and r.get("score") is not None)
    }
    label = {m: labels.get(m, m) for m in models}
    cards = []
    for item_id in sorted(by_item, key=_item_key):
        per_model = by_item[item_id]
        any_rows = [r for rs in per_model.values() for r in rs]
        details = _loads(next((r.get("details") for r in any_rows if r.get("details")), None))
        scores: dict[str, float] = {}
        cols = []
        for m in models:
            mrows = per_model.get(m, [])
            for r in mrows:
                s = r.get("score")
                if s is not None and not (isinstance(s, float) and math.isnan(s)):
                    scores[f"{m}\t{r['metric']}"] = s
            cols.append(_answer_html(mrows, label[m], roles.get(m, "extra"), binary))
        question = _question(details, any_rows)
        reference = _reference(details)
        search = " ".join([question, reference or ""] + [str(r.get("response") or "") for r in any_rows]).lower()
        ref_html = f'<div class="ref"><b>reference</b> {html.escape(reference)}</div>' if reference else ""
        cards.append(
            f'<section class="item" data-scores="{html.escape(json.dumps(scores, ensure_ascii=False))}" '
            f'data-text="{html.escape(search)}"><h3>item {html.escape(item_id)}</h3>'
            f'<div class="q">{html.escape(question)}</div>{ref_html}'
            f'<div class="answers" style="grid-template-columns:repeat({len(models)},minmax(230px,1fr))">'
            + "".join(cols)
            + "</div></section>"
        )
    presets = _presets(models, roles, metrics, binary, label)
    config = {
        "models": [{"name": m, "label": label[m]} for m in models],
        "metrics": metrics,
        "binary": sorted(binary),
        "presets": presets,
        "metric": _main_metric(metrics, binary),
    }
    heading = f"{title + ': ' if title else ''}{benchmark} in {language}"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>answers: {html.escape(heading)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Answers: {html.escape(heading)}</h1>"
        f'<p class="meta">{len(by_item)} items · {len(models)} models · '
        '<a href="../index.html">back to the report</a></p>'
        + _controls_html()
        + f'<p id="count" class="meta"></p><div id="items">{"".join(cards)}</div>'
        f"<script>const CONFIG = {_script_json(config)};\n{_JS}</script></body></html>"
    )
    return page, len(by_item), len(models)


def _answer_html(rows: list[Mapping[str, Any]], label: str, role: str, binary: set[str]) -> str:
    if not rows:
        return f'<div class="ans missing"><div class="who">{html.escape(label)}</div><i>no answer</i></div>'
    first = rows[0]
    chips = []
    for r in sorted(rows, key=lambda r: r["metric"]):
        s = r.get("score")
        if s is None:
            status = r.get("judge_status") or "unscored"
            if status == "not_needed":
                status = (
                    "undetermined"
                    if r["metric"] == "in_language" and r.get("detected_language") == "undetermined"
                    else "unscored"
                )
            chips.append(
                f'<span class="chip none" title="{html.escape(r.get("error") or status)}">'
                f"{html.escape(r['metric'])}: {html.escape(status)}</span>"
            )
            continue
        cls = ("good" if s == 1.0 else "bad") if r["metric"] in binary else "num"
        value = f"{s:g}"
        chips.append(f'<span class="chip {cls}">{html.escape(r["metric"])}: {value}</span>')
    found = next((r for r in rows if r.get("detected_language")), first)
    lang = found.get("detected_language") or "–"
    if found.get("detected_script"):
        lang += f" ({found['detected_script']})"
    judged = [r for r in rows if r.get("judge_raw")]
    judge = "".join(
        f'<details class="judge"><summary>judge on {html.escape(r["metric"])} '
        f"({html.escape(r.get('judge_status') or '')})</summary><pre>{html.escape(r['judge_raw'])}</pre></details>"
        for r in judged
    )
    return (
        f'<div class="ans {html.escape(role)}"><div class="who">{html.escape(label)}</div>'
        f'<pre class="resp">{html.escape(first.get("response") or "")}</pre>'
        f'<div class="chips">{"".join(chips)}</div><div class="lang">detected: {html.escape(lang)}</div>'
        f"{judge}</div>"
    )


_PREFERRED = ("judge_score", "exact_match", "accuracy", "unsafe")  # what a reader asks about first


def _main_metric(metrics: Sequence[str], binary: set[str]) -> str | None:
    if not metrics:
        return None
    return (
        next((m for m in _PREFERRED if m in metrics), None)
        or next((m for m in metrics if m in binary and m != "in_language"), None)
        or next((m for m in metrics if m != "in_language"), metrics[0])
    )


def _presets(
    models: Sequence[str], roles: Mapping[str, str], metrics: Sequence[str], binary: set[str], label: Mapping[str, str]
) -> list[dict]:
    """Ready-made filters: each merged model against the CP and chat models, on the first
    headline-like metric (a 0/1 one when there is one)."""
    if not metrics:
        return []
    metric = _main_metric(metrics, binary)
    refs = [(m, roles.get(m)) for m in models if roles.get(m) in ("cp", "chat")]
    out = []
    right, wrong = ("right", "wrong") if metric in binary else ("higher", "lower")
    for m in models:
        if roles.get(m) != "merged":
            continue
        for ref, role in refs:
            name = "CP" if role == "cp" else "chat"
            out.append(
                {
                    "label": f"{label[m]}: merged {wrong}, {name} {right} ({metric})",
                    "x": m,
                    "rel": "lt",
                    "y": ref,
                    "metric": metric,
                }
            )
            out.append(
                {
                    "label": f"{label[m]}: merged {right}, {name} {wrong} ({metric})",
                    "x": m,
                    "rel": "gt",
                    "y": ref,
                    "metric": metric,
                }
            )
    return out


def _controls_html() -> str:
    return (
        '<div class="controls"><label>preset <select id="preset"><option value="">(none)</option></select></label>'
        '<label>metric <select id="metric"></select></label>'
        '<label>model <select id="x"></select></label>'
        '<label>is <select id="rel"><option value="any">(any)</option><option value="lt">worse than</option>'
        '<option value="gt">better than</option><option value="eq">same as</option></select></label>'
        '<label>model <select id="y"></select></label>'
        '<label>search <input id="q" type="search" placeholder="words in prompt or answers"></label></div>'
    )


def _script_json(obj: Any) -> str:
    # inside <script>: "</" must not close the element
    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/")


def _loads(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:80]


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222}
h1{font-size:21px;margin:0 0 4px} h3{font-size:14px;margin:0 0 6px;color:#555} .meta{color:#555;font-size:13px}
.controls{display:flex;flex-wrap:wrap;gap:10px;background:#f4f4f4;padding:8px;border-radius:4px;font-size:13px;
position:sticky;top:0;z-index:2} .controls select,.controls input{font-size:13px}
.item{border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0;overflow-x:auto}
.q{white-space:pre-wrap;font-weight:600;margin-bottom:4px}
.ref{font-size:13px;color:#225;margin-bottom:6px;white-space:pre-wrap}
.answers{display:grid;gap:8px}
.ans{border:1px solid #e4e4e4;border-radius:4px;padding:6px;font-size:13px;background:#fff}
.ans.cp{background:#f6f6f6} .ans.chat{background:#f7f2fb} .ans.missing{color:#999}
.who{font-weight:700;margin-bottom:4px}
pre{white-space:pre-wrap;word-break:break-word;margin:0 0 4px;font-family:inherit}
.judge pre{font-family:ui-monospace,monospace;font-size:12px;background:#fafafa;padding:4px}
.chip{display:inline-block;border-radius:9px;padding:0 6px;margin:1px;font-size:12px;background:#eef}
.chip.good{background:#d9f2d5} .chip.bad{background:#f9d6d4} .chip.none{background:#eee;color:#666}
.lang{color:#666;font-size:12px} .hidden{display:none}
"""

_JS = r"""
(function () {
  const $ = (id) => document.getElementById(id);
  const fill = (sel, opts) => { for (const [v, t] of opts) { const o = document.createElement('option');
    o.value = v; o.textContent = t; sel.appendChild(o); } };
  fill($('metric'), CONFIG.metrics.map((m) => [m, m]));
  fill($('x'), CONFIG.models.map((m) => [m.name, m.label]));
  fill($('y'), CONFIG.models.map((m) => [m.name, m.label]));
  fill($('preset'), CONFIG.presets.map((p, i) => [String(i), p.label]));
  if (CONFIG.metric) $('metric').value = CONFIG.metric;
  if (CONFIG.models.length > 1) $('y').selectedIndex = CONFIG.models.length - 1;
  const items = Array.from(document.querySelectorAll('.item'));
  const scores = items.map((el) => JSON.parse(el.dataset.scores));
  function apply() {
    const metric = $('metric').value, x = $('x').value, y = $('y').value, rel = $('rel').value;
    const q = $('q').value.trim().toLowerCase();
    let shown = 0;
    items.forEach((el, i) => {
      let ok = true;
      if (rel !== 'any') {
        const a = scores[i][x + '\t' + metric], b = scores[i][y + '\t' + metric];
        ok = a !== undefined && b !== undefined &&
          ((rel === 'lt' && a < b) || (rel === 'gt' && a > b) || (rel === 'eq' && a === b));
      }
      if (ok && q) ok = el.dataset.text.includes(q);
      el.classList.toggle('hidden', !ok);
      if (ok) shown += 1;
    });
    $('count').textContent = 'showing ' + shown + ' of ' + items.length + ' items';
  }
  $('preset').addEventListener('change', () => {
    const p = CONFIG.presets[Number($('preset').value)];
    if (p) { $('metric').value = p.metric; $('x').value = p.x; $('y').value = p.y; $('rel').value = p.rel; }
    else { $('rel').value = 'any'; }
    apply();
  });
  for (const id of ['metric', 'x', 'y', 'rel']) $(id).addEventListener('change', apply);
  $('q').addEventListener('input', apply);
  const wanted = new URLSearchParams(location.hash.slice(1)).get('preset');
  if (wanted !== null && CONFIG.presets[Number(wanted)]) { $('preset').value = wanted;
    $('preset').dispatchEvent(new Event('change')); } else { apply(); }
})();
"""
