"""A run's report: the HTML page, its PNGs and the answer browser, from what the run stored.

`chatvec sweep` and `chatvec nightly` call ``write_run_report`` at the end of a run; `chatvec
report` calls it again later for any run with a summary, a plain `chatvec eval` run included, so
both write the same report from the same code. What a report needs:

  - the summary (``summary.parquet``) and the samples (``samples/...``) of the run's results
    folder, ``<root>/results/run=<id>/`` or the ``--out`` of `chatvec eval`;
  - for a sweep or nightly run, ``sweep.json`` beside them: the models' roles (CP, chat, merged
    with their ratios), the sweep's name, its failed cells and notes; a plain eval run has none,
    so its models are shown as they are named and its failed cells come from the status files;
  - for a nightly run, the comparison with the previous run of the same sweep and the trend
    over the last runs (``nightly_check``), which needs the store root.

No Ray here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chatvec.core import layout
from chatvec.core.errors import ChatvecError
from chatvec.core.storage import Store, join

logger = logging.getLogger(__name__)


class NoReportableRunError(ChatvecError):
    """The asked-for run is unknown or has no summary to report."""


@dataclass
class NightlyCheck:
    """A nightly run against the previous run of its sweep, and the runs its trend plots show."""

    previous_run: str | None = None
    changes: list = field(default_factory=list)  # chatvec.eval.history.Change
    paired: dict = field(default_factory=dict)  # chatvec.eval.paired.pair_changes(...).paired
    history: pa.Table | None = None
    history_runs: list[str] = field(default_factory=list)


def nightly_check(
    store: Store,
    run_id: str,
    summary: pa.Table,
    *,
    sweep_name: str | None,
    started_at: str | None,
    k: float,
    min_delta: float,
    trend_runs: int,
) -> NightlyCheck:
    """Compare run ``run_id`` (its ``summary``) with the previous run of the same sweep under
    the store root ``store``; cells both runs scored on the same items are compared item by item."""
    from chatvec.eval import history
    from chatvec.eval.browser import load_samples
    from chatvec.eval.paired import pair_changes

    check = NightlyCheck(previous_run=history.previous_run(store, run_id, sweep=sweep_name))
    if check.previous_run is not None:
        changes = history.compare(history.load_summary(store, check.previous_run), summary, k=k, min_delta=min_delta)
        paired = pair_changes(
            changes,
            load_samples(history.run_uri(store, check.previous_run)),
            load_samples(history.run_uri(store, run_id)),
            k=k,
            min_delta=min_delta,
        )
        check.changes, check.paired = paired.changes, paired.paired
    # the trend: this sweep's runs up to this one (a rerun of an older night shows its own past)
    runs = [r for r in history.list_runs(store) if r.has_summary and r.sweep == sweep_name]
    mine = (started_at or "", run_id)
    check.history_runs = [r.run_id for r in runs if (r.started_at or "", r.run_id) <= mine][-trend_runs:]
    check.history = history.load_summaries(store, check.history_runs)
    return check


def write_run_report(
    report_uri: str,
    *,
    run_id: str,
    summary: pa.Table,
    results_uri: str,
    info: dict[str, Any],
    failed_cells: Sequence[str] = (),
    nightly: NightlyCheck | None = None,
    k: float = 2.0,
) -> str:
    """Write the report of one run under ``report_uri``; return the URI of its ``index.html``.

    ``info``: what ``sweep.json`` records (``models``, ``sweep``, ``started_at``, ``notes``); an
    empty dict for a plain eval run."""
    from chatvec.eval.report import ModelInfo, write_report

    return write_report(
        report_uri,
        run_id=run_id,
        summary=summary,
        models=[ModelInfo.from_dict(m) for m in info.get("models") or []],
        title=info.get("sweep"),
        history=nightly.history if nightly else None,
        history_runs=nightly.history_runs if nightly else (),
        changes=nightly.changes if nightly else None,
        previous_run=nightly.previous_run if nightly else None,
        k=k,
        failed_cells=failed_cells,
        notes=info.get("notes") or (),
        created_at=info.get("started_at"),
        results_uri=results_uri,
        paired_changes=nightly.paired if nightly else None,
    )


# -- a run already in storage ----------------------------------------------------------------------
@dataclass
class StoredRun:
    """Where a finished run's results are, and what it recorded about itself."""

    run_id: str
    results_uri: str
    info: dict[str, Any]  # sweep.json; {} for a plain eval run
    root: str | None = None  # the store root, when the run lives under one


def find_in_store(root: str, run_id: str) -> StoredRun:
    """Run ``run_id`` under the store root ``root`` (``<root>/results/run=<id>/``)."""
    from chatvec.eval import history
    from chatvec.eval.results import SUMMARY_FILE

    store = Store(root)
    history.check_run_id(run_id)
    results_uri = history.run_uri(store, run_id)
    if not Store(results_uri).is_file(SUMMARY_FILE):
        runs = history.list_runs(store)
        if any(r.run_id == run_id for r in runs):
            raise NoReportableRunError(
                f"run {run_id!r} under {layout.results_uri(store.uri)} has no summary yet: it is still running "
                "or stopped before its end; rerun the command that started it to finish it, then report it"
            )
        reportable = ", ".join(r.run_id for r in runs if r.has_summary) or "none"
        raise NoReportableRunError(
            f"no run {run_id!r} under {layout.results_uri(store.uri)} (runs with a summary there: {reportable}); "
            "list runs with `chatvec results --root URI`, or give the folder of a `chatvec eval --out` run "
            "with `chatvec report --out URI`"
        )
    info = history.read_run_info(store, run_id)
    # a plain eval run's run.json says only when it started; sweep.json has the rest
    if info.get("kind") == "eval":
        info = {"started_at": info.get("started_at")}
    return StoredRun(run_id=run_id, results_uri=results_uri, info=info, root=store.uri)


def find_eval_output(out_uri: str, run_id: str | None = None) -> StoredRun:
    """The run in the output folder of `chatvec eval --out OUT` (``run.json`` names it)."""
    from chatvec.eval.results import RUN_FILE, SUMMARY_FILE

    store = Store(out_uri)
    if not store.is_file(RUN_FILE):
        raise NoReportableRunError(
            f"{store.describe()} holds no chatvec eval run (no {RUN_FILE}): give the --out of a `chatvec eval` "
            "run, or a run id under a store root with `chatvec report RUN --root URI`"
        )
    try:
        recorded = json.loads(store.read_text(RUN_FILE))["run_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NoReportableRunError(f"{store.describe(RUN_FILE)} is not a chatvec run record ({exc})") from exc
    if run_id is not None and run_id != recorded:
        raise NoReportableRunError(
            f"{store.describe()} holds run {recorded!r}, not {run_id!r}: leave RUN out or give {recorded}"
        )
    if not store.is_file(SUMMARY_FILE):
        raise NoReportableRunError(
            f"run {recorded!r} in {store.describe()} has no summary yet: it is still running or stopped before "
            "its end; rerun the same `chatvec eval` command to finish it, then report it"
        )
    return StoredRun(run_id=recorded, results_uri=store.uri, info={"started_at": _created_at(store, RUN_FILE)})


def _created_at(store: Store, rel: str) -> str | None:
    try:
        return json.loads(store.read_text(rel)).get("created_at")
    except (json.JSONDecodeError, AttributeError):
        return None


def failed_cells_of(run: StoredRun) -> list[str]:
    """The cells that failed, as the run recorded them: sweep.json's list, else the status files
    (a plain eval run), in the sweep's "model/language/benchmark: error" form."""
    if "failed_cells" in run.info:
        return list(run.info.get("failed_cells") or [])
    store = Store(run.results_uri)
    failed = []
    for rel in sorted(store.list("status")):
        if not rel.endswith(".json"):
            continue
        try:
            record = json.loads(store.read_text(rel))
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; its cell is left out of the failed cells", store.describe(rel))
            continue
        if record.get("state") == "failed":
            failed.append(f"{record.get('cell')}: {record.get('error')}")
    return failed


def report_stored_run(run: StoredRun, report_uri: str | None = None) -> str:
    """Write the report of a run already in storage (by default to ``<root>/reports/<id>/``, or
    ``report/`` inside a plain eval output); return the URI of its ``index.html``."""
    from chatvec.eval.history import load_results_summary

    summary = load_results_summary(run.results_uri)
    if report_uri is None:
        report_uri = layout.report_uri(run.root, run.run_id) if run.root else join(run.results_uri, "report")
    nightly, k = None, 2.0
    if run.info.get("kind") == "nightly" and run.root:
        settings = (run.info.get("sweep_config") or {}).get("nightly") or {}
        k = float(next((v for v in (run.info.get("k"), settings.get("k")) if v is not None), 2.0))
        nightly = nightly_check(
            Store(run.root),
            run.run_id,
            summary,
            sweep_name=run.info.get("sweep"),
            started_at=run.info.get("started_at"),
            k=k,
            min_delta=float(settings.get("min_delta") or 0.0),
            trend_runs=int(settings.get("trend_runs") or 10),
        )
    return write_run_report(
        report_uri,
        run_id=run.run_id,
        summary=summary,
        results_uri=run.results_uri,
        info=run.info,
        failed_cells=failed_cells_of(run),
        nightly=nightly,
        k=k,
    )
