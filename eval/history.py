"""The runs dataset: every run's results under one root, compared run against run.

Layout under the storage root (one Parquet dataset, hive-partitioned by run)::

    results/run=<run_id>/summary.parquet          one row per model x language x benchmark x metric
    results/run=<run_id>/samples/model=.../...    one file per (model, language, benchmark) cell
    results/run=<run_id>/sweep.json               what the run was: sweep, models, status, times

A regression is a change in the bad direction larger than ``k * sqrt(se_a^2 + se_b^2)`` (and
larger than ``min_delta``): the two runs' means differ by more than their noise allows. Metrics
where lower is better (perplexity, unsafe rate, toxicity) are recognised by name.

No Ray here: this module reads files.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chatvec.core.errors import ChatvecError, InputError
from chatvec.core.layout import RESULTS, RUN_PREFIX, results_uri, run_results_uri
from chatvec.core.storage import Store
from chatvec.eval.results import RUN_FILE as EVAL_RUN_FILE
from chatvec.eval.results import SUMMARY_FILE, as_store, read_table, write_summary

logger = logging.getLogger(__name__)

RUN_FILE = "sweep.json"  # beside the eval run's own run.json
KEY = ("model", "language", "benchmark", "metric")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Substrings of metric names where a smaller value is the better one.
LOWER_IS_BETTER = ("perplexity", "ppl", "unsafe", "toxic", "loss", "nll", "bits_per", "error_rate")


class RunNotFoundError(ChatvecError):
    """The asked-for run has no results under the root."""


def lower_is_better(metric: str) -> bool:
    from chatvec.eval.gating import base_metric

    m = base_metric(metric).lower()  # a gated metric (exact_match@lang) runs the way its base does
    return any(s in m for s in LOWER_IS_BETTER)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id or ""):
        raise ChatvecError(
            f"run id {run_id!r} is not usable as a folder name: use letters, digits, '.', '_' and '-' "
            "(at most 128 characters, starting with a letter or digit), e.g. 2024-06-01 or ratio-study-1"
        )
    return run_id


def run_uri(root: Store | str, run_id: str) -> str:
    """Where a run's results live: ``<root>/results/run=<run_id>``."""
    return run_results_uri(as_store(root).uri, check_run_id(run_id))


def _run_rel(run_id: str, name: str = "") -> str:
    """A path under the root to a run's folder or one of its files."""
    rel = f"{RESULTS}/{RUN_PREFIX}{check_run_id(run_id)}"
    return f"{rel}/{name}" if name else rel


# -- sweep.json ----------------------------------------------------------------------------------
def write_run_info(root: Store | str, run_id: str, info: dict[str, Any]) -> None:
    as_store(root).write_text(_run_rel(run_id, RUN_FILE), json.dumps(info, indent=2, sort_keys=True, default=str))


def read_run_info(root: Store | str, run_id: str) -> dict[str, Any]:
    """What the sweep recorded about the run; for a run made by plain `chatvec eval`, what the
    eval run recorded (its start time)."""
    store = as_store(root)
    for name in (RUN_FILE, EVAL_RUN_FILE):
        rel = _run_rel(run_id, name)
        if not store.is_file(rel):
            continue
        try:
            info = json.loads(store.read_text(rel))
        except json.JSONDecodeError as exc:
            logger.warning("%s is not valid JSON (%s); ignoring it", store.describe(rel), exc)
            continue
        if name != RUN_FILE:
            info = {"started_at": info.get("created_at"), "kind": "eval"}
        return info
    return {}


# -- listing -------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run_id: str
    sweep: str | None = None
    kind: str | None = None  # "sweep" or "nightly"
    status: str | None = None  # "running", "finished", "failed"
    started_at: str | None = None
    finished_at: str | None = None
    models: int = 0
    rows: int = 0
    failed_cells: list[str] = field(default_factory=list)
    has_summary: bool = False


def _run_ids(store: Store) -> list[str]:
    """The runs under the root: every ``results/run=<id>/`` folder that holds a file."""
    ids = set()
    for rel in store.list(RESULTS):
        folder = rel.split("/")[1] if rel.count("/") >= 2 else ""
        if folder.startswith(RUN_PREFIX):
            ids.add(folder[len(RUN_PREFIX) :])
    return sorted(ids)


def list_runs(root: Store | str) -> list[RunInfo]:
    """Every run under ``root``, oldest first (by start time, then run id)."""
    store = as_store(root)
    runs = []
    for run_id in _run_ids(store):
        info = read_run_info(store, run_id)
        has_summary = store.is_file(_run_rel(run_id, SUMMARY_FILE))
        rows = 0
        if has_summary:
            try:
                rows = _read_parquet(store, _run_rel(run_id, SUMMARY_FILE)).num_rows
            except InputError as exc:
                logger.warning("%s", exc)
                has_summary = False
        runs.append(
            RunInfo(
                run_id=run_id,
                sweep=info.get("sweep"),
                kind=info.get("kind"),
                status=info.get("status"),
                started_at=info.get("started_at"),
                finished_at=info.get("finished_at"),
                models=len(info.get("models") or []),
                rows=rows,
                failed_cells=list(info.get("failed_cells") or []),
                has_summary=has_summary,
            )
        )
    runs.sort(key=lambda r: (r.started_at or "", r.run_id))
    return runs


def previous_run(root: Store | str, run_id: str, sweep: str | None = None) -> str | None:
    """The latest run with a summary that started before ``run_id`` (of the same sweep when given)."""
    runs = [r for r in list_runs(root) if r.has_summary]
    current = next((r for r in runs if r.run_id == run_id), None)
    before = []
    for r in runs:
        if r.run_id == run_id:
            continue
        if sweep is not None and r.sweep != sweep:
            continue
        if current is not None and current.started_at and r.started_at:
            if (r.started_at, r.run_id) >= (current.started_at, current.run_id):
                continue
        elif r.run_id >= run_id:
            continue
        before.append(r)
    return before[-1].run_id if before else None


# -- summaries -----------------------------------------------------------------------------------
def _read_parquet(store: Store, rel: str) -> pa.Table:
    try:
        return read_table(store, rel)
    except ChatvecError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"{store.describe(rel)} is not a readable Parquet file: {exc}") from exc


def load_summary(root: Store | str, run_id: str) -> pa.Table:
    store = as_store(root)
    rel = _run_rel(run_id, SUMMARY_FILE)
    if not store.is_file(rel):
        known = ", ".join(r.run_id for r in list_runs(store)) or "none"
        raise RunNotFoundError(
            f"no summary for run {run_id!r} under {results_uri(store.uri)} (runs there: {known}); "
            "list runs with `chatvec results --root URI`"
        )
    return _read_parquet(store, rel)


def load_results_summary(results: Store | str) -> pa.Table:
    """The summary in one run's results folder: ``<root>/results/run=<id>`` or a `chatvec eval --out`."""
    return _read_parquet(as_store(results), SUMMARY_FILE)


def write_run_summary(root: Store | str, run_id: str, table: pa.Table) -> str:
    """A run's summary into its folder under the root (chatvec.eval.results.write_summary does the writing)."""
    return write_summary(as_store(root), table, folder=_run_rel(run_id))


def load_summaries(root: Store | str, run_ids: Iterable[str] | None = None) -> pa.Table:
    """The summaries of several runs (all when ``run_ids`` is None) as one table, with ``run``:
    the runs dataset, read run folder by run folder (``results/run=<id>/summary.parquet``)."""
    store = as_store(root)
    wanted = set(run_ids) if run_ids is not None else None
    tables = []
    for rid in _run_ids(store):
        if wanted is not None and rid not in wanted:
            continue
        rel = _run_rel(rid, SUMMARY_FILE)
        if store.is_file(rel):
            table = _read_parquet(store, rel).replace_schema_metadata(None)
            tables.append(table.append_column("run", pa.array([rid] * table.num_rows, pa.string())))
    if not tables:
        from chatvec.eval.schema import SUMMARY_SCHEMA

        return SUMMARY_SCHEMA.empty_table().append_column("run", pa.array([], pa.string()))
    return pa.concat_tables(tables, promote_options="default")


# -- comparing -----------------------------------------------------------------------------------
@dataclass
class Change:
    model: str
    language: str
    benchmark: str
    metric: str
    a: float | None
    b: float | None
    se_a: float | None
    se_b: float | None
    n_a: int | None
    n_b: int | None
    delta: float | None  # b - a
    threshold: float | None  # how large a drop must be to count
    lower_is_better: bool
    regression: bool
    improvement: bool
    status: str  # "both", "new" (only in b), "gone" (only in a)


def _rows(table: pa.Table) -> dict[tuple, dict]:
    out = {}
    for row in table.select([c for c in (*KEY, "value", "stderr", "n") if c in table.column_names]).to_pylist():
        out[tuple(row[k] for k in KEY)] = row
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def compare(a: pa.Table, b: pa.Table, *, k: float = 2.0, min_delta: float = 0.0) -> list[Change]:
    """Per model x language x benchmark x metric: the change from run ``a`` to run ``b``.

    A regression is a move in the bad direction by more than ``max(k * sqrt(se_a^2 + se_b^2),
    min_delta)``; a missing stderr counts as 0 (a single item has no spread to excuse a drop).
    """
    if k < 0 or min_delta < 0:
        raise ChatvecError(f"regression threshold must be >= 0 (got k={k}, min_delta={min_delta})")
    rows_a, rows_b = _rows(a), _rows(b)
    changes = []
    for key in sorted(set(rows_a) | set(rows_b), key=lambda t: tuple(str(x) for x in t)):
        row_a, row_b = rows_a.get(key), rows_b.get(key)
        low = lower_is_better(key[3])
        value_a, value_b = _num(row_a and row_a["value"]), _num(row_b and row_b["value"])
        se_a, se_b = _num(row_a and row_a.get("stderr")), _num(row_b and row_b.get("stderr"))
        status = "both" if row_a and row_b else ("new" if row_b else "gone")
        delta = threshold = None
        regression = improvement = False
        if value_a is not None and value_b is not None:
            delta = value_b - value_a
            threshold = max(k * math.sqrt((se_a or 0.0) ** 2 + (se_b or 0.0) ** 2), min_delta)
            worse = delta if low else -delta
            regression = worse > threshold
            improvement = -worse > threshold
        changes.append(
            Change(
                model=key[0],
                language=key[1],
                benchmark=key[2],
                metric=key[3],
                a=value_a,
                b=value_b,
                se_a=se_a,
                se_b=se_b,
                n_a=row_a and row_a.get("n"),
                n_b=row_b and row_b.get("n"),
                delta=delta,
                threshold=threshold,
                lower_is_better=low,
                regression=regression,
                improvement=improvement,
                status=status,
            )
        )
    return changes
