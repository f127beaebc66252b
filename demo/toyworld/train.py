"""Model shape and a small deterministic training loop (one torch thread, seeded data order)."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 4
    mlp: int = 384
    heads: int = 4
    seq_len: int = 64


@dataclass(frozen=True)
class Phase:
    """One training run: ``steps`` AdamW steps at peak ``lr`` (linear warm-up, cosine decay)."""

    name: str
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.01


def make_model(size: ModelSize, vocab_size: int, *, seed: int, pad_id: int, eos_id: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.mlp,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        do_sample=False,
        max_new_tokens=16,
    )
    return model


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """One thread and deterministic kernels: the same seed gives the same weights, bit for bit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _lr_at(phase: Phase, step: int) -> float:
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model, phase: Phase, next_batch: Callable[[random.Random, int], dict], rng: random.Random, *, progress: bool = True
) -> list[float]:
    """Train ``model`` in place for one phase; returns the loss of every step."""
    from tqdm import tqdm

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=phase.lr,
        betas=(0.9, 0.95),
    )
    losses: list[float] = []
    bar = tqdm(range(phase.steps), desc=f"train {phase.name}", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(phase, step)
        batch = next_batch(rng, phase.batch_size)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    log.info("%s: %d steps, final loss %.4f", phase.name, phase.steps, sum(losses[-10:]) / max(1, len(losses[-10:])))
    return losses


def round_to_bf16(model) -> None:
    """Round the weights through bf16, as they will be saved, so the next phase starts from the
    exact checkpoint a user downloads (chat - base is then exactly what the files hold)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
