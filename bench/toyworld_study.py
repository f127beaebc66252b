"""Does the chat vector work in the toy world, and how does it fail? A study over seeds.

For each seed: build the full toy world (or reuse one already built under --work), merge
CP + r * (chat - base) for r in --ratios with the embedding rows included ("all") or left out
("skip"), plus a control that adds a random vector with the same per-tensor norm as the chat
vector, and evaluate those, the CP model and the chat model on the L2 task benchmark (greedy,
hf engine on CPU). Metrics, each with a 95% Wilson interval:

    closed   format transfer: the answer ends with the closing token
    either   skill transfer: the right words in the right order, in either script
    exact    the right answer in L2 script
    in_lang  language fidelity: most of the answer's letters are in the prompt's script
             (Cyrillic for L2 prompts)

Usage:  nice python bench/toyworld_study.py --work bench-out/toyworld --seeds 0 1 2
        (one seed at a time; about 6 minutes of training per seed on one core)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

METRICS = ("closed", "either", "exact", "in_lang")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# -- merging --------------------------------------------------------------------------------------
def _load_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _copy_model_files(world: Path, out: Path) -> None:
    # tokenizer and config from the CP model, chat template and generation config from the chat model
    for f in (world / "cp").iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (world / "chat" / name).exists():
            shutil.copy(world / "chat" / name, out / name)


def merge_in_process(world: Path, out: Path, ratio: float, embeddings: str, *, random_seed: int | None = None) -> Path:
    """CP + ratio * tau in float32, cast to bf16; tau = chat - base, or a random vector of the same
    per-tensor norm when ``random_seed`` is given. Used for the random control (and when the merge
    engine is not importable)."""
    import torch
    from safetensors.torch import save_file

    from chatvec.merge.vocab import is_vocab_tensor

    if (out / "model.safetensors").exists():
        return out
    base, chat, cp = (_load_dir(world / n) for n in ("base", "chat", "cp"))
    gen = torch.Generator().manual_seed(random_seed) if random_seed is not None else None
    merged = {}
    for name in sorted(cp):
        if embeddings == "skip" and is_vocab_tensor(name):
            merged[name] = cp[name].clone()
            continue
        tau = chat[name].float() - base[name].float()
        if gen is not None:
            noise = torch.randn(tau.shape, generator=gen)
            tau = noise * (tau.norm() / noise.norm().clamp_min(1e-12))
        merged[name] = (cp[name].float() + ratio * tau).to(cp[name].dtype).contiguous()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _copy_model_files(world, tmp)
    tmp.rename(out)
    return out


def merge_engine_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("chatvec.merge.output", "chatvec.merge.plan", "chatvec.merge.recipe")
    )


def merge_with_engine(world: Path, out: Path, ratio: float, embeddings: str) -> Path:
    """CP + ratio * (chat - base) with the project's merge engine."""
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    recipe = Recipe(
        cp=str(world / "cp"),
        vectors=[VectorSpec(base=str(world / "base"), chat=str(world / "chat"), ratio=ratio)],
        embeddings="skip" if embeddings == "skip" else None,
    )
    plan = build_plan(recipe)
    run_merge_job(plan, str(out), progress=False)  # a cache hit when this recipe was merged there before
    return out


def same_weights(a: Path, b: Path) -> bool:
    import torch

    ta, tb = _load_dir(a), _load_dir(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- evaluation -----------------------------------------------------------------------------------
def evaluate(model_dir: Path, items: list[dict], max_new_tokens: int = 16) -> dict:
    from chatvec.demo.toyworld.language import SCRIPTS as TOY_SCRIPTS
    from chatvec.eval.engines.base import Decoding, GenerationRequest
    from chatvec.eval.engines.hf import HFEngine
    from chatvec.eval.fidelity import ScriptDetector
    from chatvec.eval.kinds.task import either_script_match, exact_match
    from chatvec.eval.prompts import Prompts

    engine = HFEngine(str(model_dir), device="cpu", dtype="float32", batch_size=32)
    prompts = Prompts(engine.tokenizer, model_name=model_dir.name)
    dec = Decoding(max_new_tokens=max_new_tokens)
    requests = [
        GenerationRequest(prompts.chat_ids([{"role": "user", "content": it["prompt"]}])[1], dec) for it in items
    ]
    gens = engine.generate(requests)
    engine.close()
    detect = ScriptDetector(TOY_SCRIPTS)
    counts = {m: 0 for m in METRICS}
    samples = []
    for it, g in zip(items, gens):
        s = {
            "closed": int(g.finished),
            "either": int(either_script_match(g.text, [it["answer"], it["answer_other_script"]])),
            "exact": int(exact_match(g.text, it["answer"])),
            "in_lang": int(detect(g.text)[0] == it["language"]),
        }
        for m in METRICS:
            counts[m] += s[m]
        samples.append({"id": it["id"], "task": it["task"], "response": g.text, **s})
    return {"n": len(items), "counts": counts, "samples": samples}


def run_seed(work: Path, seed: int, ratios: list[float], quick: bool, no_code_switch: bool = False) -> dict:
    from dataclasses import replace

    from chatvec.demo.toyworld.build import WORLD_FILE, WorldConfig, build_world
    from chatvec.demo.toyworld.corpora import Mixture

    world = work / (f"seed{seed}-no-code-switch" if no_code_switch else f"seed{seed}")
    if not (world / WORLD_FILE).exists():
        shutil.rmtree(world, ignore_errors=True)
        t0 = time.perf_counter()
        config = WorldConfig.small(seed) if quick else WorldConfig.full(seed)
        if no_code_switch:
            # the same world without code-switched chunks: their share goes to monolingual text
            config = replace(config, base_mixture=Mixture(mono=0.7, code_switched=0.0))
        build_world(str(world), config, progress=False)
        print(f"seed {seed}: world built in {time.perf_counter() - t0:.0f} s", flush=True)
    info = json.loads((world / WORLD_FILE).read_text())
    data = info["benchmarks"]["toy-task"]["data"]
    items = [json.loads(line) for line in (world / data["toy-l2"]).read_text().splitlines()]
    items_l1 = [json.loads(line) for line in (world / data["toy-l1"]).read_text().splitlines()]
    models: dict[str, Path] = {"cp": world / "cp", "chat": world / "chat"}
    engine_used = "merge engine" if merge_engine_available() else "in-process"
    for r in ratios:
        for emb in ("all", "skip"):
            if engine_used == "merge engine":
                path = merge_with_engine(world, world / "merged" / f"engine-r{r:g}-{emb}", r, emb)
            else:
                path = merge_in_process(world, world / "merged" / f"inproc-r{r:g}-{emb}", r, emb)
            models[f"cp+{r:g}tau {emb}"] = path
    if engine_used == "merge engine":
        # cross-check: the engine's output equals plain float32 arithmetic cast to bf16
        for emb in ("all", "skip"):
            ref = merge_in_process(world, world / "merged" / f"inproc-r1-{emb}", 1.0, emb)
            if not same_weights(models[f"cp+1tau {emb}"], ref):
                raise SystemExit(f"seed {seed}: the merge engine's cp+1tau {emb} differs from in-process arithmetic")
        engine_used += " (= in-process arithmetic, bit for bit)"
    models["cp+1random all"] = merge_in_process(
        world, world / "merged" / "inproc-random-r1-all", 1.0, "all", random_seed=10_000 + seed
    )
    results = {name: evaluate(path, items) for name, path in models.items()}
    results["chat (L1 prompts)"] = evaluate(world / "chat", items_l1)
    return {
        "seed": seed,
        "no_code_switch": no_code_switch,
        "merge": engine_used,
        "twin_alignment": {k: v["twin_alignment"] for k, v in info["models"].items()},
        "train_seconds": info["train_seconds"],
        "results": results,
    }


def _cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:5.2f} [{lo:.2f},{hi:.2f}]"


def print_table(runs: list[dict]) -> None:
    names = list(runs[0]["results"])
    for run in runs + [None]:
        title = (
            f"seed {run['seed']} (merge: {run['merge']}; twin alignment {run['twin_alignment']})"
            if run
            else f"all seeds pooled ({len(runs)} seeds; intervals over items, not seeds)"
        )
        print(f"\n{title}")
        print(f"{'model':22s} " + " ".join(f"{m:>17s}" for m in METRICS) + "     n")
        for name in names:
            if run:
                res = [run["results"][name]]
            else:
                res = [r["results"][name] for r in runs]
            n = sum(x["n"] for x in res)
            cells = [_cell(sum(x["counts"][m] for x in res), n) for m in METRICS]
            print(f"{name:22s} " + " ".join(f"{c:>17s}" for c in cells) + f" {n:5d}")


def print_by_task(runs: list[dict]) -> None:
    tasks = ("reverse", "repeat", "first", "last")
    print("\nby task, all seeds pooled: either-script / exact (L2) rates")
    print(f"{'model':22s} " + " ".join(f"{t:>13s}" for t in tasks))
    for name in runs[0]["results"]:
        cells = []
        for t in tasks:
            rows = [x for r in runs for x in r["results"][name]["samples"] if x["task"] == t]
            n = len(rows) or 1
            cells.append(f"{sum(x['either'] for x in rows) / n:.2f} / {sum(x['exact'] for x in rows) / n:.2f}")
        print(f"{name:22s} " + " ".join(f"{c:>13s}" for c in cells))


def print_markdown(runs: list[dict]) -> None:
    """The pooled table as Markdown, each cell with its Wilson interval and the per-seed rates."""
    heads = {
        "closed": "closes (format)",
        "either": "right words, either script (skill)",
        "exact": "right answer in L2 script",
        "in_lang": "answer in L2 script (fidelity)",
    }
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(
        f"\n| model (seeds {seeds}; n = {sum(r['results']['cp']['n'] for r in runs)}) | "
        + " | ".join(heads[m] for m in METRICS)
        + " |"
    )
    print("|---" * (len(METRICS) + 1) + "|")
    for name in runs[0]["results"]:
        cells = []
        for m in METRICS:
            res = [r["results"][name] for r in runs]
            k, n = sum(x["counts"][m] for x in res), sum(x["n"] for x in res)
            lo, hi = wilson(k, n)
            per_seed = " / ".join(f"{x['counts'][m] / x['n']:.2f}" for x in res)
            cells.append(f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] ({per_seed})")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-out/toyworld", help="folder for the worlds and merged models")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 1.25])
    ap.add_argument("--quick", action="store_true", help="small worlds (a smoke test of this script)")
    ap.add_argument(
        "--report-only", action="store_true", help="print the tables of the study-seed*.json files under --work"
    )
    ap.add_argument(
        "--no-code-switch",
        action="store_true",
        help="ablation: no code-switched chunks in the base's data (does anything still transfer?)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.report_only:
        suffix = "-no-code-switch" if args.no_code_switch else ""
        runs = [json.loads((work / f"study-seed{seed}{suffix}.json").read_text()) for seed in args.seeds]
        print_table(runs)
        print_by_task(runs)
        print_markdown(runs)
        return
    for seed in args.seeds:
        run = run_seed(work, seed, args.ratios, args.quick, args.no_code_switch)
        suffix = "-no-code-switch" if args.no_code_switch else ""
        (work / f"study-seed{seed}{suffix}.json").write_text(json.dumps(run, indent=1, ensure_ascii=False))
        runs.append(run)
        print_table([run])
    print_table(runs)
    print_by_task(runs)
    print_markdown(runs)


if __name__ == "__main__":
    main()
