"""`chatvec extract` and `chatvec merge`. Heavy imports happen inside the commands: a
`--workers 0` merge never imports Ray, torch (on the CPU) or transformers."""

from __future__ import annotations

import click

from chatvec.merge.methods import METHOD_NAMES

_DEVICES = click.Choice(["cpu", "cuda", "auto"])


def _settings(config_path: str | None):
    from chatvec.core.config import load_config

    return load_config(config_path)


def _run(plan, out: str, *, workers: int | None, device: str | None, overwrite: bool, config_path: str | None):
    from chatvec.cluster.merge_driver import run_merge_job

    # read even when the flags give workers and device: merge.lock_ttl_s applies to both paths
    cfg = _settings(config_path)
    workers = cfg.merge.workers if workers is None else workers
    summary = run_merge_job(
        plan, out, workers=workers, device=device or cfg.merge.device, overwrite=overwrite, config=cfg
    )
    click.echo(summary.line())
    return 0


def _shard_size(text: str | None, config_path: str | None) -> int:
    from chatvec.core.units import parse_size

    return parse_size(text if text is not None else _settings(config_path).merge.shard_size)


def _ratio(text: str):
    from chatvec.core.errors import ConfigError
    from chatvec.merge.schedule import parse_ratio_text

    try:
        return parse_ratio_text(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _given(options: dict) -> str:
    """The command-line flags among ``options`` (name -> value) that were given, comma-separated."""
    return ", ".join(f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None)


_common = [
    click.option("--out", "out", required=True, help="Where to write: a folder or URI (s3://bucket/prefix, ...)."),
    click.option(
        "--shard-size", default=None, help="Largest output shard, e.g. 2GB, 200MB (default: ray_config.yaml, 2GB)."
    ),
    click.option(
        "--device",
        type=_DEVICES,
        default=None,
        help="Where the arithmetic runs (default: ray_config.yaml merge.device).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="0: merge in this process without Ray; N: N Ray merge actors (default: ray_config.yaml).",
    ),
    click.option("--overwrite", is_flag=True, help="Replace a model already committed at --out."),
    click.option(
        "--allow-pickle", is_flag=True, help="Allow .bin/.pt checkpoints (loaded with torch.load(weights_only=True))."
    ),
    click.option(
        "--config",
        "config_path",
        default=None,
        type=click.Path(dir_okay=False),
        help="ray_config.yaml to read defaults from (default: ./ray_config.yaml when it exists).",
    ),
]


def _with_common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.command()
@click.option("--base", required=True, help="The base (pre-trained) model: folder, URI or Hugging Face id.")
@click.option("--chat", required=True, help="The chat model fine-tuned from --base.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the vector; float32 keeps extract + merge equal to a direct merge.",
)
@click.option(
    "--embeddings",
    type=click.Choice(["overlap", "by-token"]),
    default=None,
    help="How rows pair when base and chat vocabularies differ (default: by-token).",
)
@_with_common
def extract(base, chat, dtype, embeddings, out, shard_size, device, workers, overwrite, allow_pickle, config_path):
    """Write the chat vector CHAT - BASE as a safetensors checkpoint."""
    from chatvec.merge.extract import build_extract_plan

    plan = build_extract_plan(
        base,
        chat,
        dtype=dtype,
        shard_size=_shard_size(shard_size, config_path),
        embeddings=embeddings,
        allow_pickle=allow_pickle,
    )
    return _run(plan, out, workers=workers, device=device, overwrite=overwrite, config_path=config_path)


@click.command()
@click.option("--recipe", "recipe_path", default=None, help="A recipe YAML (CP model and several vectors with ratios).")
@click.option(
    "--mergekit-config",
    "mergekit_path",
    default=None,
    help="A mergekit YAML (task_arithmetic, ties, dare_ties, dare_linear), merged with mergekit's formulas.",
)
@click.option("--cp", default=None, help="The continually pre-trained model to give chat skills to.")
@click.option("--base", default=None, help="Base model of the chat vector.")
@click.option("--chat", default=None, help="Chat model of the chat vector.")
@click.option("--vector", default=None, help="A vector written by `chatvec extract` (instead of --base/--chat).")
@click.option(
    "--ratio",
    default=None,
    help="Scale of the vector (default 1.0; the paper also uses 0.5), or a schedule in YAML flow text: "
    "'[0.2, 1.0, 0.4]' over the layers' depth, '{default: 1, self_attn: [0.5, 1, 0.5], lm_head: 0}' by module.",
)
@click.option(
    "--method", type=click.Choice(list(METHOD_NAMES)), default=None, help="How the vector is applied (default add)."
)
@click.option(
    "--density",
    type=click.FloatRange(min=0.0, max=1.0, min_open=True),
    default=None,
    help="ties: fraction of |tau| kept per tensor; dare, dare_ties: keep probability (default 1).",
)
@click.option("--seed", type=int, default=None, help="Seed of dare's random drop (default 0).")
@click.option(
    "--embeddings",
    type=click.Choice(["skip", "overlap", "by-token"]),
    default=None,
    help="Embedding/LM-head rows when vocabularies differ: skip, overlap or by-token.",
)
@click.option(
    "--chat-tokens-from-chat", is_flag=True, default=None, help="Copy rows of chat-only tokens from the chat model."
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Output dtype (default: the CP model's).",
)
@_with_common
def merge(
    recipe_path,
    mergekit_path,
    cp,
    base,
    chat,
    vector,
    ratio,
    method,
    density,
    seed,
    embeddings,
    chat_tokens_from_chat,
    dtype,
    out,
    shard_size,
    device,
    workers,
    overwrite,
    allow_pickle,
    config_path,
):
    """Merge CP + ratio * (CHAT - BASE) (or a saved vector, or a recipe) into a new checkpoint."""
    from chatvec.core.errors import ConfigError
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import load_recipe, recipe_from_options

    # the single-vector options, which a recipe or a mergekit config replaces
    single_vector = dict(
        cp=cp, base=base, chat=chat, vector=vector, ratio=ratio, method=method, density=density, seed=seed
    )
    if mergekit_path is not None:
        from chatvec.merge.mergekit_config import load_mergekit_config

        vector_options = dict(single_vector, embeddings=embeddings, chat_tokens_from_chat=chat_tokens_from_chat)
        clash = _given({"recipe": recipe_path, **vector_options})
        if clash:
            raise ConfigError(f"--mergekit-config names the models and parameters; drop {clash}")
        recipe = load_mergekit_config(mergekit_path)
        if dtype:
            recipe = recipe.model_copy(update={"dtype": dtype})
    elif recipe_path is not None:
        clash = _given(single_vector)
        if clash:
            raise ConfigError(f"--recipe names the models and ratios; drop {clash} or put them in the recipe")
        recipe = load_recipe(recipe_path)
        update = {
            k: v
            for k, v in (("embeddings", embeddings), ("dtype", dtype), ("chat_tokens_from_chat", chat_tokens_from_chat))
            if v
        }
        if update:
            recipe = recipe.model_copy(update=update)
    else:
        if cp is None:
            raise ConfigError("give --cp with --base and --chat (or --vector), or a --recipe")
        if vector is None and (base is None or chat is None):
            raise ConfigError("give both --base and --chat (the vector is chat - base), or --vector")
        recipe = recipe_from_options(
            cp=cp,
            base=base,
            chat=chat,
            vector=vector,
            ratio=1.0 if ratio is None else _ratio(ratio),
            method=method or "add",
            density=1.0 if density is None else density,
            seed=seed or 0,
            embeddings=embeddings,
            chat_tokens_from_chat=bool(chat_tokens_from_chat),
            dtype=dtype,
        )
    plan = build_plan(recipe, shard_size=_shard_size(shard_size, config_path), allow_pickle=allow_pickle)
    return _run(plan, out, workers=workers, device=device, overwrite=overwrite, config_path=config_path)
