"""Running a planned sweep: merges (reused when committed), evaluation of every model and
baseline on its target's benchmarks, the nightly comparison with the previous run, the report.

Exit statuses of `chatvec sweep` and `chatvec nightly` are defined here; 2 is any user error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from cluster.sweep import Sweep, SweepPlan, plan_sweep
from merge.storage import join

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REGRESSION = 3  # nightly: a metric got worse than the previous run by more than its noise
EXIT_FAILED_CELLS = 4  # some evaluation cells failed; the others' results and the report exist


@dataclass
class SweepOutcome:
    run_id: str
    root: str
    results_uri: str
    report_uri: str
    merged: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed_cells: list[str] = field(default_factory=list)
    previous_run: Optional[str] = None
    changes: Optional[list] = None  # eval.history.Change, nightly only

    @property
    def regressions(self) -> list:
        return [c for c in self.changes or [] if c.regression]

    @property
    def exit_status(self) -> int:
        if self.regressions:
            return EXIT_REGRESSION
        if self.failed_cells:
            return EXIT_FAILED_CELLS
        return EXIT_OK


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _first(*values):
    return next(v for v in values if v is not None)


def _merge_all(plan: SweepPlan, *, workers: int, config, device: str, echo) -> list[str]:
    from merge.output import merge_local
    from merge.units import format_size

    done = []
    todo = [pm for pm in plan.merges if not pm.cached and not pm.same_as]
    for i, pm in enumerate(todo, 1):
        echo(f"merge {i}/{len(todo)}: {pm.name} -> {pm.out_uri}")
        if workers == 0:
            summary = merge_local(pm.plan, pm.out_uri, device=device, overwrite=False, progress=True)
        else:
            from cluster.merge_driver import run_distributed

            summary = run_distributed(pm.plan, pm.out_uri, workers=workers, config=config, device=device, overwrite=False)
        if summary.cached:  # committed by someone else since planning
            pm.cached = True
            echo(f"  reused: already committed at {pm.out_uri}")
            continue
        echo(f"  {format_size(summary.total_bytes)} in {summary.seconds:.1f} s on {summary.device}")
        done.append(pm.name)
    return done


def _summary_key(row: dict) -> tuple:
    return (row["model"], row["language"], row["benchmark"], row["metric"])


def _evaluate(plan: SweepPlan, sweep: Sweep, *, run_id: str, results_uri: str, workers: int, config, echo):
    """Every evaluation group through the eval driver; returns (summary table, failed cells)."""
    import pyarrow as pa

    from cluster.eval_driver import run_eval

    tables, failed = [], []
    engine = sweep.engine or config.eval.engine
    for i, group in enumerate(plan.groups, 1):
        echo(f"evaluate {i}/{len(plan.groups)}: {', '.join(group.models)} on {', '.join(group.languages)}: "
             f"{', '.join(group.benchmarks)}")
        outcome = run_eval(
            group.models, benchmarks=group.benchmarks, languages=group.languages, engine=engine, judge=sweep.judge,
            workers=workers, out_uri=results_uri, run_id=run_id, config=config, device=sweep.device,
            batch_size=sweep.eval.batch_size, max_new_tokens=sweep.eval.max_new_tokens, limit=sweep.eval.limit,
        )
        if outcome.summary is not None and outcome.summary.num_rows:
            tables.append(outcome.summary)
        failed += [f"{f.key}: {f.error}" if hasattr(f, "key") else str(f) for f in outcome.failed or []]
    if not tables:
        from eval.schema import SUMMARY_SCHEMA

        return SUMMARY_SCHEMA.empty_table(), failed
    # each group's summary may repeat cells another group also covers: keep one row per key
    rows: dict[tuple, dict] = {}
    for t in tables:
        for row in t.to_pylist():
            rows[_summary_key(row)] = row
    return pa.Table.from_pylist(list(rows.values()), schema=tables[0].schema), failed


def run_sweep(
    sweep: Sweep,
    *,
    run_id: str,
    config,
    merge_workers: Optional[int] = None,
    eval_workers: Optional[int] = None,
    nightly: bool = False,
    k: Optional[float] = None,
    notes: tuple[str, ...] = (),
    echo=print,
) -> SweepOutcome:
    """Plan, merge, evaluate, compare (nightly) and report. Rerunning with the same run id
    finishes only what is missing: committed merges and finished cells are kept."""
    from eval import history
    from eval.report import ModelInfo, write_report
    from merge.units import parse_size

    history.check_run_id(run_id)
    root = sweep.root or config.storage.root
    shard_size = parse_size(sweep.shard_size or config.merge.shard_size)
    mw = _first(merge_workers, sweep.workers.merge, config.merge.workers)
    ew = _first(eval_workers, sweep.workers.eval, config.eval.workers)
    k = _first(k, sweep.nightly.k)
    results_uri = history.run_uri(root, run_id)
    report_uri = join(root, "reports", run_id)

    plan = plan_sweep(sweep, root=root, shard_size=shard_size, progress=logger.info)
    reused = [pm.name for pm in plan.merges if pm.cached and not pm.same_as]
    echo(f"sweep {sweep.name}: {len(plan.merges)} merge(s), {len(plan.baselines)} baseline(s), "
         f"{len(plan.groups)} evaluation group(s); run {run_id} under {root}")
    for pm in plan.merges:
        if pm.same_as:
            echo(f"  {pm.name} is the same merge as {pm.same_as}: merged once")
        elif pm.cached:
            echo(f"  reusing {pm.name}: already committed at {pm.out_uri}")

    previous_info = history.read_run_info(root, run_id)
    info = {
        "run_id": run_id, "sweep": sweep.name, "kind": "nightly" if nightly else "sweep",
        "started_at": previous_info.get("started_at") or _now(), "status": "running",
        "root": root, "models": plan.models(), "sweep_config": sweep.model_dump(mode="json"),
    }
    history.write_run_info(root, run_id, info)
    try:
        merged = _merge_all(plan, workers=mw, config=config, device=sweep.device, echo=echo)
        summary, failed = _evaluate(plan, sweep, run_id=run_id, results_uri=results_uri, workers=ew, config=config, echo=echo)
    except BaseException as exc:
        info.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}")
        history.write_run_info(root, run_id, info)
        raise
    history.write_summary(root, run_id, summary)

    outcome = SweepOutcome(run_id=run_id, root=root, results_uri=results_uri, report_uri=join(report_uri, "index.html"),
                           merged=merged, reused=reused, failed_cells=failed)
    hist_table, hist_runs = None, []
    if nightly:
        outcome.previous_run = history.previous_run(root, run_id, sweep=sweep.name)
        if outcome.previous_run is not None:
            outcome.changes = history.compare(
                history.load_summary(root, outcome.previous_run), summary, k=k, min_delta=sweep.nightly.min_delta
            )
        else:
            outcome.changes = []
        # the trend: this sweep's runs up to this one (a rerun of an older night shows its own past)
        runs = [r for r in history.list_runs(root) if r.has_summary and r.sweep == sweep.name]
        hist_runs = [r.run_id for r in runs if (r.started_at or "", r.run_id) <= (info["started_at"], run_id)]
        hist_runs = hist_runs[-sweep.nightly.trend_runs:]
        hist_table = history.load_summaries(root, hist_runs)

    info.update(status="finished", finished_at=_now(), failed_cells=failed, merged=merged, reused=reused,
                previous_run=outcome.previous_run, regressions=len(outcome.regressions))
    outcome.report_uri = write_report(
        report_uri, run_id=run_id, summary=summary, models=[ModelInfo.from_dict(m) for m in plan.models()],
        title=sweep.name, history=hist_table, history_runs=hist_runs,
        changes=outcome.changes if nightly else None, previous_run=outcome.previous_run, k=k,
        failed_cells=failed, notes=notes, created_at=info["started_at"],
    )
    history.write_run_info(root, run_id, info)
    return outcome
