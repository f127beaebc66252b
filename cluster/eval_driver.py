"""The evaluation on Ray: ``RayExecutor`` maps the cells of ``chatvec.eval.pipeline.run_pipeline`` to actors.

The phases and what a cell does live in ``eval/`` (``chatvec.eval.pipeline``, ``chatvec.eval.runner``); this
module only schedules: eval actors over models, then judge actors over cells.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatvec.core.errors import ConfigError
from chatvec.core.storage import Store
from chatvec.eval.pipeline import (
    FAILED,
    GENERATE,
    JUDGE,
    CellResult,
    EvalOutcome,
    ModelJob,
    Progress,
    RunContext,
    RunSettings,
    run_pipeline,
)
from chatvec.eval.results import Cell, write_status

logger = logging.getLogger(__name__)


# -- the actors (plain classes; wrapped with ray.remote when Ray is in use) -------------------------
class EvalWorker:
    """Holds one ModelEvaluator at a time."""

    def __init__(self, run: RunContext):
        self.run_context = run
        self.store = Store(run.out_uri)  # one per actor process
        self.evaluator = None

    def prepare(self, job: ModelJob) -> dict:
        """Load the job's model, dropping the previous one. A load error is kept for its cells to report."""
        from chatvec.eval.engines import LOAD_COUNTS
        from chatvec.eval.runner import ModelEvaluator

        if self.evaluator is not None:
            self.evaluator.close()
        self.evaluator = ModelEvaluator(
            job.model, job.uri, run=self.run_context, store=self.store, identity=job.identity
        )
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
    def __init__(self, judge: str, run: RunContext):
        from chatvec.eval.runner import JudgeRunner

        self.runner = JudgeRunner(judge, run=run, store=Store(run.out_uri))

    def prepare(self, _job: Any) -> dict:
        from chatvec.eval.engines import LOAD_COUNTS

        try:
            self.runner.ensure_loaded()
        except Exception:  # each cell reports it
            pass
        return {"pid": os.getpid(), "loads": dict(LOAD_COUNTS), "error": self.runner.load_error}

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


def _run_pool(
    make_actor: Callable[[int], Any],
    jobs: list[tuple[Any, list[Cell]]],
    size: int,
    *,
    stage: str,
    store: Store,
    run_id: str,
    progress: Progress,
) -> tuple[list[CellResult], dict]:
    """Run ``jobs`` = [(what to prepare, cells)] on ``size`` actors; every job's cells go to one
    actor after one ``prepare(what)``. Returns the cell results and each actor's last load counts."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from chatvec.cluster.liveness import wait_one

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
        what, cells = queue.popleft()
        slot.job = (what, cells)
        inflight[slot.actor.prepare.remote(what)] = (i, None)
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
                queue.appendleft((slot.job[0], rest))
        assign(i)

    for i in range(len(slots)):
        assign(i)
    while inflight:
        ready = wait_one(list(inflight), what=f"{stage} phase")  # raises, not hangs, when the cluster died
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


# -- the executor ----------------------------------------------------------------------------------
class RayExecutor:
    """Cells on Ray actors: ``workers`` eval actors over the models (one model per actor at a
    time, loaded once), then ``eval.judge_workers`` judge actors over the cells to judge."""

    def __init__(self, workers: int, config) -> None:
        self.workers = workers
        self.config = config
        self.options: dict = {}

    def start(self, settings: RunSettings) -> RunSettings:
        import ray

        from chatvec.cluster.runtime import ensure_ray

        ensure_ray(self.config)
        gpus = _actor_gpus(self.config, settings)
        total_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if gpus > total_gpus:
            raise ConfigError(
                f"each eval actor asks for {gpus:g} GPU(s) but the cluster has {total_gpus:g}; "
                "lower eval.gpus_per_engine in ray_config.yaml"
            )
        self.options = dict(num_cpus=self.config.eval.cpus_per_engine, num_gpus=gpus, max_restarts=0)
        return RunSettings(**{**settings.__dict__, "gpus_per_engine": max(1, int(gpus))})

    def generate(
        self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]:
        import ray

        actor_cls = ray.remote(EvalWorker)

        def make(n: int):
            return actor_cls.options(name=actor_name("eval", run.run_id, n), **self.options).remote(run)

        got, counts = _run_pool(
            make,
            [(job, list(job.cells)) for job in jobs],
            self.workers,
            stage=GENERATE,
            store=Store(run.out_uri),
            run_id=run.run_id,
            progress=progress,
        )
        return got, _sum_loads(counts)

    def judge(
        self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]:
        import ray

        judge_cls = ray.remote(JudgeWorker)
        size = max(1, min(self.config.eval.judge_workers, len(cells)))
        got, counts = _run_pool(
            lambda n: judge_cls.options(name=actor_name("judge", run.run_id, n), **self.options).remote(judge, run),
            [(None, [c]) for c in cells],
            size,
            stage=JUDGE,
            store=Store(run.out_uri),
            run_id=run.run_id,
            progress=progress,
        )
        return got, _sum_loads(counts)


# -- the entry point ------------------------------------------------------------------------------
def run_eval(
    models: Mapping[str, str],
    *,
    benchmarks=None,
    languages=None,
    engine: str | None = None,
    judge: str | None = None,
    workers: int | None = None,
    out_uri: str,
    run_id: str | None = None,
    config=None,
    device: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    dtype: str = "auto",
    judge_max_new_tokens: int | None = None,
    show_progress: bool = True,
    toxicity: str | None = None,
) -> EvalOutcome:
    """Evaluate ``models`` ({name: uri}) on benchmarks x languages into ``out_uri``.

    ``engine``, ``workers``, ``device`` and ``batch_size`` default to the config's ``eval``
    section (``config``: a ChatvecConfig; None loads ray_config.yaml or the defaults). ``workers``
    0 runs in this process without Ray; N >= 1 runs N eval actors on Ray. ``max_new_tokens`` caps
    every benchmark's generation length and the judge's (``judge_max_new_tokens``), ``limit`` the
    items per cell (quick runs). ``toxicity`` names the toxicity scorer (``perspective``,
    ``hf:MODEL``) for toxicity benchmarks. Finished cells already in ``out_uri`` are kept unless their inputs
    changed; the returned outcome lists every cell's result and the cells redone, with why.
    """
    from chatvec.core.config import load_config

    config = config if config is not None else load_config(None)
    eval_config = config.eval
    workers = eval_config.workers if workers is None else workers
    device = device or eval_config.device
    engine = engine or eval_config.engine
    settings = RunSettings(
        engine=engine,
        device=device,
        dtype=dtype,
        batch_size=batch_size or eval_config.batch_size,
        gpus_per_engine=1 if eval_config.gpus_per_engine == "auto" else max(1, int(eval_config.gpus_per_engine)),
        max_new_tokens=max_new_tokens,
        limit=limit,
        judge_max_new_tokens=judge_max_new_tokens or eval_config.judge_max_new_tokens,
        engine_options=eval_config.engine_options(engine),
    )
    if workers < 0:
        raise ConfigError("--workers must be 0 (in this process) or a positive number of actors")
    # the one place where 0 workers means "in this process, without Ray"
    executor = None if workers == 0 else RayExecutor(workers, config)
    return run_pipeline(
        models,
        benchmarks=benchmarks,
        languages=languages,
        judge=judge,
        out_uri=out_uri,
        run_id=run_id,
        settings=settings,
        executor=executor,
        show_progress=show_progress,
        toxicity=toxicity,
    )


def _actor_gpus(config, settings: RunSettings) -> float:
    from chatvec.cluster.runtime import resolve_gpus

    if settings.device == "cpu":
        return 0.0
    gpus = resolve_gpus(config.eval.gpus_per_engine)
    if settings.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs; use --device cpu or auto")
    return gpus
