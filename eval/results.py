"""Where a run's results live under its output URI, and how they are read back.

    <out>/run.json                                              the run's id (fixed on first use)
    <out>/samples/model=<m>/language=<l>/benchmark=<b>.parquet  one file per finished cell
    <out>/status/model=<m>/language=<l>/benchmark=<b>.json      per-cell state: done or failed
    <out>/summary.parquet                                       written at the end of every run

A cell's samples file is written whole (it appears only once complete) and rewritten whole when
the judge fills in its scores, so rows are never duplicated. A cell needs generating again only
when its samples file is missing; it needs judging while any of its rows waits for a judge.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from eval.schema import NEEDS_JUDGE, SAMPLES_SCHEMA, SCHEMA_VERSION, summary_table
from merge.errors import InputError
from merge.storage import Store

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.parquet"


@dataclass(frozen=True)
class Cell:
    """One (model, language, benchmark) unit of work and of output."""

    model: str
    language: str
    benchmark: str
    # the benchmark's spec travels with the cell so an actor needs nothing else to run it
    spec: object = field(default=None, compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.language}/{self.benchmark}"

    def _rel(self, top: str, ext: str) -> str:
        return f"{top}/model={self.model}/language={self.language}/benchmark={self.benchmark}.{ext}"

    @property
    def samples_rel(self) -> str:
        return self._rel("samples", "parquet")

    @property
    def status_rel(self) -> str:
        return self._rel("status", "json")


def now() -> datetime:
    return datetime.now(timezone.utc)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_table(store: Store, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


# -- the run's identity ---------------------------------------------------------------------------
def claim_run(store: Store, run_id: str | None) -> str:
    """The run id for this output: the one already recorded there, or ``run_id`` (or a new one)."""
    if store.is_file(RUN_FILE):
        recorded = json.loads(store.read_text(RUN_FILE))["run_id"]
        if run_id is not None and run_id != recorded:
            raise InputError(f"{store.describe()} holds run {recorded!r}; pass --run-id {recorded} to finish it "
                             f"or choose another --out for run {run_id!r}")
        return recorded
    run_id = run_id or now().strftime("%Y%m%dT%H%M%SZ")
    store.write_text(RUN_FILE, json.dumps({"run_id": run_id, "created_at": now().isoformat(),
                                           "schema_version": SCHEMA_VERSION}))
    return run_id


# -- cells ----------------------------------------------------------------------------------------
def write_samples(store: Store, cell: Cell, table: pa.Table) -> None:
    store.write_bytes(cell.samples_rel, table_bytes(table.cast(SAMPLES_SCHEMA)))


def read_samples(store: Store, cell: Cell) -> pa.Table | None:
    if not store.is_file(cell.samples_rel):
        return None
    return read_table(store, cell.samples_rel)


def has_samples(store: Store, cell: Cell) -> bool:
    return store.is_file(cell.samples_rel)


def needs_judge(table: pa.Table) -> bool:
    return any(s in NEEDS_JUDGE for s in table.column("judge_status").to_pylist())


def write_status(store: Store, cell: Cell, state: str, **info) -> dict:
    record = {"cell": cell.key, "model": cell.model, "language": cell.language, "benchmark": cell.benchmark,
              "state": state, "at": now().isoformat(), **info}
    store.write_text(cell.status_rel, json.dumps(record, ensure_ascii=False, indent=1))
    return record


# -- summary --------------------------------------------------------------------------------------
def summarize(out_uri: str, run_id: str | None = None) -> pa.Table:
    """One row per model x language x benchmark x metric over every samples file under ``out_uri``.

    ``value``/``stderr``/``n`` come from the kind's ``aggregate`` (a mean and its standard error
    for most metrics); ``n_unscored`` counts rows whose score is null (not judged, unreadable
    judgments, no detector for the language).
    """
    from eval.kinds import get_kind

    store = Store(out_uri)
    files = [f for f in store.list("samples") if f.endswith(".parquet")]
    groups: dict[tuple, list[dict]] = {}
    for rel in files:
        table = read_table(store, rel)
        for r in table.to_pylist():
            if run_id is not None and r["run_id"] != run_id:
                continue
            key = (r["run_id"], r["model"], r["language"], r["benchmark"], r["kind"], r["metric"])
            groups.setdefault(key, []).append(r)
    created = now()
    rows = []
    kinds: dict[str, object] = {}
    for key in sorted(groups):
        run, model, language, benchmark, kind_name, metric = key
        members = groups[key]
        if kind_name not in kinds:
            try:
                kinds[kind_name] = get_kind(kind_name)
            except InputError:
                from eval.kinds.base import Kind

                kinds[kind_name] = Kind()
        value, stderr, n = kinds[kind_name].aggregate(metric, members)
        rows.append(dict(run_id=run, model=model, language=language, benchmark=benchmark, kind=kind_name,
                         metric=metric, value=value, stderr=stderr, n=n,
                         n_unscored=sum(1 for r in members if r["score"] is None),
                         schema_version=SCHEMA_VERSION, created_at=created))
    return summary_table(rows)


def write_summary(out_uri: str, table: pa.Table) -> None:
    Store(out_uri).write_bytes(SUMMARY_FILE, table_bytes(table))


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)
