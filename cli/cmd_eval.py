"""`chatvec benchmarks` and `chatvec eval`. Heavy imports happen inside the commands."""

from __future__ import annotations

import click

from chatvec.core.errors import InputError

EXIT_FAILED_CELLS = 1


def parse_models(values: tuple[str, ...]) -> dict[str, str]:
    models: dict[str, str] = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise InputError(f"--model {value!r}: write NAME=URI, e.g. --model cp=s3://bucket/models/cp")
        if name in models:
            raise InputError(f"--model {name} is given twice; every model needs its own name")
        models[name] = uri
    return models


@click.command("benchmarks")
@click.option("--fields", is_flag=True, help="Also list the item fields each benchmark kind needs.")
def benchmarks(fields: bool) -> None:
    """List the shipped sample benchmarks: names, kinds, languages and items."""
    from chatvec.eval.benchmarks import shipped_benchmarks
    from chatvec.eval.items import load_items
    from chatvec.eval.kinds import get_kind, kind_names
    from chatvec.eval.tabulate import table

    rows = []
    for spec in shipped_benchmarks():
        counts = {lang: len(load_items(spec, lang)) for lang in spec.languages}
        items = ", ".join(f"{lang}:{n}" for lang, n in counts.items())
        rows.append((spec.name, spec.kind, items, spec.description))
    click.echo(table(("benchmark", "kind", "languages:items", "description"), rows))
    click.echo(
        "\nYour own data: --benchmark NAME=FILE.jsonl:KIND:LANGUAGE (or .parquet, dataset:ORG/NAME, "
        "a YAML of benchmarks). Kinds: " + ", ".join(kind_names())
    )
    if fields:
        click.echo("")
        for name in kind_names():
            try:
                kind = get_kind(name)
            except Exception as exc:  # an optional kind whose dependency is missing
                click.echo(f"{name}: unavailable ({exc})")
                continue
            listed = ", ".join(f.name + ("" if f.required else "?") for f in kind.all_fields())
            if not kind.uses_items:
                listed = "(no items: the source names what to run)"
            metrics = ", ".join(kind.metrics) or "the tasks' own"
            click.echo(f"{name}: {listed}   metrics: {metrics}")


@click.command("eval")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="NAME=URI",
    help="A model to evaluate (local folder, s3://..., hf://org/name); repeat for more.",
)
@click.option(
    "--benchmark",
    "benchmark_args",
    multiple=True,
    metavar="NAME|NAME=SOURCE:KIND:LANG|FILE.yaml",
    help="Benchmarks to run (default: all shipped samples); repeat for more.",
)
@click.option(
    "--language",
    "languages",
    multiple=True,
    metavar="CODE",
    help="Only these languages (en, zh-Hant, zh-Hans, ko, ja, ...); repeat for more.",
)
@click.option(
    "--engine", type=click.Choice(["hf", "vllm"]), default=None, help="Default: eval.engine of the config (hf)."
)
@click.option(
    "--judge",
    default=None,
    metavar="URI|openai:MODEL",
    help="Judge for the judged metrics: a model's URI, or openai:MODEL for an OpenAI-compatible "
    "endpoint (OPENAI_BASE_URL, OPENAI_API_KEY). None: they stay unscored.",
)
@click.option(
    "--toxicity",
    default=None,
    metavar="perspective|hf:MODEL",
    help="Scorer for toxicity benchmarks: 'perspective' (Google's Perspective API, key in "
    "PERSPECTIVE_API_KEY) or hf:MODEL (a Hugging Face sequence-classification model). None: unscored.",
)
@click.option(
    "--judge-max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens the judge may write (default: eval.judge_max_new_tokens, 2048).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="0: in this process without Ray; N: N eval actors on Ray (default: eval.workers of the config).",
)
@click.option(
    "--replicas",
    default=None,
    metavar="N|auto",
    help="Engines per model (each an eval actor; a large cell's items are split among them); auto: "
    "the eval actors shared out over the models (default: eval.replicas, 1).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--batch-size", type=int, default=None, help="Requests per batch (default: eval.batch_size).")
@click.option("--max-new-tokens", type=int, default=None, help="Cap on every benchmark's answer length.")
@click.option("--limit", type=int, default=None, help="At most this many items per cell.")
@click.option("--run-id", default=None, help="Default: the run already in --out, or a new UTC timestamp.")
@click.option("--config", "config_path", default=None, metavar="PATH", help="ray_config.yaml to use.")
@click.option("--out", required=True, metavar="URI", help="Output location (local folder or s3://...).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    models,
    benchmark_args,
    languages,
    engine,
    judge,
    toxicity,
    judge_max_tokens,
    workers,
    replicas,
    device,
    batch_size,
    max_new_tokens,
    limit,
    run_id,
    config_path,
    out,
    quiet,
) -> int:
    """Evaluate models over languages and benchmarks; finished cells in --out are kept."""
    from chatvec.cluster.eval_driver import run_eval
    from chatvec.core.config import load_config
    from chatvec.eval.tabulate import format_summary

    outcome = run_eval(
        parse_models(models),
        benchmarks=list(benchmark_args) or None,
        languages=list(languages) or None,
        engine=engine,
        judge=judge,
        workers=workers,
        out_uri=out,
        run_id=run_id,
        config=load_config(config_path),
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        judge_max_new_tokens=judge_max_tokens,
        show_progress=not quiet,
        replicas=parse_replicas(replicas),
        toxicity=toxicity,
    )
    click.echo(format_summary(outcome.summary))
    if outcome.redone:
        click.echo(f"\ncomputed again because their inputs changed ({len(outcome.redone)} cell(s)):")
        for key, reasons in outcome.redone.items():
            click.echo(f"  {key}: {'; '.join(reasons)}")
    c = outcome.counts
    click.echo(
        f"\nrun {outcome.run_id}: {c['cells']} cells, {c['generated']} generated, {c['skipped']} already done, "
        f"{c['judged']} judged, {c['failed']} failed; results in {out}"
    )
    if outcome.loads:  # one long-lived engine per model: each model should be loaded once
        click.echo("engine loads: " + ", ".join(f"{uri} x{n}" for uri, n in sorted(outcome.loads.items())))
    if not judge and any(r["n_unscored"] for r in outcome.summary.to_pylist()):
        click.echo("judged metrics are unscored: pass --judge URI to score them (this run resumes where it stopped)")
    if outcome.failed:
        click.echo("\nfailed cells:", err=True)
        for r in outcome.failed:
            click.echo(f"  {r.key} ({r.stage}): {r.error}", err=True)
        click.echo("rerun the same command to retry them; finished cells are kept", err=True)
        return EXIT_FAILED_CELLS
    return 0


def parse_replicas(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(
            f"{value!r}: give a positive number of engines per model, or auto", param_hint="--replicas"
        )
    return n
