"""Dev and test: every (benchmark, language)'s items split once, by a seeded and recorded draw.

The search sees only the dev items; the finalists are compared on the test items, which no
choice was made on. The split is stratified by a category field where the items have one
(``category``, else ``task``; or the field the file names), so both halves hold every category in
about the same share. It is written into the run's folder before any model loads::

    <run>/tune/split.json                       seed, share, field, and every item id of both halves
    <run>/tune/split/<benchmark>/<language>.dev.jsonl   the items themselves (the data the cells read)
    <run>/tune/split/<benchmark>/<language>.test.jsonl

A rerun of the run reads the recorded split back; a split that no longer matches the data (or
the file's split settings) stops the run, so dev and test never mix across reruns.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chatvec.core.errors import ConfigError, InputError
from chatvec.core.storage import Store

SPLIT_FILE = "split.json"
PARTS = ("dev", "test")
AUTO_FIELDS = ("category", "task")


@dataclass
class Split:
    """One (benchmark, language)'s halves, as item ids in data order."""

    benchmark: str
    language: str
    field: str | None
    dev: list[str]
    test: list[str]


def stratum_field(items: Sequence[Mapping], stratify: str | None) -> str | None:
    """The field to stratify by: the one named, or with ``auto`` the first of AUTO_FIELDS the
    items all have; None: no stratification."""
    if stratify is None:
        return None
    if stratify != "auto":
        missing = sum(1 for it in items if it.get(stratify) is None)
        if missing:
            raise InputError(
                f"split.stratify names {stratify!r}, but {missing} of {len(items)} items have no such field; "
                "name a field every item has, or use auto"
            )
        return stratify
    return next((f for f in AUTO_FIELDS if all(it.get(f) is not None for it in items)), None)


def split_items(
    items: Sequence[Mapping], *, benchmark: str, language: str, test: float, seed: int, stratify: str | None
) -> Split:
    """Shuffle each stratum with a seed of its own and hold out ``round(n * test)`` of it."""
    field = stratum_field(items, stratify)
    strata: dict[str, list[str]] = {}
    for it in items:
        strata.setdefault(str(it.get(field)) if field else "", []).append(str(it["id"]))
    held: set[str] = set()
    for name, ids in sorted(strata.items()):
        # a string seed is hashed stably (unlike hash()), so the draw is the same in every process
        rng = random.Random(f"{seed}/{benchmark}/{language}/{name}")
        order = list(ids)
        rng.shuffle(order)
        held.update(order[: round(len(order) * test)])
    order = [str(it["id"]) for it in items]
    return Split(benchmark, language, field, [i for i in order if i not in held], [i for i in order if i in held])


def check_split(s: Split, test: float) -> None:
    for part in PARTS:
        if not getattr(s, part):
            n = len(s.dev) + len(s.test)
            raise ConfigError(
                f"the split leaves the {part} items of {s.benchmark} in {s.language} empty ({n} item(s), test share "
                f"{test:g}): use a benchmark with more items, a larger eval.limit, or another split.test"
            )


def data_rel(benchmark: str, language: str, part: str) -> str:
    return f"split/{benchmark}/{language}.{part}.jsonl"


def write_split(
    store: Store,
    splits: Sequence[Split],
    items: Mapping[tuple[str, str], list[dict]],
    *,
    settings: dict,
) -> None:
    """The split record and each half's items, under ``store`` (the run's tune folder)."""
    record = {
        "settings": settings,
        "cells": [
            {"benchmark": s.benchmark, "language": s.language, "field": s.field, "dev": s.dev, "test": s.test}
            for s in splits
        ],
    }
    for s in splits:
        by_id = {str(it["id"]): it for it in items[(s.benchmark, s.language)]}
        for part in PARTS:
            lines = [json.dumps(by_id[i], ensure_ascii=False) for i in getattr(s, part)]
            store.write_text(data_rel(s.benchmark, s.language, part), "\n".join(lines) + "\n")
    store.write_text(SPLIT_FILE, json.dumps(record, indent=1, ensure_ascii=False))  # last: the split is complete


def read_split(store: Store) -> tuple[dict, list[Split]] | None:
    if not store.is_file(SPLIT_FILE):
        return None
    record = json.loads(store.read_text(SPLIT_FILE))
    return record["settings"], [Split(**c) for c in record["cells"]]


def make_splits(
    store: Store,
    items: Mapping[tuple[str, str], list[dict]],
    *,
    test: float,
    seed: int,
    stratify: str | None,
    run_id: str,
) -> list[Split]:
    """The run's split: the recorded one when it matches these items and settings, else a new one
    (refused when the run already recorded another)."""
    settings = {"test": test, "seed": seed, "stratify": stratify}
    splits = [
        split_items(its, benchmark=b, language=lang, test=test, seed=seed, stratify=stratify)
        for (b, lang), its in items.items()
    ]
    for s in splits:
        check_split(s, test)
    recorded = read_split(store)
    if recorded is not None:
        old_settings, old = recorded
        same = old_settings == settings and {(s.benchmark, s.language): (s.dev, s.test) for s in old} == {
            (s.benchmark, s.language): (s.dev, s.test) for s in splits
        }
        if not same:
            raise ConfigError(
                f"run {run_id} recorded another dev/test split (its data, limit or split settings changed): "
                "start a new run with another --run-id"
            )
        return old
    write_split(store, splits, items, settings=settings)
    return splits


def part_specs(specs: Sequence, splits: Sequence[Split], store: Store, part: str) -> list:
    """The benchmarks of one half: each spec renamed ``<name>.<part>``, reading the split's items
    (already mapped to the kind's fields, so no field mapping and no limit again)."""
    from chatvec.eval.pipeline import absolute_uri

    out = []
    for spec in specs:
        data = {
            s.language: absolute_uri(store.describe(data_rel(s.benchmark, s.language, part)))
            for s in splits
            if s.benchmark == spec.name
        }
        if data:
            out.append(
                spec.model_copy(update={"name": f"{spec.name}.{part}", "data": data, "fields": {}, "limit": None})
            )
    return out
