"""`chatvec demo`: the whole pipeline on the toy world, on one machine with no GPU and no network.

The toy world (demo/toyworld) has tiny Llamas trained in two synthetic languages that differ
only in script: a base, a chat model tuned on L1 instructions and a CP model continued on L2
text. The seed-0 world ships in demo/toyworld/checkpoints; the demo copies it under --out (or
trains one: --rebuild, --seed, --quick), writes a sweep file for it and runs it: CP + r x (chat -
base) for r in 0.5, 1.0, 1.25, with the vector added to every tensor ("all") and with the
embedding rows left out ("skip"), merged on Ray actors into a local folder store, then the CP
and chat baselines and every merge evaluated with the hf engine on the toy tasks posed in L2
(the CP model's language, where the chat vector has to transfer) and in L1 (the chat model's
own language, for reference), and a report. No judge: the task kind scores exact answers.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import click

from chatvec.core import layout

NOTE = (
    "The toy world: tiny Llamas (0.93M parameters) trained on two synthetic languages that differ "
    "only in script (L1 Latin, L2 Cyrillic). The chat model was tuned on L1 instructions only; the "
    "CP model never saw an instruction. The same 240 instructions are posed in L2 (the CP model's "
    "language: does the chat vector transfer?) and in L1 (the chat model's own language, for "
    "reference). One seed is one draw: demo/toyworld/README.md has three seeds, and what the world "
    "does not show."
)
QUICK_NOTE = "A --quick world (trained in seconds): its numbers mean little; the run shows the machinery."
RATIOS = (0.5, 1.0, 1.25)
EMBEDDINGS = ("all", "skip")
# the CP model's language (the chat model was never tuned in it), then the chat model's own
LANGUAGES = ("toy-l2", "toy-l1")
SWEEP_TEMPLATE = """\
# The demo's sweep (written by `chatvec demo`; rerun it with `chatvec sweep {sweep_path}`).
# The toy world: CP + r x (chat - base), the vector added to every tensor (all) or with the
# embedding and LM-head rows left as the CP model has them (skip), evaluated on instructions in
# L2 (the CP model's language) and L1 (the chat model's).
name: {name}
vectors:
  toy-chat: {{base: {world}/base, chat: {world}/chat}}
targets:                  # one CP model, judged in both languages (each merge is done once)
{targets}ratios: [{ratios}]
methods: [add]
embeddings: [{embeddings}]
baselines: {{cp: true, chat: true}}
engine: hf
device: cpu
root: {store}
shard_size: 1MB           # two shards per model, so the merge actors share the work
eval: {{batch_size: 64{limit}}}
"""


def shipped_world() -> Path:
    """The seed-0 world that ships with chatvec (regenerate: see demo/toyworld/README.md)."""
    import chatvec.demo.toyworld

    return Path(chatvec.demo.toyworld.__file__).resolve().parent / "checkpoints"


def _world_seed(path: Path) -> tuple[int, bool] | None:
    import json

    f = path / "world.json"
    if not f.is_file():
        return None
    info = json.loads(f.read_text(encoding="utf-8"))
    return int(info["seed"]), bool(info.get("quick"))


def relative_benchmarks(world: Path) -> Path:
    """Make ``world/benchmarks.yaml`` name its data files relative to itself (the build writes
    absolute paths), so a copied or shipped world works wherever it lies."""
    import json

    import yaml

    info = json.loads((world / "world.json").read_text(encoding="utf-8"))
    path = world / "benchmarks.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for spec in doc["benchmarks"]:
        spec["data"] = dict(info["benchmarks"][spec["name"]]["data"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def prepare_world(world: Path, *, seed: int = 0, quick: bool = False, rebuild: bool = False, echo=click.echo) -> Path:
    """A finished toy world at ``world``: kept if it is the one asked for, else copied from the
    shipped checkpoints (seed 0, full) or trained (a few minutes; seconds with ``quick``)."""
    from chatvec.core.errors import InputError

    have = _world_seed(world)
    if have is not None and not rebuild:
        if have != (seed, quick):
            raise InputError(
                f"{world} holds the toy world of seed {have[0]}{' (quick)' if have[1] else ''}, not seed "
                f"{seed}{' (quick)' if quick else ''}; pass --rebuild to replace it, or choose another --out"
            )
        echo(f"using the toy world in {world}")
        return world
    if world.exists():
        # ours: a finished world being rebuilt, or an unfinished one (no world.json)
        shutil.rmtree(world)
    shipped = shipped_world()
    if not rebuild and (seed, quick) == (0, False) and _world_seed(shipped) == (0, False):
        echo(f"using the shipped toy world (seed 0) from {shipped}")
        shutil.copytree(shipped, world)
        relative_benchmarks(world)
        return world
    from chatvec.demo.toyworld.build import WorldConfig, build_world

    config = WorldConfig.small(seed) if quick else WorldConfig.full(seed)
    echo(
        f"training the toy world (seed {seed}{', quick' if quick else ''}) into {world}"
        f"{'' if quick else ': a few minutes on one core'}"
    )
    build_world(str(world), config, progress=True)
    return world


def write_sweep_file(
    out: Path,
    *,
    world: Path | None = None,
    name: str = "demo",
    ratios=RATIOS,
    embeddings=EMBEDDINGS,
    languages=LANGUAGES,
    limit: int | None = None,
) -> Path:
    """``out/sweep.yaml`` for the world at ``world`` (default ``out/world``), storing under ``out/store``."""
    path = out / "sweep.yaml"
    w = (world or out / "world").as_posix()
    targets = "".join(
        f"  - {{language: {lang}, cp: {w}/cp, benchmarks: [{w}/benchmarks.yaml]}}\n" for lang in languages
    )
    text = SWEEP_TEMPLATE.format(
        name=name,
        world=w,
        store=(out / "store").as_posix(),
        targets=targets,
        ratios=", ".join(f"{r:g}" for r in ratios),
        embeddings=", ".join(embeddings),
        limit=f", limit: {limit}" if limit else "",
        sweep_path=path.as_posix(),
    )
    path.write_text(text, encoding="utf-8")
    return path


def key_table(root: str, run_id: str) -> str:
    """The run's headline metrics as a plain-text table (mean [95% interval])."""
    from chatvec.eval import history
    from chatvec.eval.report import ModelInfo, headline_table

    models = [ModelInfo.from_dict(m) for m in history.read_run_info(root, run_id).get("models", [])]
    heads, body = headline_table(history.load_summary(root, run_id), models)
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *body)]

    def line(row) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()

    lines = [line(heads), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(body):
        if i and row[0] != body[i - 1][0]:
            lines.append("")  # a blank line between targets
        lines.append(line(row))
    return "\n".join(lines)


def run_demo(
    out: Path,
    *,
    run_id: str | None = None,
    workers: int = 2,
    eval_workers: int = 2,
    config_path: str | None = None,
    seed: int = 0,
    quick: bool = False,
    rebuild: bool = False,
    limit: int | None = None,
    ratios=RATIOS,
    embeddings=EMBEDDINGS,
    echo=click.echo,
):
    """Prepare the world, write the sweep file and run it; returns (sweep path, SweepOutcome)."""
    from chatvec.core.config import load_config
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    out.mkdir(parents=True, exist_ok=True)
    prepare_world(out / "world", seed=seed, quick=quick, rebuild=rebuild, echo=echo)
    sweep_path = write_sweep_file(out, ratios=ratios, embeddings=embeddings, limit=limit)
    config = load_config(config_path)
    if config.ray.address == "local" and config.ray.num_cpus is None:
        # tiny models: more logical CPUs than cores lets merge and eval actors coexist on 2 cores
        config.ray.num_cpus = max(4, os.cpu_count() or 1)
    sweep = load_sweep(str(sweep_path))
    run_id = run_id or dt.datetime.now(dt.timezone.utc).strftime("demo-%Y%m%d-%H%M%S")
    notes = (NOTE, QUICK_NOTE) if quick else (NOTE,)
    outcome = run_sweep(
        sweep, run_id=run_id, config=config, merge_workers=workers, eval_workers=eval_workers, notes=notes, echo=echo
    )
    return sweep_path, outcome


@click.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the world's copy, the sweep file and the store (models/, results/, reports/).",
)
@click.option("--rebuild", is_flag=True, help="Train the toy world again instead of using the shipped one (minutes).")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="The world's seed; other than 0 trains a new world."
)
@click.option("--quick", is_flag=True, help="Train a small world in seconds instead (its numbers mean little).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many instructions (of 240).")
@click.option("--run-id", default=None, help="Name of the run (default: demo-<UTC time>).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Merge actors (0: no Ray).")
@click.option(
    "--eval-workers", type=click.IntRange(min=0), default=2, show_default=True, help="Eval actors (0: no Ray)."
)
@click.option("--config", "config_path", default=None, help="ray_config.yaml to use (default: ./ray_config.yaml).")
def demo(out, rebuild, seed, quick, limit, run_id, workers, eval_workers, config_path):
    """Merge and evaluate the toy world's chat vector at three ratios and two embedding policies."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray's workers inherit this: no per-model loading bars from every actor in the demo's output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    out_dir = Path(out).absolute()
    sweep_path, outcome = run_demo(
        out_dir,
        run_id=run_id,
        workers=workers,
        eval_workers=eval_workers,
        config_path=config_path,
        seed=seed,
        quick=quick,
        rebuild=rebuild,
        limit=limit,
    )
    click.echo("")
    click.echo("CP + r x (chat - base) on the toy tasks, by prompt language (mean [95% Wilson interval]):")
    click.echo(key_table(outcome.root, outcome.run_id))
    click.echo(
        "closed: the chat format (answer ends with the closing token); either_script: the right "
        "words in either script (skill); exact_match: the right answer in the prompt's script; "
        "in_language: answers in the prompt's script. emb all: the vector added to every tensor; "
        "emb skip: embedding and LM-head rows kept from CP."
    )
    click.echo("")
    click.echo(f"sweep file: {sweep_path}")
    click.echo(f"models:     {out_dir / 'store' / layout.MODELS}")
    click.echo(f"results:    {outcome.results_uri}")
    click.echo(f"report:     {outcome.report_uri}")
    click.echo(f"list runs:  chatvec results --root {out_dir / 'store'}")
    if outcome.failed_cells:
        click.echo(f"{len(outcome.failed_cells)} evaluation cell(s) failed:", err=True)
        for c in outcome.failed_cells:
            click.echo(f"  {c}", err=True)
    return outcome.exit_status
