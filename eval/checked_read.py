"""Results read back on a rerun, checked, so that a broken file is redone instead of being fatal.

A cell's samples file can be cut short (a node died mid-upload to a store without atomic
writes, a disk filled, someone copied half a folder), flipped by bad hardware, or left by a
version with other columns. Each of these is caught here: the Parquet footer and every page's
CRC (written by ``chatvec.eval.results.table_bytes``) are verified, the columns are compared with the
schema, and a cell's status file must parse and agree with its samples on the row count. A
broken cell's files are removed, with a warning that names the file, and the caller computes the
cell again.
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from chatvec.core.errors import InputError
from chatvec.core.storage import Store

logger = logging.getLogger(__name__)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _schema_problem(table: pa.Table, schema: pa.Schema) -> str | None:
    have = table.schema
    missing = [f.name for f in schema if f.name not in have.names]
    if missing:
        return f"columns {', '.join(missing)} are missing"
    wrong = [
        f"{f.name} is {have.field(f.name).type}, not {f.type}"
        for f in schema
        if not have.field(f.name).type.equals(f.type)
    ]
    return "; ".join(wrong) or None


def parquet_problem(store: Store, rel: str, schema: pa.Schema | None = None) -> tuple[pa.Table | None, str | None]:
    """``(table, None)`` for a whole, readable file with ``schema``'s columns; ``(None, why)`` else.

    A missing file is ``(None, None)``. Storage errors (the store itself failing) are raised:
    they say nothing about the file."""
    try:
        data = store.read_bytes(rel)
    except InputError:
        return None, None
    try:
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return None, f"unreadable ({_why(exc)})"
    if schema is not None:
        problem = _schema_problem(table, schema)
        if problem:
            return None, f"not in the results schema ({problem})"
    return table, None


def json_problem(store: Store, rel: str) -> tuple[dict | None, str | None]:
    try:
        text = store.read_text(rel)
    except InputError:
        return None, None
    except UnicodeDecodeError as exc:
        return None, f"unreadable ({_why(exc)})"
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"unreadable ({_why(exc)})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, None


def verify_cell(store: Store, cell) -> bool:
    """True when the cell has a whole samples file (and, when it has one, a status file that
    parses and agrees with it). A broken cell's files are removed, with a warning naming the
    broken file, and False is returned: the cell is computed again."""
    from chatvec.eval.schema import SAMPLES_SCHEMA

    if not store.is_file(cell.samples_rel):
        return False
    table, problem = parquet_problem(store, cell.samples_rel, SAMPLES_SCHEMA)
    broken = cell.samples_rel
    if problem is None and store.is_file(cell.status_rel):
        status, problem = json_problem(store, cell.status_rel)
        broken = cell.status_rel
        if problem is None and status is not None and status.get("state") == "done":
            rows = status.get("rows")
            if isinstance(rows, int) and table is not None and rows != table.num_rows:
                broken = cell.samples_rel
                problem = f"incomplete ({table.num_rows} rows; its status records {rows})"
    if problem is None:
        return True
    logger.warning("%s is %s: computing cell %s again", store.describe(broken), problem, cell.key)
    store.delete(cell.samples_rel)
    store.delete(cell.status_rel)
    return False
