"""`chatvec tune`: search for a recipe on dev items and confirm it on held-out test items.

Exit statuses: 0 the search ran (whatever the test said); 2 a user error (bad tune file, a split
that leaves dev or test empty, ...), found before any model loads.
"""

from __future__ import annotations

import datetime as dt

import click


@click.command()
@click.argument("tune_file", metavar="TUNE.yaml")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Eval actors (0: in this process, no Ray). Default: ray_config.yaml.",
)
@click.option(
    "--run-id", default=None, help="Name of the run (default: tune-<UTC time>). Rerunning an id resumes the search."
)
@click.option(
    "--root", default=None, help="Storage root (local path or s3://...); overrides the file and ray_config.yaml."
)
@click.option("--merge-best", is_flag=True, help="Commit the winning recipe to models/ (the normal merge path).")
@click.option("--config", "config_path", default=None, help="ray_config.yaml to use (default: ./ray_config.yaml).")
def tune(tune_file, workers, run_id, root, merge_best, config_path):
    """Search TUNE.yaml's space (a sweep file with a `search:` section) with optuna on the dev items,
    then compare the best recipes, the grid's best point, CP and chat on the held-out test items."""
    from chatvec.core.config import load_config
    from chatvec.runs.tune_config import load_tune
    from chatvec.runs.tune_run import run_tune

    config = load_config(config_path)
    spec = load_tune(tune_file)
    if root:
        spec.root = root
    run_id = run_id or dt.datetime.now(dt.timezone.utc).strftime("tune-%Y%m%d-%H%M%S")
    outcome = run_tune(
        spec, source=tune_file, run_id=run_id, config=config, workers=workers, merge_best=merge_best, echo=click.echo
    )
    click.echo("")
    for f in outcome.finalists:
        if f.recipe_uri:
            click.echo(f"recipe ({f.role}): {f.recipe_uri}")
    if outcome.merged_uri:
        click.echo(f"merged:  {outcome.merged_uri}")
    click.echo(f"results: {outcome.results_uri}")
    click.echo(f"report:  {outcome.report_uri}")
    return 0
