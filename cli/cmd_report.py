"""`chatvec report`: the HTML report and answer browser of a finished run, sweep or plain eval."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run", required=False)
@click.option(
    "--root",
    default=None,
    metavar="URI",
    help="Store root that holds RUN under results/run=<RUN>/ (default: storage.root of ray_config.yaml).",
)
@click.option(
    "--out",
    "out_uri",
    default=None,
    metavar="URI",
    help="Instead of a store root: the --out folder of a `chatvec eval` run (RUN is then optional).",
)
@click.option(
    "--report-dir",
    default=None,
    metavar="URI",
    help="Where to write the report (default: <root>/reports/<RUN>/, or <out>/report/ with --out).",
)
@click.option("--config", "config_path", default=None, metavar="PATH", help="ray_config.yaml to read the root from.")
def report(run: str | None, root: str | None, out_uri: str | None, report_dir: str | None, config_path: str | None):
    """Write the HTML report, its plots and the answer browser of RUN, as a sweep writes them.

    RUN is a run id under the store root (see `chatvec results`); with --out, the run is the one
    a `chatvec eval --out URI` wrote there."""
    from chatvec.runs.run_report import find_eval_output, find_in_store, report_stored_run

    if root is not None and out_uri is not None:
        raise click.UsageError("give either --root (a store root) or --out (a `chatvec eval` output), not both")
    if out_uri is not None:
        stored = find_eval_output(out_uri, run)
    else:
        if run is None:
            raise click.UsageError(
                "give RUN, a run id under the store root (`chatvec results` lists them), "
                "or --out URI, the folder of a `chatvec eval` run"
            )
        if root is None:
            from chatvec.core.config import load_config

            root = load_config(config_path).storage.root
        stored = find_in_store(root, run)
    from chatvec.core.storage import Store
    from chatvec.eval.browser import FOLDER

    index = report_stored_run(stored, report_dir)
    folder = index.rsplit("/", 1)[0]
    click.echo(f"run {stored.run_id}: results in {stored.results_uri}")
    click.echo(f"report:  {index}")
    pages = [rel for rel in Store(folder).list(FOLDER) if rel.endswith(".html")]
    if pages:
        click.echo(f"answers: {len(pages)} page(s) in {folder}/{FOLDER}/")
    return 0
