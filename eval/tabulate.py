"""Plain-text tables of benchmarks and summaries, for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_value(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    digits = 3 if abs(value) < 100 else 1
    text = f"{value:.{digits}f}"
    if stderr is not None:
        text += f" ± {stderr:.{digits}f}"
    return text


def with_gated(rows: Sequence[dict]) -> list[tuple[dict, dict | None]]:
    """Summary rows paired with their gated row (``m`` with ``m@lang``, chatvec.eval.gating), in
    model, language, benchmark, metric order; a gated row whose ungated one is missing stands alone."""
    from chatvec.eval.gating import split_metric

    def key(r: dict, metric: str) -> tuple:
        return (r["model"], r["language"], r["benchmark"], metric)

    gated = {key(r, split_metric(r["metric"])[0]): r for r in rows if split_metric(r["metric"])[1]}
    plain = [r for r in rows if not split_metric(r["metric"])[1]]
    have = {key(r, r["metric"]) for r in plain}
    out = [(r, gated.get(key(r, r["metric"]))) for r in plain]
    out += [(r, None) for k, r in gated.items() if k not in have]
    return sorted(out, key=lambda p: key(p[0], p[0]["metric"]))


def _n(r: dict) -> str:
    return str(r["n"]) + (f" (+{r['n_unscored']} unscored)" if r["n_unscored"] else "")


def format_summary(summary: pa.Table) -> str:
    """One line per model x language x benchmark x metric: value ± stderr, n (and unscored); a
    gated benchmark's metrics show their in-language value beside it."""
    pairs = with_gated(summary.to_pylist())
    if not pairs:
        return "(no results)"
    gated = any(g is not None for _r, g in pairs)
    rows = []
    for r, g in pairs:
        line = [r["model"], r["language"], r["benchmark"], r["metric"], fmt_value(r["value"], r["stderr"]), _n(r)]
        if gated:
            line += [fmt_value(g["value"], g["stderr"]), _n(g)] if g is not None else ["", ""]
        rows.append(line)
    headers = ["model", "language", "benchmark", "metric", "value ± stderr", "n"]
    if gated:
        headers += ["in language only", "n"]
    return table(headers, rows)
