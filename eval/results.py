"""Where a run's results live under its output URI, and how they are read back.

    <out>/run.json                                              the run's id (fixed on first use)
    <out>/samples/model=<m>/language=<l>/benchmark=<b>.parquet  one file per finished cell
    <out>/status/model=<m>/language=<l>/benchmark=<b>.json      per-cell state: done or failed
    <out>/summary.parquet                                       written at the end of every run

A cell's samples file is written whole (it appears only once complete) and rewritten whole when
the judge fills in its scores, so rows are never duplicated. The file's Parquet metadata holds
the schema version and the cell's identity (``chatvec.eval.identity``): what it was computed from. A
cell is generated again when its file is missing or its inputs changed; it is judged while any
of its rows waits for a judge, or when another judge judged it.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from chatvec.core.errors import InputError
from chatvec.core.storage import Store
from chatvec.eval.contracts import Cell
from chatvec.eval.errors import NewerSchemaError
from chatvec.eval.identity import METADATA_KEY, CellIdentity
from chatvec.eval.schema import SAMPLES_SCHEMA, SCHEMA_VERSION, VERSION_KEY, summary_table

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.parquet"


def now() -> datetime:
    return datetime.now(timezone.utc)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)  # checked on reruns (chatvec.eval.checked_read)
    return sink.getvalue().to_pybytes()


def as_store(where: Store | str) -> Store:
    """The edge where a URI becomes a Store; a Store passes through."""
    return where if isinstance(where, Store) else Store(where)


def check_schema_version(metadata: dict | None, where: str) -> None:
    """Refuse files written by a newer chatvec: their columns may mean something else."""
    raw = (metadata or {}).get(VERSION_KEY)
    if raw is None:
        return
    try:
        version = int(raw)
    except ValueError:
        raise InputError(f"{where}: unreadable schema version {raw!r}") from None
    if version > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{where} was written by a newer chatvec (results schema {version}; this one reads "
            f"up to {SCHEMA_VERSION}): upgrade chatvec to read it, or write to another --out"
        )


def read_table(store: Store, rel: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
    check_schema_version(table.schema.metadata, store.describe(rel))
    return table


# -- the run's identity ---------------------------------------------------------------------------
def claim_run(store: Store, run_id: str | None) -> str:
    """The run id for this output: the one already recorded there, or ``run_id`` (or a new one)."""
    if store.is_file(RUN_FILE):
        info = json.loads(store.read_text(RUN_FILE))
        check_schema_version(
            {VERSION_KEY: str(info["schema_version"]).encode()} if "schema_version" in info else None,
            store.describe(RUN_FILE),
        )
        recorded = info["run_id"]
        if run_id is not None and run_id != recorded:
            raise InputError(
                f"{store.describe()} holds run {recorded!r}; pass --run-id {recorded} to finish it "
                f"or choose another --out for run {run_id!r}"
            )
        return recorded
    run_id = run_id or now().strftime("%Y%m%dT%H%M%SZ")
    store.write_text(
        RUN_FILE, json.dumps({"run_id": run_id, "created_at": now().isoformat(), "schema_version": SCHEMA_VERSION})
    )
    return run_id


# -- cells ----------------------------------------------------------------------------------------
def write_samples(store: Store, cell: Cell, table: pa.Table, identity: CellIdentity | None = None) -> None:
    table = table.cast(SAMPLES_SCHEMA)
    if identity is not None:
        table = table.replace_schema_metadata({**SAMPLES_SCHEMA.metadata, METADATA_KEY: identity.to_json().encode()})
    store.write_bytes(cell.samples_rel, table_bytes(table))


def read_samples(store: Store, cell: Cell) -> pa.Table | None:
    if not store.is_file(cell.samples_rel):
        return None
    return read_table(store, cell.samples_rel)


def identity_of(table: pa.Table) -> CellIdentity | None:
    """The identity recorded in a samples table's metadata (None: none recorded)."""
    return _identity_from(table.schema.metadata)


def _identity_from(metadata: dict | None) -> CellIdentity | None:
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        return CellIdentity.from_json(raw)
    except (ValueError, TypeError):
        return None


def footer_metadata(store: Store, rel: str) -> dict | None:
    """A Parquet file's key-value metadata, read from its footer only (two ranged reads on an
    object store, not the whole file)."""
    if store.local:
        return pq.read_schema(store.path(rel)).metadata
    with store.open_reader(rel) as reader:
        end = reader.read_at(reader.size - 8, 8) if reader.size >= 12 else b""
        if end[4:] != b"PAR1":
            raise InputError(f"{store.describe(rel)} is not a Parquet file (no footer)")
        length = int.from_bytes(end[:4], "little")
        tail = reader.read_at(reader.size - 8 - length, length + 8)
    # the schema lives in the footer; a leading magic is all the reader needs besides it
    return pq.read_schema(io.BytesIO(b"PAR1" + tail)).metadata


def read_cell_identity(store: Store, cell: Cell) -> CellIdentity | None | bool:
    """The identity recorded in a cell's samples file: False when there is no file, None when the
    file records none (written by an older chatvec)."""
    from chatvec.eval.checked_read import verify_cell

    if not verify_cell(store, cell):  # missing, or broken and removed with a warning: computed again
        return False
    meta = footer_metadata(store, cell.samples_rel)
    check_schema_version(meta, store.describe(cell.samples_rel))
    return _identity_from(meta)


def write_status(store: Store, cell: Cell, state: str, **info) -> dict:
    record = {
        "cell": cell.key,
        "model": cell.model,
        "language": cell.language,
        "benchmark": cell.benchmark,
        "state": state,
        "at": now().isoformat(),
        **info,
    }
    store.write_text(cell.status_rel, json.dumps(record, ensure_ascii=False, indent=1))
    return record


# -- summary --------------------------------------------------------------------------------------
def summarize(out: Store | str, run_id: str | None = None, gates: Mapping[str, str] | None = None) -> pa.Table:
    """One row per model x language x benchmark x metric over every samples file under ``out``.

    ``value``/``stderr``/``n`` come from the kind's ``aggregate`` (a mean and its standard error
    for most metrics); ``n_unscored`` counts rows whose score is null (not judged, unreadable
    judgments, no detector for the language). ``gates`` (benchmark -> gate) adds the gated
    metrics of those benchmarks (``exact_match@lang``, ``chatvec.eval.gating``), computed here
    from the rows' stored ``in_language``.
    """
    from chatvec.eval.gating import gated_name, gated_rows
    from chatvec.eval.kinds import get_kind

    store = as_store(out)
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
                from chatvec.eval.kinds.base import Kind

                kinds[kind_name] = Kind()
        variants = [(metric, members)]
        if (gates or {}).get(benchmark):
            gated = gated_rows(kinds[kind_name], metric, members)
            if gated is not None:
                variants.append((gated_name(metric, gates[benchmark]), gated))
        for name, subset in variants:
            value, stderr, n = kinds[kind_name].aggregate(metric, subset)
            rows.append(
                dict(
                    run_id=run,
                    model=model,
                    language=language,
                    benchmark=benchmark,
                    kind=kind_name,
                    metric=name,
                    value=value,
                    stderr=stderr,
                    n=n,
                    n_unscored=sum(1 for r in subset if r["score"] is None),
                    schema_version=SCHEMA_VERSION,
                    created_at=created,
                )
            )
    return summary_table(rows)


def write_summary(out: Store | str, table: pa.Table, folder: str = "") -> str:
    """Write a run's summary table (the one place summaries are written) into ``folder`` of
    ``out`` (the run's own output, or a run's folder under a store root); returns where."""
    store = as_store(out)
    rel = f"{folder.rstrip('/')}/{SUMMARY_FILE}" if folder else SUMMARY_FILE
    store.write_bytes(rel, table_bytes(table))
    return store.describe(rel)


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)
