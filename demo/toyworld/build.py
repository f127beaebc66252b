"""Build the toy world: languages, tokenizer, base/chat/cp checkpoints and toy benchmarks.

Layout under the output URI (``world.json`` is written last: a world without it is unfinished):

    base/ chat/ cp/            Hugging Face checkpoints (bf16 safetensors, config, tokenizer,
                               chat template, generation config)
    benchmarks/toy-task/toy-l1.jsonl, benchmarks/toy-task/toy-l2.jsonl
                               the `task` benchmark: the same instructions in L1 and in L2
    benchmarks.yaml            that benchmark for `chatvec eval --benchmark` (absolute URIs)
    world.json                 seed, sizes, training losses, embedding alignment diagnostics
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field

from chatvec.core.errors import InputError, OutputExistsError
from chatvec.core.storage import Store
from chatvec.demo.toyworld.corpora import BASE_MIXTURE, CP_MIXTURE, Corpora, Mixture
from chatvec.demo.toyworld.diagnostics import twin_alignment
from chatvec.demo.toyworld.language import LANGUAGES, SCRIPTS, ToyLanguage
from chatvec.demo.toyworld.tasks import BENCHMARK, LANGUAGE_ORDER, benchmark_items
from chatvec.demo.toyworld.tokenizer import END, PAD, build_tokenizer
from chatvec.demo.toyworld.train import ModelSize, Phase, deterministic, make_model, round_to_bf16, train

log = logging.getLogger(__name__)

WORLD_FILE = "world.json"
BENCHMARKS_FILE = "benchmarks.yaml"
# the longest answer is 6 words and the closing token: room for it and for a few wrong words
MAX_NEW_TOKENS = 16
MODELS = ("base", "chat", "cp")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    quick: bool = False
    n_words: int = 150
    size: ModelSize = field(default_factory=ModelSize)
    base: Phase = Phase("base", steps=800, lr=3e-3, warmup=50)
    chat: Phase = Phase("chat", steps=600, lr=1e-3, warmup=30)
    cp: Phase = Phase("cp", steps=400, lr=1e-3, warmup=20)
    per_task: int = 60  # benchmark items per task and language (4 tasks)
    base_mixture: Mixture = BASE_MIXTURE  # the base's raw-text chunk mix (ablations change it)
    max_shard_size: str | None = "1MB"

    @classmethod
    def full(cls, seed: int = 0) -> WorldConfig:
        return cls(seed=seed)

    @classmethod
    def small(cls, seed: int = 0) -> WorldConfig:
        """The ``--quick`` world: a few seconds of training; for tests, not for conclusions."""
        return cls(
            seed=seed,
            quick=True,
            n_words=30,
            size=ModelSize(hidden=32, layers=2, mlp=96, heads=2, seq_len=32),
            base=Phase("base", steps=60, lr=5e-3, batch_size=16, warmup=5),
            chat=Phase("chat", steps=40, lr=3e-3, batch_size=16, warmup=5),
            cp=Phase("cp", steps=30, lr=3e-3, batch_size=16, warmup=5),
            per_task=4,
            max_shard_size=None,
        )


def _save_checkpoint(model, tokenizer, store: Store, rel: str, max_shard_size: str | None) -> list[str]:
    import torch

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.config.dtype = "bfloat16"
    with tempfile.TemporaryDirectory(prefix="toyworld-") as tmp:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {"max_shard_size": "1GB"}
        bf16.save_pretrained(tmp, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(tmp)
        _portable(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            with open(os.path.join(tmp, name), "rb") as fh:
                store.write_bytes(f"{rel}/{name}", fh.read())
    return names


def _portable(folder: str) -> None:
    """Spell the saved config the way transformers 4.x reads it too (vLLM installs often pin 4.x):
    a tokenizer class both know, the chat tokens as ``additional_special_tokens``, ``torch_dtype``."""
    tok_path = os.path.join(folder, "tokenizer_config.json")
    with open(tok_path, encoding="utf-8") as fh:
        tok = json.load(fh)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tok.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        tok["additional_special_tokens"] = extra
    with open(tok_path, "w", encoding="utf-8") as fh:
        json.dump(tok, fh, indent=2, sort_keys=True)
        fh.write("\n")
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["torch_dtype"] = cfg.get("dtype", "bfloat16")
    with open(cfg_path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _write_jsonl(store: Store, rel: str, rows: list[dict]) -> None:
    store.write_text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _absolute(store: Store, rel: str) -> str:
    return os.path.join(store.root, rel) if store.local else store.describe(rel)


def _benchmarks_yaml(store: Store, benchmarks: dict) -> str:
    import yaml

    specs = [
        {
            "name": name,
            "kind": b["kind"],
            "description": "toy instructions (reverse, repeat, first, last); answers in the prompt's script",
            "data": {lang: _absolute(store, rel) for lang, rel in b["data"].items()},
            "max_new_tokens": b["max_new_tokens"],
            # no language detector knows the toy languages: the script of an answer's letters tells them apart
            "scripts": {lang: SCRIPTS[lang] for lang in b["data"]},
        }
        for name, b in benchmarks.items()
    ]
    return yaml.safe_dump({"benchmarks": specs}, sort_keys=False, allow_unicode=True)


def benchmark_specs(uri: str) -> list:
    """The world's benchmarks as ``chatvec.eval.benchmarks.BenchmarkSpec`` objects (data at ``uri``)."""
    from chatvec.eval.benchmarks import BenchmarkSpec

    info = load_world(uri)
    store = Store(uri)
    return [
        BenchmarkSpec(
            name=name,
            kind=b["kind"],
            data={lang: _absolute(store, rel) for lang, rel in b["data"].items()},
            max_new_tokens=b["max_new_tokens"],
            scripts={lang: SCRIPTS[lang] for lang in b["data"]},
        )
        for name, b in info["benchmarks"].items()
    ]


def build_world(out: str, config: WorldConfig | None = None, *, progress: bool = True) -> dict:
    """Train base, chat and cp for ``config`` and write them with the benchmarks under ``out``.

    Returns the content of ``world.json``. Same config, same bytes: every weight file is identical
    between two builds with the same seed on the same torch version.
    """
    config = config or WorldConfig.full()
    store = Store(out)
    if store.exists(WORLD_FILE):
        raise OutputExistsError(
            f"{store.describe(WORLD_FILE)} exists: a world is already built there; "
            "choose another --out or delete it first"
        )
    for rel in MODELS:
        if store.list(rel):
            raise OutputExistsError(
                f"{store.describe(rel)} is not empty (an unfinished build?); delete it or choose another --out"
            )
    t0 = time.perf_counter()
    language = ToyLanguage.generate(config.seed, config.n_words)
    tokenizer = build_tokenizer(language)
    corpora = Corpora(language)
    vocab = corpora.ids
    size = config.size
    summary: dict = {"models": {}}

    def raw(mix):
        return lambda rng, bs: corpora.raw_batch(rng, mix, bs, size.seq_len)

    def data_rng(phase: Phase) -> random.Random:
        return random.Random(f"toyworld-data-{phase.name}-{config.seed}")

    with deterministic(threads=1):
        base = make_model(size, len(vocab), seed=config.seed, pad_id=vocab[PAD], eos_id=vocab[END])
        losses = {"base": train(base, config.base, raw(config.base_mixture), data_rng(config.base), progress=progress)}
        round_to_bf16(base)
        chat = copy.deepcopy(base)
        losses["chat"] = train(chat, config.chat, corpora.sft_batch, data_rng(config.chat), progress=progress)
        cp = copy.deepcopy(base)
        losses["cp"] = train(cp, config.cp, raw(CP_MIXTURE), data_rng(config.cp), progress=progress)
    train_s = time.perf_counter() - t0

    for name, model in (("base", base), ("chat", chat), ("cp", cp)):
        files = _save_checkpoint(model, tokenizer, store, name, config.max_shard_size)
        tail = losses[name][-20:]
        summary["models"][name] = {
            "files": files,
            "final_loss": round(sum(tail) / len(tail), 4),
            "twin_alignment": round(twin_alignment(model, language, vocab), 4),
        }

    items = benchmark_items(language, config.seed, config.per_task)
    data = {}
    for lang in LANGUAGE_ORDER:
        rel = f"benchmarks/{BENCHMARK}/{lang}.jsonl"
        _write_jsonl(store, rel, items[lang])
        data[lang] = rel
    benchmarks = {
        BENCHMARK: {
            "kind": "task",
            "data": data,
            "items": len(items[LANGUAGE_ORDER[0]]),
            "max_new_tokens": MAX_NEW_TOKENS,
        }
    }
    store.write_text(BENCHMARKS_FILE, _benchmarks_yaml(store, benchmarks))

    summary.update(
        {
            "format": "chatvec-toyworld/1",
            "seed": config.seed,
            "quick": config.quick,
            "config": asdict(config),
            "languages": {lang: {"script": SCRIPTS[lang]} for lang in LANGUAGES},
            "vocab_size": len(vocab),
            "words_per_language": len(language.words),
            "parameters": sum(p.numel() for p in base.parameters()),
            "benchmarks": benchmarks,
            "train_seconds": round(train_s, 1),
        }
    )
    store.write_text(WORLD_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("toy world (seed %d) written to %s in %.0f s", config.seed, store.describe(), time.perf_counter() - t0)
    return summary


def load_world(uri: str) -> dict:
    """Read a built world's ``world.json``; an unfinished or missing world is an error."""
    store = Store(uri)
    if not store.exists(WORLD_FILE):
        raise InputError(
            f"{store.describe()} holds no finished toy world ({WORLD_FILE} is missing); "
            "build one with `chatvec toyworld build --out URI`"
        )
    return json.loads(store.read_text(WORLD_FILE))


__all__ = ["WorldConfig", "benchmark_specs", "build_world", "load_world", "MODELS", "WORLD_FILE"]
