"""The result tables, in one place and versioned.

Samples: one row per item per model per metric. A generated answer that is scored on several
metrics (a chat answer: ``judge_score`` and ``in_language``) appears once per metric, with the
same ``prompt`` and ``response``; a metric with no score yet (waiting for the judge, no judge
given, an unparseable judgment) has ``score`` null and says why in ``judge_status``. Summing or
averaging ``score`` by ``metric`` never mixes metrics.

Summary: one row per model x language x benchmark x metric: the mean of the non-null scores
(``value``), its standard error, ``n`` scored rows and ``n_unscored`` rows whose score is null.
``perplexity`` is the token-level perplexity of the whole cell, not a mean of item perplexities.

Bump SCHEMA_VERSION when a column changes meaning or is removed; adding a nullable column at
the end is compatible and needs no bump.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
VERSION_KEY = b"chatvec.schema_version"  # in every results file's Parquet metadata

# judge_status values
NOT_JUDGED = "not_needed"  # the metric does not use a judge
PENDING = "pending"  # waiting for the judge phase
NO_JUDGE = "no_judge"  # the run had no judge: not scored, never invented
JUDGED = "ok"
UNPARSEABLE = "unparseable"  # no rating found in the judge's text
OUT_OF_RANGE = "out_of_range"  # a rating outside the allowed scale
AMBIGUOUS = "ambiguous"  # several different ratings in one judgment
JUDGE_ERROR = "error"  # the judge engine failed on this row
# rows the judge phase (re)scores when a judge is given
NEEDS_JUDGE = (PENDING, NO_JUDGE, JUDGE_ERROR)

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("prompt", pa.string()),
        pa.field("response", pa.string()),
        pa.field("detected_language", pa.string()),
        pa.field("detected_script", pa.string()),
        pa.field("in_language", pa.bool_()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("judge_model", pa.string()),
        pa.field("judge_raw", pa.string()),
        pa.field("judge_status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        # kind-specific inputs and intermediate values, as JSON (the reference answer for the
        # judge, the options' log-likelihoods, ...)
        pa.field("details", pa.string()),
        pa.field("engine", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("stderr", pa.float64()),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("n_unscored", pa.int64(), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

# Fields a kind fills per row; the runner adds the run-level ones.
ROW_FIELDS = tuple(
    f.name
    for f in SAMPLES_SCHEMA
    if f.name not in ("run_id", "model", "language", "benchmark", "kind", "engine", "created_at")
)


def samples_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the schema's column names; missing ones null) as a samples table."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in SAMPLES_SCHEMA}
    return pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA)


def summary_table(rows: list[dict]) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in rows] for f in SUMMARY_SCHEMA}
    return pa.Table.from_pydict(columns, schema=SUMMARY_SCHEMA)
