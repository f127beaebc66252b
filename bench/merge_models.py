"""Llama-shaped bf16 triples (base, chat, CP) for bench/merge.py, written with safetensors' own
layout (random bits, no model code), so building one needs nothing but numpy."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# name -> (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {
    "300M": (1024, 2816, 18, 16, 8, 32000),
    "1.2B": (2048, 5632, 22, 32, 4, 32000),
    # two 131072 x 1024 matrices per model (about 0.55 GB): where TIES' whole-tensor work shows
    "wide": (1024, 2816, 2, 16, 8, 131072),
}


def llama_tensors(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def write_model(folder: Path, size: str, seed: int, shard_bytes: int) -> int:
    """A sharded bf16 checkpoint of random small-magnitude values; returns the parameter count."""
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = llama_tensors(hidden, inter, layers, heads, kv, vocab)
    groups, cur, cur_bytes = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {}
        for name, shape in group:
            # bf16 bit patterns of +-[2^-8, 2^-6): magnitudes like trained weights, no NaN/inf
            bits = rng.integers(0x3B80, 0x3C80, size=shape, dtype=np.uint16)
            bits |= rng.integers(0, 2, size=shape, dtype=np.uint16) << 15
            arrays[name] = bits
            total += bits.size
            weight_map[name] = fname
        _save_bf16(folder / fname, arrays)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total


def _save_bf16(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A safetensors file of bf16 tensors given as uint16 bit patterns (the format is that simple)."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for a in arrays.values():
            fh.write(memoryview(np.ascontiguousarray(a)).cast("B"))


def build_triple(workdir: Path, size: str, shard_bytes: int) -> dict[str, Path]:
    root = workdir / f"triple-{size}"
    paths = {r: root / r for r in ("base", "chat", "cp")}
    stamp = root / "complete"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        for seed, (role, path) in enumerate(paths.items()):
            t0 = time.perf_counter()
            n = write_model(path, size, seed, shard_bytes)
            print(f"built {role}: {n / 1e6:.0f}M params in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        stamp.write_text("ok")
    return paths
