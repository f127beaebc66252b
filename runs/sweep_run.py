"""Running a planned sweep: merges (reused when committed), evaluation of every model and
baseline on its target's benchmarks, the nightly comparison with the previous run, the report.

Exit statuses of `chatvec sweep` and `chatvec nightly` are defined here; 2 is any user error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chatvec.core.storage import Store, join
from chatvec.runs.run_lock import locked_run
from chatvec.runs.sweep import Sweep, SweepPlan, plan_sweep

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
    previous_run: str | None = None
    changes: list | None = None  # chatvec.eval.history.Change, nightly only

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


def first_given(*values):
    """The first value that is not None: a command-line option, then the sweep file, then the config."""
    return next(v for v in values if v is not None)


def _merge_all(plan: SweepPlan, *, workers: int, config, device: str, echo, skip=frozenset()) -> list[str]:
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core.units import format_size

    done = []
    # `skip`: points evaluated in-engine (cluster/in_engine.py), which need no checkpoint
    todo = [point for point in plan.merges if not point.cached and not point.same_as and point.name not in skip]
    for i, point in enumerate(todo, 1):
        echo(f"merge {i}/{len(todo)}: {point.name} -> {point.out_uri}")
        summary = run_merge_job(
            point.plan, point.out_uri, workers=workers, device=device, overwrite=False, config=config
        )
        if summary.cached:  # committed by someone else since planning
            point.cached = True
            echo(f"  reused: already committed at {point.out_uri}")
            continue
        echo(f"  {format_size(summary.total_bytes)} in {summary.seconds:.1f} s on {summary.device}")
        done.append(point.name)
    return done


def _summary_key(row: dict) -> tuple:
    return (row["model"], row["language"], row["benchmark"], row["metric"])


def _evaluate(
    plan: SweepPlan, sweep: Sweep, *, run_id: str, results_uri: str, workers: int, config, echo, in_engine=None
):
    """Every evaluation group through the eval driver (its in-engine points through ``in_engine``);
    returns (summary table, failed cells)."""
    import pyarrow as pa

    from chatvec.cluster.eval_driver import run_eval

    tables, failed = [], []
    engine = sweep.engine or config.eval.engine
    for i, group in enumerate(plan.groups, 1):
        echo(
            f"evaluate {i}/{len(plan.groups)}: {', '.join(group.models)} on {', '.join(group.languages)}: "
            f"{', '.join(group.benchmarks)}"
        )
        args = dict(
            benchmarks=group.benchmarks,
            languages=group.languages,
            engine=engine,
            judge=sweep.judge,
            judge_max_new_tokens=sweep.judge_max_tokens,
            workers=workers,
            out_uri=results_uri,
            run_id=run_id,
            config=config,
            device=sweep.device,
            batch_size=sweep.eval.batch_size,
            max_new_tokens=sweep.eval.max_new_tokens,
            limit=sweep.eval.limit,
        )
        models, outcomes = dict(group.models), []
        if in_engine is not None:
            inside = {n: u for n, u in models.items() if n in in_engine.points}
            models = {n: u for n, u in models.items() if n not in inside}
            if inside:
                outcomes.append(in_engine.evaluate(inside, **args))
        if models:
            outcomes.append(run_eval(models, **args))
        for outcome in outcomes:
            for key, reasons in outcome.redone.items():
                echo(f"  computed again, its inputs changed: {key}: {'; '.join(reasons)}")
            if outcome.summary is not None and outcome.summary.num_rows:
                tables.append(outcome.summary)
            failed += [f"{f.key}: {f.error}" if hasattr(f, "key") else str(f) for f in outcome.failed or []]
    if not tables:
        from chatvec.eval.schema import SUMMARY_SCHEMA

        return SUMMARY_SCHEMA.empty_table(), failed
    # each group's summary may repeat cells another group also covers: keep one row per key
    rows: dict[tuple, dict] = {}
    for t in tables:
        for row in t.to_pylist():
            rows[_summary_key(row)] = row
    return pa.Table.from_pylist(list(rows.values()), schema=tables[0].schema), failed


@locked_run  # one run per run id at a time
def run_sweep(
    sweep: Sweep,
    *,
    run_id: str,
    config,
    merge_workers: int | None = None,
    eval_workers: int | None = None,
    nightly: bool = False,
    k: float | None = None,
    notes: tuple[str, ...] = (),
    echo=print,
) -> SweepOutcome:
    """Plan, merge, evaluate, compare (nightly) and report. Rerunning with the same run id
    finishes only what is missing: committed merges and finished cells are kept."""
    from chatvec.core import layout
    from chatvec.core.units import parse_size
    from chatvec.eval import history
    from chatvec.eval.report import ModelInfo, write_report

    history.check_run_id(run_id)
    root = sweep.root or config.storage.root
    store = Store(root)  # the store root, opened once for the run's records
    shard_size = parse_size(sweep.shard_size or config.merge.shard_size)
    merge_workers = first_given(merge_workers, sweep.workers.merge, config.merge.workers)
    eval_workers = first_given(eval_workers, sweep.workers.eval, config.eval.workers)
    k = first_given(k, sweep.nightly.k)
    results_uri = history.run_uri(root, run_id)
    report_uri = layout.report_uri(root, run_id)

    plan = plan_sweep(sweep, root=root, shard_size=shard_size, progress=logger.info)
    reused = [point.name for point in plan.merges if point.cached and not point.same_as]
    echo(
        f"sweep {sweep.name}: {len(plan.merges)} merge(s), {len(plan.baselines)} baseline(s), "
        f"{len(plan.groups)} evaluation group(s); run {run_id} under {root}"
    )
    for point in plan.merges:
        if point.same_as:
            echo(f"  {point.name} is the same merge as {point.same_as}: merged once")
        elif point.cached:
            echo(f"  reusing {point.name}: already committed at {point.out_uri}")
    in_engine = None
    if sweep.in_engine:  # checked here, before anything is written or loaded
        from chatvec.cluster.in_engine import InEngineRun

        in_engine, _checkpointed = InEngineRun.plan(plan, sweep, engine=sweep.engine or config.eval.engine, echo=echo)

    previous_info = history.read_run_info(store, run_id)
    info = {
        "run_id": run_id,
        "sweep": sweep.name,
        "kind": "nightly" if nightly else "sweep",
        "started_at": previous_info.get("started_at") or _now(),
        "status": "running",
        "root": root,
        "models": plan.models(),
        "sweep_config": sweep.model_dump(mode="json"),
    }
    history.write_run_info(store, run_id, info)
    try:
        merged = _merge_all(
            plan,
            workers=merge_workers,
            config=config,
            device=sweep.device,
            echo=echo,
            skip=set(in_engine.points) if in_engine else frozenset(),
        )
        summary, failed = _evaluate(
            plan,
            sweep,
            run_id=run_id,
            results_uri=results_uri,
            workers=eval_workers,
            config=config,
            echo=echo,
            in_engine=in_engine,
        )
    except BaseException as exc:
        info.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}")
        history.write_run_info(store, run_id, info)
        raise
    history.write_summary(store, run_id, summary)

    outcome = SweepOutcome(
        run_id=run_id,
        root=root,
        results_uri=results_uri,
        report_uri=join(report_uri, "index.html"),
        merged=merged,
        reused=reused,
        failed_cells=failed,
    )
    hist_table, hist_runs, paired = None, [], {}
    if nightly:
        outcome.previous_run = history.previous_run(store, run_id, sweep=sweep.name)
        if outcome.previous_run is not None:
            outcome.changes = history.compare(
                history.load_summary(store, outcome.previous_run), summary, k=k, min_delta=sweep.nightly.min_delta
            )
            # cells both nights scored on the same items are judged item by item (eval/paired.py)
            from chatvec.eval.browser import load_samples
            from chatvec.eval.paired import pair_changes

            check = pair_changes(
                outcome.changes,
                load_samples(history.run_uri(store, outcome.previous_run)),
                load_samples(results_uri),
                k=k,
                min_delta=sweep.nightly.min_delta,
            )
            outcome.changes, paired = check.changes, check.paired
        else:
            outcome.changes = []
        # the trend: this sweep's runs up to this one (a rerun of an older night shows its own past)
        runs = [r for r in history.list_runs(store) if r.has_summary and r.sweep == sweep.name]
        hist_runs = [r.run_id for r in runs if (r.started_at or "", r.run_id) <= (info["started_at"], run_id)]
        hist_runs = hist_runs[-sweep.nightly.trend_runs :]
        hist_table = history.load_summaries(store, hist_runs)

    info.update(
        status="finished",
        finished_at=_now(),
        failed_cells=failed,
        merged=merged,
        reused=reused,
        previous_run=outcome.previous_run,
        regressions=len(outcome.regressions),
    )
    outcome.report_uri = write_report(
        report_uri,
        run_id=run_id,
        summary=summary,
        models=[ModelInfo.from_dict(m) for m in plan.models()],
        title=sweep.name,
        history=hist_table,
        history_runs=hist_runs,
        changes=outcome.changes if nightly else None,
        previous_run=outcome.previous_run,
        k=k,
        failed_cells=failed,
        notes=notes,
        created_at=info["started_at"],
        results_uri=results_uri,
        paired_changes=paired,
    )
    history.write_run_info(store, run_id, info)
    return outcome
