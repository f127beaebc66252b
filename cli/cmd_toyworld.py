"""`chatvec toyworld build`: the seeded toy world whose models the demo merges and evaluates."""

from __future__ import annotations

import json

import click


@click.group("toyworld")
def toyworld() -> None:
    """A seeded toy world (two scripts, tiny Llamas) where the chat vector effect is real."""


@toyworld.command("build")
@click.option("--out", "out", required=True, help="Where to write the world: a local folder or a URI (s3://...).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the languages, data and weights.")
@click.option("--quick", is_flag=True, help="A small world trained in seconds (for tests; its numbers mean little).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show training progress bars.")
def build(out: str, seed: int, quick: bool, progress: bool) -> None:
    """Train base, chat and CP models and write them with the toy benchmarks under --out.

    Deterministic: one torch thread and seeded data, so the same seed gives the same weights.
    The full world takes a few minutes on one CPU core.
    """
    from chatvec.demo.toyworld.build import WorldConfig, build_world

    config = WorldConfig.small(seed) if quick else WorldConfig.full(seed)
    summary = build_world(out, config, progress=progress)
    models = {name: {k: v for k, v in info.items() if k != "files"} for name, info in summary["models"].items()}
    click.echo(
        f"toy world (seed {seed}{', quick' if quick else ''}) written to {out} "
        f"in {summary['train_seconds']:.0f} s of training"
    )
    click.echo(json.dumps(models, indent=2))
    for name in ("base", "chat", "cp"):
        click.echo(f"  {name:5s} {out.rstrip('/')}/{name}")
    for name, info in summary["benchmarks"].items():
        click.echo(
            f"  benchmark {name} (kind {info['kind']}, {info['items']} items per language, "
            f"languages {', '.join(info['data'])})"
        )
    click.echo(
        f"evaluate with: chatvec eval --model chat={out.rstrip('/')}/chat "
        f"--benchmark {out.rstrip('/')}/benchmarks.yaml --out RESULTS_URI"
    )
