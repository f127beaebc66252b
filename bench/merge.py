"""Speed of `chatvec merge` against the strict floor, in paired runs on the same page cache.

    python bench/merge.py [--size 300M,1.2B,wide] [--workers 0,1,2] [--methods add,ties:0.5]
                          [--device cpu|cuda] [--repeats 5] [--workdir DIR] [--shard-size 200MB]
                          [--chatvec [LABEL=]COMMAND ...]

Builds Llama-shaped bf16 triples (base, chat, CP; bench/merge_models.py), reads every input once
so the page cache holds them, then, `--repeats` times, runs a pair (or a tuple, with several
workers or methods):

* the strict floor, a shell command: `cat base/*.safetensors chat/*.safetensors > /dev/null;
  cp cp/*.safetensors out/; sync` (every input byte read once, the output's size written once
  by the kernel's own copy, and on disk when it returns);
* `chatvec merge --workers N --method M ...; sync`, the whole command (interpreter start and
  imports included), for every N and method asked for.

Every run starts from the same state: the output folder removed, dirty pages written back,
inputs in the page cache. Wall time is the command's; CPU time is user + system time of its
processes (resource.getrusage(RUSAGE_CHILDREN) of a small launcher whose only child is the
command); peak RSS is the largest process's. The table prints medians with their range and the
median of the per-pair ratios to the floor (each merge against the floor run just before it),
which cancels most of what other work on the machine does to both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge_models import SIZES, build_triple

ROOT = Path(__file__).resolve().parents[1]

# Runs `sh -c COMMAND` and reports its wall time, CPU time and peak RSS. The launcher keeps the
# bench's own (large) process out of the figures: a child forked straight from it would inherit
# its RSS high-water mark, and RUSAGE_CHILDREN counts only what this launcher waited for.
_LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(["sh", "-c", sys.argv[1]], capture_output=True)
seconds = time.perf_counter() - t0
sys.stdout.write(proc.stdout.decode())
sys.stderr.write(proc.stderr.decode())
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "cpu": r.ru_utime + r.ru_stime, "maxrss": r.ru_maxrss * 1024}), file=sys.stderr)
"""


class Run:
    """One timed command: wall s, CPU s, peak RSS, its stdout and its log."""

    def __init__(self, command: str) -> None:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, command], capture_output=True, cwd=ROOT)
        lines = proc.stderr.decode().strip().splitlines()
        stats = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": proc.returncode or 1}
        if stats["rc"]:
            raise SystemExit(f"{command} failed ({stats['rc']}):\n" + "\n".join(lines[:-1]))
        self.seconds, self.cpu, self.rss = stats["seconds"], stats["cpu"], stats["maxrss"]
        self.stdout, self.log = proc.stdout.decode().strip(), "\n".join(lines[:-1])


def floor_command(paths: dict[str, Path], out: Path) -> str:
    q = shlex.quote
    return (
        f"cat {q(str(paths['base']))}/*.safetensors {q(str(paths['chat']))}/*.safetensors > /dev/null; "
        f"mkdir -p {q(str(out))}; cp {q(str(paths['cp']))}/*.safetensors {q(str(out))}/; sync"
    )


def chatvec_command() -> list[str]:
    exe = Path(sys.executable).with_name("chatvec")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chatvec.cli"]


def merge_command(exe: list[str], paths, out: Path, workers: int, device: str, shard_size: str, method) -> str:
    cmd = exe + ["-v", "merge", "--cp", str(paths["cp"]), "--base", str(paths["base"])]
    cmd += ["--chat", str(paths["chat"]), "--out", str(out), "--workers", str(workers), "--device", device]
    cmd += ["--shard-size", shard_size, "--ratio", "1.0", "--method", method[0]]
    if method[0] != "add":
        cmd += ["--density", str(method[1])]
    return shlex.join(cmd) + " && sync"


_PHASE = re.compile(r"(ray start|actors up|shards|commit) ([0-9.]+) s")
_STAGES = re.compile(r"(\w+) ([0-9.]+) CPU-s")


def merge_phases(log: str) -> dict[str, float]:
    """The Ray executor's phase timings from its `-v` log line (empty for --workers 0)."""
    for line in reversed(log.splitlines()):
        if "merge actors:" in line:
            return {k: float(v) for k, v in _PHASE.findall(line)}
    return {}


def stage_cpu(log: str) -> dict[str, float]:
    """CPU seconds per stage of an in-process merge, summed over its shards (merge/stage_clock.py's lines)."""
    total: dict[str, float] = {}
    for line in log.splitlines():
        if "stages:" in line:
            for k, v in _STAGES.findall(line.split("stages:", 1)[1]):
                total[k] = total.get(k, 0.0) + float(v)
    return total


def settle(out: Path) -> None:
    """The same start for every run: no output folder, dirty pages written back, and a Ray run's
    processes (which go on exiting after its command returns) given time to go."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    time.sleep(1.0)


def _methods(text: str) -> list[tuple[str, float]]:
    """ "add,ties:0.5" -> [("add", 1.0), ("ties", 0.5)]."""
    out = []
    for item in text.split(","):
        name, _, density = item.partition(":")
        out.append((name, float(density or 1.0)))
    return out


def _build(text: str) -> tuple[str, list[str]]:
    """ "before=/path/to/chatvec" -> ("before", ["/path/to/chatvec"])."""
    label, sep, command = text.partition("=")
    if not sep or " " in label:
        label, command = "", text
    return label, shlex.split(command)


def _span(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def bench_size(args, size: str, workdir: Path) -> None:
    from chatvec.core.units import format_size, parse_size

    paths = build_triple(workdir, size, parse_size(args.shard_size))
    files = sorted(f for p in paths.values() for f in p.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in files)
    out_bytes = sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
    out = workdir / "out"
    methods = _methods(args.methods)
    builds = [_build(text) for text in args.chatvec] or [("", chatvec_command())]
    runs = [(b, w, m) for b in builds for m in methods for w in (int(w) for w in args.workers.split(","))]
    labels = [
        (f"[{b[0]}] " if b[0] else "")
        + f"--workers {w}"
        + ("" if m[0] == "add" else f" --method {m[0]} --density {m[1]:g}")
        for b, w, m in runs
    ]
    commands = [merge_command(b[1], paths, out, w, args.device, args.shard_size, m) for b, w, m in runs]
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # page cache warm
    for command in commands:  # untimed: bytecode and numba's disk cache written, as after any first run
        settle(out)
        Run(command)
    results: dict[str, list[Run]] = {"floor": [], **{name: [] for name in labels}}
    loads = []
    started = datetime.datetime.now()
    for _ in range(args.repeats):
        for name, command in [("floor", floor_command(paths, out)), *zip(labels, commands)]:
            settle(out)
            loads.append(os.getloadavg()[0])
            results[name].append(Run(command))
    ended = datetime.datetime.now()
    floors = results["floor"]
    print(
        f"\n{size} bf16 Llama-shaped triple: reads {format_size(in_bytes)}, writes {format_size(out_bytes)}; "
        f"shards {args.shard_size}; device {args.device}; {args.repeats} pairs; page cache warm; "
        f"{os.cpu_count()} CPUs; {started:%Y-%m-%d %H:%M}-{ended:%H:%M}; 1-min load average {_span(loads, '{:.1f}')}"
    )
    print("| run | wall s | range | x floor | range | CPU s | range | x floor CPU | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, vals in results.items():
        walls, cpus = [r.seconds for r in vals], [r.cpu for r in vals]
        ratios = [r.seconds / f.seconds for r, f in zip(vals, floors)]
        cpu_ratios = [r.cpu / f.cpu for r, f in zip(vals, floors) if f.cpu > 0]
        rss = max(r.rss for r in vals)
        shown = "strict floor (cat, cp, sync)" if name == "floor" else f"`chatvec merge {name}; sync`"
        print(
            f"| {shown} | {statistics.median(walls):.2f} | {_span(walls)} | {statistics.median(ratios):.2f} | "
            f"{_span(ratios)} | {statistics.median(cpus):.2f} | {_span(cpus)} | "
            f"{statistics.median(cpu_ratios) if cpu_ratios else float('nan'):.2f} | "
            f"{format_size(rss) if name != 'floor' else '-'} |"
        )
    print("x floor: median over the pairs of merge / floor (wall or CPU) of the same pair.")
    for name in labels:
        stages = [stage_cpu(r.log) for r in results[name]]
        if stages and all(stages):
            keys = list(stages[0])
            shown = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in stages):.2f}" for k in keys)
            print(f"{name}: CPU-s per stage (medians, summed over shards): {shown}")
        phases = [merge_phases(r.log) for r in results[name]]
        if phases and all(phases):
            shown = ", ".join(f"{k} {statistics.median(p.get(k, 0.0) for p in phases):.2f} s" for k in phases[0])
            print(f"{name}: Ray phases (medians): {shown}; last: {results[name][-1].stdout.splitlines()[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="300M", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--workers", default="0", help="comma-separated worker counts, e.g. 0,1,2")
    ap.add_argument("--methods", default="add", help="comma-separated methods with densities, e.g. add,ties:0.5")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5, help="pairs (floor, merge) per size")
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument(
        "--chatvec",
        action="append",
        default=[],
        help="[LABEL=]COMMAND: a chatvec command to time (repeat to compare builds in the same pairs; "
        "default: this environment's)",
    )
    ap.add_argument("--workdir", default=None, help="keep the triples here between runs (default: a temp dir)")
    args = ap.parse_args()
    sizes = args.size.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size {unknown}: use {', '.join(SIZES)}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chatvec-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for size in sizes:
            bench_size(args, size, workdir)
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
