"""Weight swaps of the in-engine sweep against a memory floor, measured in the same process.

    python bench/swap.py [--worlds toy,100m,800m] [--engines hf,vllm] [--repeats 5] [--threads 2]
                         [--device cpu|cuda] [--sweep] [--out DIR]

For each world, ``--repeats`` rounds, each round over four ratios (0.25 ... 1.0, method add):

* floor: one torch pass over the resident tensors writing cp + r * tau into preallocated float32
  buffers (``torch.add(cp, tau, alpha=r, out=...)``, one call per tensor), measured next to each
  engine's swaps (round by round);
* resident: ``Swapper.swap`` from inputs held in memory, into the hf model's parameters (in
  place) or, for vLLM, through its weight loader (``reload_weights``), which on the CPU build
  also repacks every linear weight for oneDNN: its own cost is measured apart, as
  "vllm loader only" (the same loader fed tensors computed beforehand);
* streaming: the swap before residency (every input read from storage, tensor by tensor).

Worlds: ``toy`` (demo/toyworld, 0.93M parameters, float32) and ``100m``, a bf16 Llama triple of
about 114M parameters (hidden 768, 16 layers, head size 192), the one bench/in_engine.py builds;
``800m`` (hidden 2048, 16 layers) for a GPU. ``--device cuda`` holds the inputs and runs the hf
engine (bf16, as the CP model is saved) on the GPU; vLLM runs where its build runs.
Figures are medians over every swap of every round, with the spread (min-max), and the ratio
to the median of the floor measured with that engine. The first swap of each engine reads the inputs into memory; that read is
reported on its own line and left out of the resident figures.

``--sweep`` also runs bench/in_engine.py's comparison (a 6-ratio sweep in-engine against
merge + load) for the same worlds and engines, in this process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
RATIOS = (0.25, 0.5, 0.75, 1.0)


def build_world(kind: str, work: Path) -> dict[str, Path]:
    if kind == "toy":
        return {"cp": TOY / "cp", "base": TOY / "base", "chat": TOY / "chat"}
    from chatvec.demo.tiny import build_triple

    hidden = {"100m": 768, "800m": 2048}[kind]
    folder = work / f"world-{kind}"
    if not (folder / "cp" / "config.json").exists():
        print(f"building a {kind} bf16 triple (once) ...", flush=True)
        build_triple(folder, hidden=hidden, layers=16, shard_size="2GB")
    return {"cp": folder / "cp", "base": folder / "base", "chat": folder / "chat"}


def plans(world: dict[str, Path], embeddings: str | None) -> list:
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    out = []
    for r in RATIOS:
        vector = VectorSpec(base=str(world["base"]), chat=str(world["chat"]), ratio=r)
        out.append(build_plan(Recipe(cp=str(world["cp"]), vectors=[vector], embeddings=embeddings)))
    return out


def floor_pass(resident, plan, buffers: dict, device: str):
    """The floor: cp + r * tau into preallocated buffers, one torch call per tensor."""
    import torch

    from chatvec.merge.resident import _raw_key

    def run() -> None:
        for task in plan.tasks.values():
            cp = resident.entries[_raw_key(plan, task.cp)]
            out = buffers.get(task.name)
            if out is None:
                out = buffers[task.name] = torch.empty(task.numel, dtype=torch.float32, device=device)
            if not task.terms:
                out.copy_(cp)
                continue
            term = task.terms[0]
            tau = resident.entries[("tau", _raw_key(plan, term.chat), _raw_key(plan, term.base))]
            torch.add(cp, tau, alpha=term.ratio, out=out)

    return run


def timed(fn, device: str = "cpu") -> float:
    import torch

    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):  # kernels run ahead of the host: wait for them
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_world(kind: str, engines: list[str], args, work: Path) -> list[tuple]:
    import torch

    from chatvec.cluster.weight_swap import EXTENSION, Swapper, swap_into
    from chatvec.eval.engines import load_engine
    from chatvec.merge.resident import ResidentMerge

    world = build_world(kind, work)
    # the toy CP model adds words to the vocabulary: its embedding rows are left as they are
    points = plans(world, "skip" if kind == "toy" else None)
    params = sum(t.numel for t in points[0].tasks.values())
    dev = args.device
    resident = ResidentMerge(dev)
    resident.load(points[0])
    buffers: dict = {}
    rows, notes = [], []
    for name in engines:
        extra = {"worker_extension": EXTENSION} if name == "vllm" else {}
        options = {"enforce_eager": True, "cpu_kvcache_gib": 1} if name == "vllm" else None
        dtype = "float32" if dev == "cpu" else "auto"  # vLLM's CPU build and CPU matmuls want float32
        engine = load_engine(name, str(world["cp"]), device=dev, dtype=dtype, options=options, **extra)
        torch.set_num_threads(args.threads)  # vLLM sets its own when it starts
        swapper = Swapper(engine)
        first = swapper.swap(points[0])
        notes.append(
            f"{kind} {name}: first swap {first.seconds:.2f} s, of which reading inputs into memory "
            f"{first.load_seconds:.2f} s ({first.held_bytes / 1e6:.0f} MB held)"
        )
        floor_t, resident_t, stream_t, loader_t = [], [], [], []
        for _ in range(args.repeats):
            for plan in points:
                floor_t.append(timed(floor_pass(resident, plan, buffers, dev), dev))
                got = []
                resident_t.append(timed(lambda p=plan, g=got, s=swapper: g.append(s.swap(p)), dev))
                assert got[0].resident, got[0].why
                stream_t.append(timed(lambda p=plan, e=engine: swap_into(e, p), dev))
                if name == "vllm":
                    loader_t.append(_loader_only(engine, plan))
        swapper.close()
        engine.close()
        # each engine's rows against the floor measured next to them (vLLM changes the threads)
        times = {"floor": floor_t, "resident": resident_t, "streaming": stream_t, "loader only": loader_t}
        floor = statistics.median(floor_t)
        for label, values in times.items():
            if values:
                med = statistics.median(values)
                row = (kind, params, f"{name} {label}", med, min(values), max(values), med / floor, len(values))
                rows.append(row)
    for line in notes:
        print(line, flush=True)
    return rows


def _loader_only(engine, plan) -> float:
    """vLLM's reload_weights fed tensors computed beforehand: the loader's and repacking's own cost."""
    import torch

    from chatvec.merge.resident import TORCH_DTYPES

    def run(worker):
        state = worker._chatvec_resident
        ready = {}
        for task, tensor in state.merge.write(
            plan, lambda t: torch.empty(t.numel, dtype=getattr(torch, TORCH_DTYPES[t.dtype]))
        ):
            ready[task.name] = tensor.view(task.shape)
        start = time.perf_counter()
        worker.model_runner.reload_weights(weights_iterator=iter(ready.items()))
        return time.perf_counter() - start

    return engine.llm.collective_rpc(run)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="toy,100m")
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--repeats", type=int, default=5, help="rounds over the four ratios")
    p.add_argument("--threads", type=int, default=2, help="torch threads, for the floor and the swaps alike")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: inputs held and the hf engine run on the GPU")
    p.add_argument("--sweep", action="store_true", help="also bench/in_engine.py's 6-ratio sweep comparison")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="chatvec-bench-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    rows = []
    for kind in args.worlds.split(","):
        rows += bench_world(kind, engines, args, work)
    print(
        f"\nadd swaps on {args.device}, {len(RATIOS)} ratios x {args.repeats} rounds, torch threads "
        f"{args.threads}; seconds\n"
    )
    heads = ("world", "parameters", "path", "median s", "min-max s", "x floor", "n")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for kind, params, label, med, lo, hi, ratio, n in rows:
        print(f"| {kind} | {params / 1e6:.2f}M | {label} | {med:.4f} | {lo:.4f}-{hi:.4f} | {ratio:.2f} | {n} |")
    if args.sweep:
        import importlib.util

        # loaded by path: putting bench/ on sys.path would let bench/eval.py shadow chatvec's eval
        spec = importlib.util.spec_from_file_location("bench_in_engine", ROOT / "bench" / "in_engine.py")
        in_engine = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(in_engine)
        sys.argv = ["in_engine.py", "--worlds", args.worlds, "--engines", args.engines]
        sys.argv += ["--out", str(work), "--threads", str(args.threads)]
        in_engine.main()


if __name__ == "__main__":
    main()
