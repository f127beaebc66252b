"""The evaluation on Ray: ``RayExecutor`` maps the cells of ``chatvec.eval.pipeline.run_pipeline`` to actors.

The phases and what a cell does live in ``eval/`` (``chatvec.eval.pipeline``, ``chatvec.eval.runner``); this
module only schedules: eval actors over models, then judge actors over cells.

Each eval actor holds one engine for one model and runs every cell of that model before it
takes the next model from the queue, so each model is loaded once per run. With ``replicas``
above one, up to that many actors load the same model and pull its cells, and chunks of its
large cells, from one shared queue as they finish (``chatvec.eval.chunks`` plans the chunks and
writes a chunked cell once, whole). Actors request
``gpus_per_engine`` GPUs each (vLLM's tensor-parallel size; none with ``--device cpu``). When
all models are done the eval actors are released and judge actors (``judge_workers``, one by
default) load the judge once each and fill in the judged metrics of every cell that waits.

Failures: an exception inside a cell is recorded by the actor (the cell's status says failed,
with the error) and the actor goes on. An actor that dies fails the cell it was running; the
units queued behind it go back to the front of the queue for a fresh actor (which loads that
model again).
``workers=0`` runs everything in this process without importing Ray.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatvec.core.errors import ConfigError
from chatvec.core.storage import Store
from chatvec.eval.chunks import Chunk, ChunkCollector, ChunkRows, plan_units
from chatvec.eval.contracts import (
    FAILED,
    GENERATE,
    JUDGE,
    Cell,
    CellResult,
    EvalOutcome,
    ModelJob,
    Progress,
    RunContext,
    RunSettings,
)
from chatvec.eval.pipeline import run_pipeline
from chatvec.eval.results import write_status
from chatvec.eval.runner import LocalCellExecutor

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
        # the loads this call made (the pool adds them up per actor)
        return {"pid": os.getpid(), "loads": dict(self.evaluator.loads), "error": self.evaluator.load_error}

    def run(self, unit: Cell | Chunk) -> CellResult | ChunkRows:
        if isinstance(unit, Chunk):
            return self.evaluator.run_chunk(unit)
        return self.evaluator.run_cell(unit)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


class JudgeWorker:
    """Holds one judge (loaded once); judges whole cells of the run it was last prepared for."""

    def __init__(self, judge: str, run: RunContext):
        from chatvec.eval.runner import JudgeRunner

        self.runner = JudgeRunner(judge, run=run, store=Store(run.out_uri))

    def prepare(self, run: RunContext) -> dict:
        """Judge for ``run`` (a kept actor serves later calls too), loading the judge the first time."""
        self.runner.use_run(run)
        before = Counter(self.runner.loads)
        try:
            self.runner.ensure_loaded()
        except Exception:  # each cell reports it
            pass
        return {"pid": os.getpid(), "loads": dict(self.runner.loads - before), "error": self.runner.load_error}

    def run(self, cell: Cell) -> CellResult:
        return self.runner.judge_cell(cell)

    def close(self) -> None:
        self.runner.close()


# -- a pool of actors pulling work from queues ---------------------------------------------------
# units submitted to an actor ahead of the one it runs, so it never waits on the driver between two
UNITS_AHEAD = 1


@dataclass
class Seat:
    """One engine's place on a job: what the actor prepares (loads) and the queue of units it pulls
    from. A model's replicas are seats that share one queue, so an engine that finishes early
    takes more of its model's units."""

    what: Any
    units: deque


@dataclass
class _Slot:
    actor: Any = None
    seat: Seat | None = None
    pending: list = field(default_factory=list)  # units submitted to the actor, not back yet
    stale: bool = False  # a kept actor from an earlier call that has not answered this call yet


class _Cells:
    """Outcomes of whole cells: each unit is a cell, its result is the cell's."""

    def __init__(self, store: Store, run_id: str, stage: str) -> None:
        self.store, self.run_id, self.stage = store, run_id, stage

    def skip(self, unit) -> bool:
        return False

    def done(self, unit, value) -> CellResult | None:
        return value

    def failed(self, unit, error: str) -> CellResult | None:
        logger.error("cell %s failed: %s", unit.key, error)
        write_status(self.store, unit, FAILED, stage=self.stage, error=error, run_id=self.run_id)
        return CellResult.of(unit, FAILED, self.stage, error=error)


class _Chunks(_Cells):
    """Outcomes of cells and of chunks of cells (replicas): a chunked cell's result comes with its
    last chunk, or with its first failure."""

    def __init__(self, store: Store, run_id: str) -> None:
        super().__init__(store, run_id, GENERATE)
        self.collector = ChunkCollector(store, run_id)

    def skip(self, unit) -> bool:
        return isinstance(unit, Chunk) and self.collector.has_failed(unit.cell)

    def done(self, unit, value) -> CellResult | None:
        return self.collector.add(value) if isinstance(unit, Chunk) else value

    def failed(self, unit, error: str) -> CellResult | None:
        return self.collector.fail(unit, error) if isinstance(unit, Chunk) else super().failed(unit, error)


def run_pool(
    make_actor: Callable[[int], Any],
    seats: list[Seat],
    size: int,
    *,
    stage: str,
    store: Store,
    run_id: str,
    progress: Progress,
    outcomes: _Cells | None = None,
    keep: list | None = None,
) -> tuple[list[CellResult], dict]:
    """Run the units of ``seats`` on ``size`` actors. An actor takes a seat, prepares its
    ``what`` (loads the model) once, and pulls the seat's units (cells, or chunks of cells) one
    after another, ``UNITS_AHEAD`` submitted ahead; when the seat's queue is empty it takes the
    next seat that still has work. Returns the cell results and each actor's engine loads.

    ``keep``: live actors from an earlier call, used before any is made; the pool hands its live
    actors back in this list instead of closing them (a caller that keeps a judge loaded). A kept
    actor found dead before it answers this call fails nothing: its units go to a fresh actor."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from chatvec.cluster.liveness import wait_one

    outcomes = outcomes or _Cells(store, run_id, stage)
    queue = deque(seats)
    slots = [_Slot() for _ in range(min(size, len(seats)))]
    inflight: dict[Any, tuple[int, Cell | Chunk | None]] = {}
    results: list[CellResult] = []
    load_counts: dict[str, dict] = {}
    made = [0]

    def feed(i: int, ahead: int = UNITS_AHEAD) -> None:
        slot = slots[i]
        while slot.seat is not None and slot.seat.units and len(slot.pending) <= ahead:
            unit = slot.seat.units.popleft()
            if outcomes.skip(unit):  # a chunk of a cell that has already failed
                continue
            inflight[slot.actor.run.remote(unit)] = (i, unit)
            slot.pending.append(unit)

    def take_seat(i: int, ahead: int = UNITS_AHEAD) -> None:
        slot = slots[i]
        slot.seat, slot.pending = None, []
        while queue:  # a seat with work left: the other replicas may have taken all of its units
            units = queue[0].units
            while units and outcomes.skip(units[0]):
                units.popleft()
            if units:
                break
            queue.popleft()
        if not queue:
            return
        if slot.actor is None and keep:
            slot.actor, slot.stale = keep.pop(), True
        if slot.actor is None:
            slot.actor = make_actor(made[0])
            made[0] += 1
        slot.seat = queue.popleft()
        inflight[slot.actor.prepare.remote(slot.seat.what)] = (i, None)
        feed(i, ahead)

    def actor_died(i: int, exc: BaseException) -> None:
        slot = slots[i]
        for ref in [r for r, (j, _u) in inflight.items() if j == i]:
            del inflight[ref]
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        slot.actor = None
        if slot.stale:  # a kept actor that died between calls: its units never ran, none fails
            logger.warning("a kept %s actor was found dead; a fresh one takes its work", stage)
            slot.seat.units.extendleft(reversed([u for u in slot.pending if not outcomes.skip(u)]))
            queue.appendleft(slot.seat)
        elif slot.pending:
            victim, rest = slot.pending[0], slot.pending[1:]
            error = f"the {stage} actor died: {type(exc).__name__}: {exc}"[:2000]
            result = outcomes.failed(victim, error)
            if result is not None:
                results.append(result)
                progress.update(result)
            # the units queued behind it go back to the front of their queue, for a fresh actor
            slot.seat.units.extendleft(reversed([u for u in rest if not outcomes.skip(u)]))
            queue.appendleft(slot.seat)
        slot.stale = False
        take_seat(i)

    try:
        for i in range(len(slots)):  # the first (largest) units one to each actor, then the ones ahead
            take_seat(i, ahead=0)
        for i in range(len(slots)):
            feed(i)
        while inflight:
            ready = wait_one(list(inflight), what=f"{stage} phase")  # raises, not hangs, when the cluster died
            ref = ready[0]
            if ref not in inflight:  # dropped when its actor died
                continue
            i, unit = inflight.pop(ref)
            slot = slots[i]
            try:
                value = ray.get(ref)
            except RayActorError as exc:
                actor_died(i, exc)
                continue
            except RayTaskError as exc:  # the method raised (the actor lives on): that unit failed
                slot.stale = False
                if unit is None:
                    continue  # a failed prepare: each of its units reports the error
                slot.pending.remove(unit)
                value = outcomes.failed(unit, f"{type(exc).__name__}: {exc}"[:2000])
            else:
                slot.stale = False
                if unit is None:  # what this prepare loaded, added to the actor's count
                    key = str(slot.actor)
                    load_counts[key] = dict(Counter(load_counts.get(key, {})) + Counter(value["loads"]))
                    continue
                slot.pending.remove(unit)
                value = outcomes.done(unit, value)
            if value is not None:
                results.append(value)
                progress.update(value)
            feed(i)
            if not slot.pending:
                take_seat(i)
    except BaseException:  # interrupted, or the cluster is gone: no actor outlives the call
        for slot in slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor)
                except Exception:  # already gone
                    pass
        raise
    live = [slot.actor for slot in slots if slot.actor is not None]
    if keep is not None:
        keep.extend(live)
    else:
        close_actors(live)
    return results, load_counts


def close_actors(actors: list) -> None:
    """Let each actor close its engine (a minute at most), kill it, and empty the list."""
    import ray

    for actor in actors:
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:
            pass
        ray.kill(actor)
    actors.clear()


def replica_seats(jobs: Sequence[ModelJob], replicas: int, settings: RunSettings) -> list[Seat]:
    """Each model's seats: one with all its cells, or (``replicas`` > 1) up to ``replicas`` that
    share the model's units, large cells cut into chunks of items (counted when the run was
    planned; a kind that reads no items counts none and is never cut)."""
    if replicas <= 1:
        return [Seat(job, deque(job.cells)) for job in jobs]
    seats = []
    for job in jobs:
        counts = {c: n for c, n in job.item_counts.items() if n}
        units = deque(plan_units(job.cells, counts, replicas, align=settings.batch_size))
        seats += [Seat(job, units) for _ in range(min(replicas, len(units)))]
    return seats


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

    def __init__(self, workers: int, config, replicas: int | str = 1) -> None:
        self.workers = workers
        self.config = config
        self.replicas = replicas  # engines per model: a number, or "auto" (the free slots)
        self.options: dict = {}
        self.made = itertools.count()  # actor numbers, unique over this executor's calls

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

        def make(_n: int):
            return actor_cls.options(name=actor_name("eval", run.run_id, next(self.made)), **self.options).remote(run)

        replicas = self.replicas_for(len(jobs))
        store = Store(run.out_uri)
        if replicas > 1:
            logger.info("up to %d engines per model (%d eval actors, %d models)", replicas, self.workers, len(jobs))
        got, counts = run_pool(
            make,
            replica_seats(jobs, replicas, run.settings),
            self.workers,
            stage=GENERATE,
            store=store,
            run_id=run.run_id,
            progress=progress,
            outcomes=_Chunks(store, run.run_id),
        )
        return got, _sum_loads(counts)

    def replicas_for(self, models: int) -> int:
        """Engines per model: ``auto`` shares the eval actors out over the models to evaluate."""
        if self.replicas == "auto":
            return max(1, self.workers // max(1, models))
        return max(1, min(int(self.replicas), self.workers))

    def judge(
        self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress, keep: list | None = None
    ) -> tuple[list[CellResult], dict[str, int]]:
        """``keep``: judge actors to reuse and hand back loaded (see ``run_pool``)."""
        import ray

        judge_cls = ray.remote(JudgeWorker)
        size = max(1, min(self.config.eval.judge_workers, len(cells)))
        queue = deque(cells)  # one queue: each judge actor loads the judge once and pulls cells
        got, counts = run_pool(
            lambda _n: judge_cls.options(name=actor_name("judge", run.run_id, next(self.made)), **self.options).remote(
                judge, run
            ),
            [Seat(run, queue) for _ in range(size)],
            size,
            stage=JUDGE,
            store=Store(run.out_uri),
            run_id=run.run_id,
            progress=progress,
            keep=keep,
        )
        return got, _sum_loads(counts)


def run_settings(
    config,
    *,
    engine: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    judge_max_new_tokens: int | None = None,
) -> RunSettings:
    """A run's settings from the config's ``eval`` section, each overridden where given: the one
    place that turns configuration into ``RunSettings`` (plain and in-engine runs alike)."""
    ev = config.eval
    engine = engine or ev.engine
    return RunSettings(
        engine=engine,
        device=device or ev.device,
        dtype=dtype,
        batch_size=batch_size or ev.batch_size,
        gpus_per_engine=1 if ev.gpus_per_engine == "auto" else max(1, int(ev.gpus_per_engine)),
        max_new_tokens=max_new_tokens,
        limit=limit,
        judge_max_new_tokens=judge_max_new_tokens or ev.judge_max_new_tokens,
        engine_options=ev.engine_options(engine),
    )


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
    replicas: int | str | None = None,
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
    workers = config.eval.workers if workers is None else workers
    settings = run_settings(
        config,
        engine=engine,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        judge_max_new_tokens=judge_max_new_tokens,
    )
    if workers < 0:
        raise ConfigError("--workers must be 0 (in this process) or a positive number of actors")
    # the one place where 0 workers means "in this process, without Ray"
    replicas = config.eval.replicas if replicas is None else replicas
    if replicas != "auto" and int(replicas) < 1:
        raise ConfigError("--replicas must be a positive number of engines per model, or auto")
    executor = LocalCellExecutor() if workers == 0 else RayExecutor(workers, config, replicas)
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
