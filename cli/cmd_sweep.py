"""`chatvec sweep`, `chatvec nightly` and `chatvec results`.

Exit statuses (sweep and nightly):
  0  everything ran; no regression
  2  a user error (bad sweep file, missing model, ...): nothing or only committed work was kept
  3  nightly only: at least one metric regressed against the previous run
  4  some evaluation cells failed; the other results and the report were written
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import click

from chatvec.core import layout

_WORKERS_HELP = "Merge actors and eval actors (0: everything in this process, no Ray). Default: ray_config.yaml."


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    text = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for r in text:
        out.append(
            "  ".join((v.rjust(w) if numeric[i] else v.ljust(w)) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
        )
    return "\n".join(out)


def _run_common(
    sweep_file: str,
    run_id: str,
    config_path: str | None,
    workers: int | None,
    merge_workers: int | None,
    eval_workers: int | None,
    root: str | None,
    nightly: bool,
    k: float | None,
    in_engine: bool = False,
) -> int:
    from chatvec.core.config import load_config
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    config = load_config(config_path)
    sweep = load_sweep(sweep_file)
    if root:
        sweep.root = root
    if in_engine:
        sweep.in_engine = True
    outcome = run_sweep(
        sweep,
        run_id=run_id,
        config=config,
        merge_workers=merge_workers if merge_workers is not None else workers,
        eval_workers=eval_workers if eval_workers is not None else workers,
        nightly=nightly,
        k=k,
        echo=click.echo,
    )
    click.echo("")
    if outcome.reused:
        click.echo(f"reused {len(outcome.reused)} merge(s) already in the store; merged {len(outcome.merged)}")
    click.echo(f"models:  {outcome.root.rstrip('/')}/{layout.MODELS}/")
    click.echo(f"results: {outcome.results_uri}")
    click.echo(f"report:  {outcome.report_uri}")
    if outcome.failed_cells:
        click.echo(f"{len(outcome.failed_cells)} evaluation cell(s) failed:", err=True)
        for c in outcome.failed_cells:
            click.echo(f"  {c}", err=True)
    if nightly:
        if outcome.previous_run is None:
            click.echo("no earlier run of this sweep: this run is the baseline for the next one")
        elif outcome.regressions:
            click.echo(f"{len(outcome.regressions)} regression(s) against run {outcome.previous_run}:", err=True)
            click.echo(_changes_table(outcome.regressions, outcome.previous_run, outcome.run_id), err=True)
        else:
            click.echo(f"no regression against run {outcome.previous_run}")
    return outcome.exit_status


def _changes_table(changes, a: str, b: str) -> str:
    rows = [
        [
            c.model,
            c.language,
            c.benchmark,
            c.metric,
            c.a,
            c.b,
            c.delta,
            c.threshold,
            "REGRESSION" if c.regression else "better" if c.improvement else "",
        ]
        for c in changes
    ]
    return _table(["model", "language", "benchmark", "metric", a, b, "change", "threshold", ""], rows)


_common = [
    click.argument("sweep_file", metavar="SWEEP.yaml"),
    click.option(
        "--config",
        "config_path",
        default=None,
        help="ray_config.yaml to use (default: ./ray_config.yaml or $CHATVEC_CONFIG).",
    ),
    click.option("--workers", type=click.IntRange(min=0), default=None, help=_WORKERS_HELP),
    click.option(
        "--merge-workers", type=click.IntRange(min=0), default=None, help="Merge actors only (overrides --workers)."
    ),
    click.option(
        "--eval-workers", type=click.IntRange(min=0), default=None, help="Eval actors only (overrides --workers)."
    ),
    click.option(
        "--root",
        default=None,
        help="Storage root (local path or s3://...); overrides the sweep file and ray_config.yaml.",
    ),
]


def _with_common(f):
    for deco in reversed(_common):
        f = deco(f)
    return f


@click.command()
@_with_common
@click.option(
    "--run-id",
    default=None,
    help="Name of this run (default: sweep-<UTC time>). Rerunning an id finishes what is missing.",
)
@click.option(
    "--in-engine",
    is_flag=True,
    help="Swap each merge point into an engine loaded from its CP model; no checkpoints written "
    "(as `in_engine: true` in the sweep file).",
)
def sweep(sweep_file, config_path, workers, merge_workers, eval_workers, root, run_id, in_engine):
    """Merge every vector x target x ratio x method of SWEEP.yaml, evaluate the merged models and
    the baselines on each target's benchmarks, and write results and a report."""
    run_id = run_id or dt.datetime.now(dt.timezone.utc).strftime("sweep-%Y%m%d-%H%M%S")
    return _run_common(
        sweep_file,
        run_id,
        config_path,
        workers,
        merge_workers,
        eval_workers,
        root,
        nightly=False,
        k=None,
        in_engine=in_engine,
    )


@click.command()
@_with_common
@click.option("--run-id", default=None, help="Name of this run (default: today's UTC date, e.g. 2024-06-01).")
@click.option(
    "--k",
    type=click.FloatRange(min=0),
    default=None,
    help="A drop larger than k x sqrt(se_prev^2 + se_now^2) is a regression (default: nightly.k of the sweep, 2).",
)
def nightly(sweep_file, config_path, workers, merge_workers, eval_workers, root, run_id, k):
    """Run SWEEP.yaml as tonight's run, compare it with the previous run and report.

    Rerunning the same night finishes only what is missing. Exits 3 when a metric regressed,
    4 when evaluation cells failed, 0 otherwise."""
    run_id = run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return _run_common(sweep_file, run_id, config_path, workers, merge_workers, eval_workers, root, nightly=True, k=k)


@click.command()
@click.argument("run", required=False)
@click.option("--root", default=None, help="Storage root (default: storage.root of ray_config.yaml).")
@click.option("--config", "config_path", default=None, help="ray_config.yaml to read the storage root from.")
@click.option("--compare", nargs=2, metavar="A B", default=None, help="Print what changed from run A to run B.")
@click.option(
    "--k",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="With --compare: a drop larger than k x the combined stderr is flagged.",
)
def results(run, root, config_path, compare, k):
    """List runs; with RUN print its summary; with --compare A B print the differences."""
    from chatvec.eval import history

    if root is None:
        from chatvec.core.config import load_config

        root = load_config(config_path).storage.root
    from chatvec.core.storage import Store

    store = Store(root)  # opened once, at the edge
    if compare:
        if run:
            raise click.UsageError("give either RUN or --compare A B, not both")
        a, b = compare
        changes = history.compare(history.load_summary(store, a), history.load_summary(store, b), k=k)
        from chatvec.eval.browser import load_samples
        from chatvec.eval.paired import pair_changes, paired_table_text

        # cells both runs scored on the same items are compared item by item
        check = pair_changes(
            changes, load_samples(history.run_uri(store, a)), load_samples(history.run_uri(store, b)), k=k
        )
        changes = check.changes
        both = [c for c in changes if c.status == "both"]
        click.echo(_changes_table(both, a, b))
        only = [c for c in changes if c.status != "both"]
        if only:
            click.echo("")
            click.echo(
                _table(
                    ["model", "language", "benchmark", "metric", "only in"],
                    [[c.model, c.language, c.benchmark, c.metric, a if c.status == "gone" else b] for c in only],
                )
            )
        click.echo("\n" + paired_table_text(check, a, b))
        regs = sum(c.regression for c in both)
        better = sum(c.improvement for c in both)
        click.echo(
            f"\n{len(both)} comparable rows: {regs} regression(s), {better} improvement(s) (paired interval where both "
            f"runs scored the same items, else beyond {k:g} x the combined stderr)"
        )
        return 0
    if run:
        from chatvec.eval.tabulate import with_gated

        pairs = with_gated(history.load_summary(store, run).to_pylist())
        cols = ["model", "language", "benchmark", "metric", "value", "stderr", "n"]
        gated = any(g is not None for _r, g in pairs)
        rows = []
        for r, g in pairs:
            line = [r.get(c) for c in cols]
            if gated:  # the in-language-only value beside the plain one (gate: in_language)
                line += [g.get(c) for c in ("value", "stderr", "n")] if g is not None else [None] * 3
            rows.append(line)
        click.echo(_table(cols + (["@lang value", "@lang stderr", "@lang n"] if gated else []), rows))
        info = history.read_run_info(store, run)
        if info.get("failed_cells"):
            click.echo(f"\n{len(info['failed_cells'])} failed cell(s): " + "; ".join(info["failed_cells"]))
        return 0
    runs = history.list_runs(store)
    if not runs:
        click.echo(f"no runs under {root}")
        return 0
    click.echo(
        _table(
            ["run", "sweep", "kind", "status", "started", "models", "rows", "failed"],
            [[r.run_id, r.sweep, r.kind, r.status, r.started_at, r.models, r.rows, len(r.failed_cells)] for r in runs],
        )
    )
    return 0
