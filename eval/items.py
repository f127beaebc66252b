"""Reading a benchmark's items for one language, checked against its kind's fields.

Every problem names the source, the line (JSONL) or row (Parquet, datasets; 1-based) and the
field, and all problems of a file are reported together (up to 20).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterator

from chatvec.core.errors import InputError
from chatvec.core.storage import Store, is_local, local_path
from chatvec.eval.benchmarks import BenchmarkSpec, source_path
from chatvec.eval.errors import BenchmarkDataError
from chatvec.eval.kinds import get_kind

logger = logging.getLogger(__name__)

MAX_PROBLEMS = 20


def _split(uri: str) -> tuple[Store, str]:
    if is_local(uri):
        import os

        path = os.path.abspath(local_path(uri))
        return Store(os.path.dirname(path)), os.path.basename(path)
    parent, name = posixpath.split(uri.rstrip("/"))
    return Store(parent), name


def _jsonl_records(text: str, source: str) -> Iterator[tuple[int, object]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkDataError(
                f"{source}, line {n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must hold one JSON object"
            ) from None


def _parquet_records(data: bytes) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    yield from enumerate(table.to_pylist(), start=1)


def _dataset_records(source: str) -> Iterator[tuple[int, object]]:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            f"{source}: reading Hugging Face datasets needs `pip install datasets` "
            "(or export the dataset to JSONL/Parquet)"
        ) from exc
    ref = source[len("dataset:") :]
    ref, _, split = ref.partition("@")
    name, _, config = ref.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as exc:
        raise InputError(
            f"cannot load dataset {name!r} (config {config or 'default'}, split {split or 'test'}): {exc}"
        ) from exc
    yield from enumerate(ds, start=1)


def raw_records(source: str) -> tuple[str, Iterator[tuple[int, object]], str]:
    """(description, records with their line/row numbers, "line" or "row")."""
    if source.startswith("dataset:"):
        return source, _dataset_records(source), "row"
    source = source_path(source)
    store, name = _split(source)
    if not store.is_file(name):
        raise InputError(f"benchmark data {source} does not exist")
    data = store.read_bytes(name)
    if name.endswith(".parquet"):
        return source, _parquet_records(data), "row"
    if name.endswith((".jsonl", ".json")):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BenchmarkDataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if name.endswith(".json") and text.lstrip().startswith("["):
            try:
                return source, iter(enumerate(json.loads(text), start=1)), "item"
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return source, _jsonl_records(text, source), "line"
    raise InputError(f"benchmark data {source}: use a .jsonl, .json or .parquet file, or dataset:ORG/NAME")


def load_items(spec: BenchmarkSpec, language: str) -> list[dict]:
    """The checked items of ``spec`` in ``language``; each has a string ``id``."""
    kind = get_kind(spec.kind)
    source = spec.data[language]
    if not kind.uses_items:
        return []
    where, records, unit = raw_records(source)
    rename = {theirs: ours for ours, theirs in spec.fields.items()}
    items, problems, seen = [], [], {}
    for n, rec in records:
        if not isinstance(rec, dict):
            problems.append(f"{where}, {unit} {n}: expected a JSON object, got {type(rec).__name__}")
            continue
        item = {rename.get(k, k): v for k, v in rec.items()}
        for problem in kind.check_item(item):
            problems.append(f"{where}, {unit} {n}: {problem}")
        item_id = str(item.get("id", n)) if item.get("id") is not None else str(n)
        if item_id in seen:
            problems.append(f"{where}, {unit} {n}: id {item_id!r} repeats the id of {unit} {seen[item_id]}")
        seen[item_id] = n
        item["id"] = item_id
        items.append(item)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        needed = ", ".join(f.name + ("" if f.required else "?") for f in kind.all_fields())
        raise BenchmarkDataError(
            f"benchmark {spec.name!r} ({spec.kind}, {language}) has bad data:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nA {spec.kind} item has the fields: {needed} ('?' = optional)."
            + (" Map differently named fields with `fields:` in a benchmark YAML." if not spec.fields else "")
        )
    if not items:
        raise BenchmarkDataError(f"{where}: no items; a {spec.kind} benchmark needs at least one")
    if spec.limit:
        items = items[: spec.limit]
    return items
