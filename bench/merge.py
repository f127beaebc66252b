"""Speed and memory of `chatvec merge` against the I/O floor, measured in the same run.

    python bench/merge.py [--size 300M|1.2B|wide] [--workers 0,1,2] [--methods add,ties:0.5]
                          [--device cpu|cuda] [--repeats 3] [--workdir DIR] [--shard-size 200MB]

Builds a Llama-shaped bf16 triple (base, chat, CP) with safetensors directly (random bits, no
model code), warms the page cache, then times:

* floor: read every input byte once with plain file reads and write the output's bytes once,
  fsync included (the merge's data reaches the disk later; the floor counts that cost);
* the whole `chatvec merge --workers N --method M` command in a subprocess (wall time, imports
  included), with the child's peak RSS (for N >= 1 that is the driver's; actors are Ray's
  processes), for every N and method asked for.

`--size wide` is a triple with two 131072 x 1024 matrices per model, where `ties` (a whole-tensor
statistic) shows its cost. Prints one table with medians over the repeats and the ratio to the
floor, the merge phase against `--workers 0`, and the bytes each Ray actor wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
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


def input_files(paths: dict[str, Path]) -> list[Path]:
    return sorted(f for p in paths.values() for f in p.glob("*.safetensors"))


def io_floor(files: list[Path], out_bytes: int, out_path: Path) -> float:
    """Plain reads of every input byte once + one write of the output's size."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
    with open(out_path, "wb") as fh:
        left = out_bytes
        while left:
            n = min(left, len(buf))
            fh.write(view[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    out_path.unlink()
    return seconds


# Runs the command and reports its own wall time, CPU time and peak RSS. A small launcher does
# the fork: a child forked straight from this (large) process would inherit its RSS high-water
# mark into ru_maxrss.
_LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True)
seconds = time.perf_counter() - t0
sys.stdout.write(proc.stdout.decode())
sys.stderr.write(proc.stderr.decode())
r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the merge is this launcher's only child
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "cpu": r.ru_utime + r.ru_stime, "maxrss": r.ru_maxrss * 1024}), file=sys.stderr)
"""


def chatvec_command() -> list[str]:
    exe = Path(sys.executable).with_name("chatvec")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chatvec.cli"]


_PHASE = re.compile(r"(ray start|actors up|shards|commit) ([0-9.]+) s")


def merge_phases(log: str) -> dict[str, float]:
    """The Ray executor's phase timings from its `-v` log line (empty for --workers 0)."""
    for line in reversed(log.splitlines()):
        if "merge actors:" in line:
            return {k: float(v) for k, v in _PHASE.findall(line)}
    return {}


def run_merge(paths, out, workers, device, shard_size, method=("add", 1.0)) -> tuple[float, float, int, str, dict]:
    """Wall seconds, CPU seconds, peak RSS, summary line and Ray phase timings of one whole
    `chatvec merge` process."""
    shutil.rmtree(out, ignore_errors=True)
    settle()
    cmd = chatvec_command() + [
        "-v",
        "merge",
        "--cp",
        str(paths["cp"]),
        "--base",
        str(paths["base"]),
        "--chat",
        str(paths["chat"]),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--device",
        device,
        "--shard-size",
        shard_size,
        "--method",
        method[0],
        "--density",
        str(method[1]),
    ]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, cwd=ROOT)
    lines = proc.stderr.decode().strip().splitlines()
    stats = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": proc.returncode or 1}
    if stats["rc"]:
        raise SystemExit(f"merge failed ({stats['rc']}):\n" + "\n".join(lines[:-1]))
    log = "\n".join(lines[:-1])
    return stats["seconds"], stats["cpu"], stats["maxrss"], proc.stdout.decode().strip(), merge_phases(log)


def _inner_seconds(summary: str, phases: dict[str, float]) -> float:
    """Workers 0: the summary's own seconds; Ray: the driver's shard and commit phases."""
    if phases:
        return phases.get("shards", 0.0) + phases.get("commit", 0.0)
    m = re.search(r" in ([0-9.]+) s ", summary)
    return float(m.group(1)) if m else float("nan")


def settle() -> None:
    """Start each timed run from a quiet machine: earlier runs' dirty pages written back, and a
    Ray run's processes (which go on exiting after its command returns) given time to go."""
    os.sync()
    time.sleep(2.0)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _methods(text: str) -> list[tuple[str, float]]:
    """ "add,ties:0.5" -> [("add", 1.0), ("ties", 0.5)]."""
    out = []
    for item in text.split(","):
        name, _, density = item.partition(":")
        out.append((name, float(density or 1.0)))
    return out


_BYTES_PER_WORKER = re.compile(r"bytes per worker: (.*)$", re.M)


def bytes_per_worker(summary: str) -> str:
    """'merge actor 0 ... 1.2 GB, merge actor 1 ... 1.1 GB' -> 'actor 0 1.2 GB / actor 1 1.1 GB'."""
    m = _BYTES_PER_WORKER.search(summary)
    if not m:
        return "-"
    parts = re.findall(r"merge actor (\d+) pid \d+ on \S+ ([0-9.]+ [kMGT]?B)", m.group(1))
    return " / ".join(f"actor {k} {size}" for k, size in parts) or m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="300M")
    ap.add_argument("--workers", default="0", help="comma-separated worker counts, e.g. 0,1,2")
    ap.add_argument("--methods", default="add", help="comma-separated methods with densities, e.g. add,ties:0.5")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--workdir", default=None, help="keep the triple here between runs (default: a temp dir)")
    args = ap.parse_args()
    from chatvec.core.units import format_size, parse_size

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chatvec-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_triple(workdir, args.size, parse_size(args.shard_size))
        files = input_files(paths)
        in_bytes = sum(f.stat().st_size for f in files)
        out_bytes = sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
        workers = [int(w) for w in args.workers.split(",")]
        methods = _methods(args.methods)
        runs = [(w, m) for m in methods for w in workers]

        def label(w: int, m: tuple[str, float]) -> str:
            return f"--workers {w}" + ("" if m[0] == "add" else f" {m[0]} {m[1]:g}")

        io_floor(files, out_bytes, workdir / "floor.bin")  # warm the page cache
        rows: dict[str, list[tuple[float, float, int]]] = {"floor": []}
        inner: dict[str, list[float]] = {}
        startup: dict[str, list[float]] = {}
        spread: dict[str, str] = {}
        for w, m in runs:
            rows[label(w, m)] = []
        last = ""
        for _ in range(args.repeats):
            shutil.rmtree(workdir / "out", ignore_errors=True)
            settle()
            c0 = _cpu_self()
            s = io_floor(files, out_bytes, workdir / "floor.bin")
            rows["floor"].append((s, _cpu_self() - c0, 0))
            for w, m in runs:
                name = label(w, m)
                s, cpu, rss, last, phases = run_merge(paths, workdir / "out", w, args.device, args.shard_size, m)
                rows[name].append((s, cpu, rss))
                inner.setdefault(name, []).append(_inner_seconds(last, phases))
                if phases:
                    startup.setdefault(name, []).append(phases.get("ray start", 0.0) + phases.get("actors up", 0.0))
                    spread[name] = bytes_per_worker(last)
        floor = statistics.median(v[0] for v in rows["floor"])
        floor_cpu = statistics.median(v[1] for v in rows["floor"])
        print(
            f"\n{args.size} bf16 Llama-shaped triple: reads {format_size(in_bytes)}, "
            f"writes {format_size(out_bytes)}; "
            f"shards {args.shard_size}; device {args.device}; median of {args.repeats}; page cache warm; "
            f"{os.cpu_count()} CPUs"
        )
        print("| run | wall s | fastest | x floor | CPU s | x floor CPU | GB/s | peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        for name, vals in rows.items():
            med = statistics.median(v[0] for v in vals)
            cpu = statistics.median(v[1] for v in vals)
            rss = max(v[2] for v in vals)
            shown = "I/O floor (fsync included)" if name == "floor" else f"`chatvec merge {name}`"
            print(
                f"| {shown} | {med:.2f} | {min(v[0] for v in vals):.2f} | {med / floor:.2f} | {cpu:.2f} | "
                f"{cpu / floor_cpu:.2f} | {(in_bytes + out_bytes) / med / 1e9:.2f} | "
                f"{format_size(rss) if rss else '-'} |"
            )
        print(
            "GB/s counts input plus output bytes; CPU s is user + system time of the process (for the floor: "
            "of its reads and writes)."
        )
        print(
            "\nThe merge itself, inside the command (imports, and for Ray its start-up and actor start-up, left out):"
        )
        print("| run | merge s | x `--workers 0` add | Ray + actor start s | bytes per actor |")
        print("|---|---|---|---|---|")
        base_name = label(0, methods[0]) if 0 in workers and methods[0][0] == "add" else None
        base = statistics.median(inner[base_name]) if base_name else None
        for w, m in runs:
            name = label(w, m)
            med = statistics.median(inner[name])
            ratio = f"{med / base:.2f}" if base else "-"
            start = f"{statistics.median(startup[name]):.2f}" if name in startup else "-"
            print(f"| `{name}` | {med:.2f} | {ratio} | {start} | {spread.get(name, '-')} |")
        print(f"last summary: {last}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
