"""The evaluation fan-out: eval actors over models, then judge actors over cells.

Each eval actor holds one engine for one model and runs every cell of that model before it
takes the next model from the queue, so each model is loaded once per run. Actors request
``gpus_per_engine`` GPUs each (vLLM's tensor-parallel size; none with ``--device cpu``). When
all models are done the eval actors are released and judge actors (``judge_workers``, one by
default) load the judge once each and fill in the judged metrics of every cell that waits.

Failures: an exception inside a cell is recorded by the actor (the cell's status says failed,
with the error) and the actor goes on. An actor that dies fails the cell it was running; the
cells queued behind it go back to the queue for a fresh actor (which loads that model again).
``workers=0`` runs everything in this process without importing Ray.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from eval.results import Cell, write_status, write_summary
from eval.runner import (
    FAILED,
    GENERATE,
    JUDGE,
    SKIPPED,
    CellResult,
    absolute_run_args,
    EvalOutcome,
    JudgeRunner,
    ModelEvaluator,
    Progress,
    RunSettings,
    cells_to_generate,
    cells_to_judge,
    languages_in_play,
    prepare_run,
    run_in_process,
    summarize,
)
from merge.errors import ConfigError
from merge.storage import Store

logger = logging.getLogger(__name__)


# -- the actors (plain classes; wrapped with ray.remote when Ray is in use) -------------------------
class EvalWorker:
    """Holds one ModelEvaluator at a time."""

    def __init__(self, out_uri: str, run_id: str, settings: RunSettings, languages: Sequence[str], judge: bool):
        self.args = dict(out_uri=out_uri, run_id=run_id, settings=settings, languages=languages, judge=judge)
        self.evaluator: ModelEvaluator | None = None

    def prepare(self, model: str, uri: str) -> dict:
        """Load ``model``, dropping the previous one. A load error is kept for its cells to report."""
        from eval.engines import LOAD_COUNTS

        if self.evaluator is not None:
            self.evaluator.close()
        self.evaluator = ModelEvaluator(model, uri, **self.args)
        try:
            self.evaluator.ensure_loaded()
        except Exception:
            pass  # kept in load_error; each of the model's cells reports it
        return {"pid": os.getpid(), "loads": dict(LOAD_COUNTS), "error": self.evaluator.load_error}

    def run(self, cell: Cell) -> CellResult:
        return self.evaluator.run_cell(cell)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


class JudgeWorker:
    def __init__(self, judge_uri: str, out_uri: str, run_id: str, settings: RunSettings):
        self.runner = JudgeRunner(judge_uri, out_uri=out_uri, run_id=run_id, settings=settings)

    def prepare(self, _key: Any, _uri: Any) -> dict:
        from eval.engines import LOAD_COUNTS

        error = None
        if self.runner.engine is None:
            try:
                self.runner.load()
            except Exception as exc:  # each cell reports it
                error = f"{type(exc).__name__}: {exc}"
        return {"pid": os.getpid(), "loads": dict(LOAD_COUNTS), "error": error}

    def run(self, cell: Cell) -> CellResult:
        return self.runner.judge_cell(cell)

    def close(self) -> None:
        self.runner.close()


# -- a pool of actors pulling jobs from a queue ---------------------------------------------------
@dataclass
class _Slot:
    actor: Any = None
    job: tuple | None = None
    submitted: list[Cell] = field(default_factory=list)
    finished: set = field(default_factory=set)


def _run_pool(make_actor: Callable[[int], Any], jobs: list[tuple[Any, Any, list[Cell]]], size: int, *, stage: str,
              store: Store, run_id: str, progress: Progress) -> tuple[list[CellResult], dict]:
    """Run ``jobs`` = [(key, uri, cells)] on ``size`` actors; every job's cells go to one actor
    after one ``prepare(key, uri)``. Returns the cell results and each actor's last load counts."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(jobs)
    slots = [_Slot() for _ in range(min(size, len(jobs)))]
    inflight: dict[Any, tuple[int, Cell | None]] = {}
    results: list[CellResult] = []
    load_counts: dict[str, dict] = {}
    made = [0]

    def assign(i: int) -> None:
        slot = slots[i]
        slot.job, slot.submitted, slot.finished = None, [], set()
        if not queue:
            return
        if slot.actor is None:
            slot.actor = make_actor(made[0])
            made[0] += 1
        key, uri, cells = queue.popleft()
        slot.job = (key, uri, cells)
        inflight[slot.actor.prepare.remote(key, uri)] = (i, None)
        for cell in cells:
            inflight[slot.actor.run.remote(cell)] = (i, cell)
            slot.submitted.append(cell)

    def actor_died(i: int, exc: BaseException) -> None:
        slot = slots[i]
        pending = [c for c in slot.submitted if c not in slot.finished]
        for ref in [r for r, (j, _c) in inflight.items() if j == i]:
            del inflight[ref]
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        slot.actor = None
        if pending:
            victim, rest = pending[0], pending[1:]
            error = f"the {stage} actor died: {type(exc).__name__}: {exc}"[:2000]
            logger.error("cell %s failed: %s", victim.key, error)
            write_status(store, victim, FAILED, stage=stage, error=error, run_id=run_id)
            result = CellResult.of(victim, FAILED, stage, error=error)
            results.append(result)
            progress.update(result)
            if rest:
                key, uri, _cells = slot.job
                queue.appendleft((key, uri, rest))
        assign(i)

    for i in range(len(slots)):
        assign(i)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        if ref not in inflight:  # dropped when its actor died
            continue
        i, cell = inflight.pop(ref)
        slot = slots[i]
        try:
            value = ray.get(ref)
        except RayActorError as exc:
            actor_died(i, exc)
            continue
        except RayTaskError as exc:  # the method raised (the actor lives on): that cell failed
            if cell is None:
                continue  # a failed prepare: each of its cells reports the error
            error = f"{type(exc).__name__}: {exc}"[:2000]
            write_status(store, cell, FAILED, stage=stage, error=error, run_id=run_id)
            value = CellResult.of(cell, FAILED, stage, error=error)
        if cell is None:
            load_counts[str(slot.actor)] = value["loads"]
            continue
        slot.finished.add(cell)
        results.append(value)
        progress.update(value)
        if len(slot.finished) == len(slot.submitted):
            assign(i)
    for slot in slots:
        if slot.actor is not None:
            try:
                ray.get(slot.actor.close.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(slot.actor)
    return results, load_counts


def actor_name(role: str, run_id: str, n: int) -> str:
    """Actors are named (visible in the dashboard, reachable with ray.get_actor) per run."""
    return f"chatvec-{role}-{run_id}-{n}"


def _sum_loads(per_actor: dict[str, dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_actor.values():
        for uri, n in counts.items():
            total[uri] = total.get(uri, 0) + n
    return total


# -- the entry point ------------------------------------------------------------------------------
def run_eval(models: Mapping[str, str], *, benchmarks=None, languages=None, engine: str | None = None,
             judge: str | None = None, workers: int | None = None, out_uri: str, run_id: str | None = None,
             config=None, device: str | None = None, batch_size: int | None = None,
             max_new_tokens: int | None = None, limit: int | None = None, dtype: str = "auto",
             judge_max_new_tokens: int = 512, show_progress: bool = True) -> EvalOutcome:
    """Evaluate ``models`` ({name: uri}) on benchmarks x languages into ``out_uri``.

    ``engine``, ``workers``, ``device`` and ``batch_size`` default to the config's ``eval``
    section (``config``: a ChatvecConfig; None loads ray_config.yaml or the defaults). ``workers``
    0 runs in this process without Ray; N >= 1 runs N eval actors on Ray. ``max_new_tokens`` caps
    every benchmark's generation length and the judge's (``judge_max_new_tokens``), ``limit`` the
    items per cell (quick runs). Finished cells already in ``out_uri`` are kept; the returned
    outcome lists every cell's result.
    """
    from cluster.config import load_config

    config = config if config is not None else load_config(None)
    ev = config.eval
    workers = ev.workers if workers is None else workers
    device = device or ev.device
    engine = engine or ev.engine
    settings = RunSettings(
        engine=engine, device=device, dtype=dtype, batch_size=batch_size or ev.batch_size,
        gpus_per_engine=1 if ev.gpus_per_engine == "auto" else max(1, int(ev.gpus_per_engine)),
        max_new_tokens=max_new_tokens, limit=limit, judge_max_new_tokens=judge_max_new_tokens,
    )
    if workers < 0:
        raise ConfigError("--workers must be 0 (in this process) or a positive number of actors")
    if workers == 0:
        return run_in_process(models, benchmarks=benchmarks, languages=languages, judge=judge, out_uri=out_uri,
                              run_id=run_id, settings=settings, show_progress=show_progress)
    return _run_on_ray(models, benchmarks=benchmarks, languages=languages, judge=judge, workers=workers,
                       out_uri=out_uri, run_id=run_id, config=config, settings=settings,
                       show_progress=show_progress)


def _actor_gpus(config, settings: RunSettings) -> float:
    from cluster.runtime import resolve_gpus

    if settings.device == "cpu":
        return 0.0
    gpus = resolve_gpus(config.eval.gpus_per_engine)
    if settings.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs; use --device cpu or auto")
    return gpus


def _run_on_ray(models, *, benchmarks, languages, judge, workers, out_uri, run_id, config, settings,
                show_progress) -> EvalOutcome:
    import ray

    from cluster.runtime import ensure_ray

    models, judge, out_uri = absolute_run_args(models, judge, out_uri)
    run_id, cells = prepare_run(models, benchmarks=benchmarks, languages=languages, out_uri=out_uri, run_id=run_id)
    store = Store(out_uri)
    ensure_ray(config)
    gpus = _actor_gpus(config, settings)
    total_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus > total_gpus:
        raise ConfigError(f"each eval actor asks for {gpus:g} GPU(s) but the cluster has {total_gpus:g}; "
                          "lower eval.gpus_per_engine in ray_config.yaml")
    settings = RunSettings(**{**settings.__dict__, "gpus_per_engine": max(1, int(gpus))})
    options = dict(num_cpus=config.eval.cpus_per_engine, num_gpus=gpus, max_restarts=0)

    todo = cells_to_generate(out_uri, cells)
    todo_set = set(todo)
    results = [CellResult.of(c, SKIPPED, GENERATE) for c in cells if c not in todo_set]
    jobs = [(m, uri, [c for c in todo if c.model == m]) for m, uri in models.items()]
    jobs = [j for j in jobs if j[2]]
    langs = languages_in_play(cells)
    loads: dict[str, int] = {}
    if jobs:
        actor_cls = ray.remote(EvalWorker)
        progress = Progress(len(todo), "eval", show_progress)

        def make(n: int):
            return actor_cls.options(name=actor_name("eval", run_id, n), **options).remote(
                out_uri, run_id, settings, langs, judge is not None)

        got, counts = _run_pool(make, jobs, workers, stage=GENERATE, store=store, run_id=run_id, progress=progress)
        progress.close()
        results += got
        loads = _sum_loads(counts)
    if judge is not None:
        pending = cells_to_judge(out_uri, cells)
        if pending:
            judge_cls = ray.remote(JudgeWorker)
            progress = Progress(len(pending), "judge", show_progress)
            size = max(1, min(config.eval.judge_workers, len(pending)))
            got, counts = _run_pool(
                lambda n: judge_cls.options(name=actor_name("judge", run_id, n), **options).remote(
                    judge, out_uri, run_id, settings),
                [(None, None, [c]) for c in pending], size, stage=JUDGE, store=store, run_id=run_id,
                progress=progress,
            )
            progress.close()
            results += got
            for uri, n in _sum_loads(counts).items():
                loads[uri] = loads.get(uri, 0) + n
    summary = summarize(out_uri, run_id)
    write_summary(out_uri, summary)
    return EvalOutcome(run_id=run_id, out_uri=out_uri, summary=summary, results=results, loads=loads,
                       cells=len(cells))
