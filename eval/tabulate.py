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


def format_summary(summary: pa.Table) -> str:
    """One line per model x language x benchmark x metric: value ± stderr, n (and unscored)."""
    rows = []
    for r in sorted(summary.to_pylist(), key=lambda r: (r["model"], r["language"], r["benchmark"], r["metric"])):
        n = str(r["n"]) + (f" (+{r['n_unscored']} unscored)" if r["n_unscored"] else "")
        rows.append((r["model"], r["language"], r["benchmark"], r["metric"], fmt_value(r["value"], r["stderr"]), n))
    if not rows:
        return "(no results)"
    return table(("model", "language", "benchmark", "metric", "value ± stderr", "n"), rows)
