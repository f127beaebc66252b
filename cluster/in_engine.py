"""In-engine ratio sweeps: each merge point's weights swapped into an engine loaded from its CP model.

``chatvec sweep FILE --in-engine`` (or ``in_engine: true``) evaluates every merge point whose
tensors keep the CP model's shapes without writing a checkpoint: per target an engine loads the
CP model once; per point the merged tensors are computed in memory with the merge kernels (the
bytes ``chatvec merge`` writes, cluster/weight_swap.py) and swapped in, then the point's cells
run. The CP model and the vectors are read once per engine and held in memory where
``eval.in_engine_memory`` allows; a point that does not fit is read from storage again, and the
run's output says so. Cells carry the point's model name and, as model identity, the merge fingerprint a
committed checkpoint of that point records, so the two paths give the same cells and
``chatvec merge`` of any point reproduces it. A point whose vocabulary grows (tokens appended
from the chat model) cannot be swapped in place: it is merged and evaluated the checkpoint way,
and the run says so.

The cells run through ``chatvec.eval.pipeline.run_pipeline`` with an executor of this module: in this
process (``workers: 0``) or on Ray eval actors, which pull points from a queue as they do
models; an actor keeps its engine while the next point has the same CP model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatvec.cluster.weight_swap import EXTENSION, Swapper, fingerprint_identity, resident_budget, swappable
from chatvec.core.errors import InputError
from chatvec.core.storage import Store
from chatvec.eval.contracts import Cell, CellResult, ModelJob, Progress, RunContext, RunSettings

logger = logging.getLogger(__name__)


@dataclass
class Point:
    """One merge point to swap in: its model name, its CP model and its merge plan."""

    name: str
    cp: str
    plan: Any  # chatvec.merge.plan.MergePlan

    @property
    def identity(self) -> str:
        return fingerprint_identity(self.plan)


@dataclass
class Timings:
    """Where the time of an in-engine evaluation went (seconds, summed)."""

    engine_start: float = 0.0
    swap: float = 0.0
    cells: float = 0.0
    starts: int = 0
    swaps: int = 0
    resident: int = 0  # swaps computed from inputs held in memory
    load: float = 0.0  # reading those inputs into memory
    streamed: list = field(default_factory=list)  # "point: why" of swaps read from storage

    def add(self, other: Timings | dict) -> None:
        other = other if isinstance(other, dict) else other.__dict__
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


def split_points(merges: Sequence, echo=print) -> tuple[list, list]:
    """(points swapped in place, points that go the checkpoint way), saying why for the latter."""
    inside, outside = [], []
    for merge_point in merges:
        why = swappable(merge_point.plan)
        if why:
            echo(f"  {merge_point.name}: {why}; merged to a checkpoint and evaluated from it instead of in-engine")
            outside.append(merge_point)
        else:
            inside.append(merge_point)
    return inside, outside


def check_in_engine(engine: str, cps: Sequence[str], device: str) -> None:
    """Stop before any model loads when the in-engine path cannot run at all."""
    from chatvec.eval.engines import engine_class

    engine_class(engine)
    if engine == "vllm":
        from chatvec.eval.engines.vllm import _MISSING, check_cpu_model, resolve_vllm_device

        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise InputError("--in-engine with engine vllm: " + _MISSING) from exc
        if resolve_vllm_device(device) == "cpu":
            import transformers

            for cp in cps:
                if os.path.isdir(cp):  # remote CP models are checked when their engine loads
                    check_cpu_model(cp, transformers.AutoConfig.from_pretrained(cp, trust_remote_code=False))


# -- one engine, many points ----------------------------------------------------------------------
class PointEngine:
    """An engine loaded from one CP model, taking one merge point after another."""

    def __init__(self, settings: RunSettings, budget: int | None = None) -> None:
        self.settings = settings
        self.budget = budget  # bytes for resident inputs (cluster/weight_swap.py:Swapper)
        self.swapper: Swapper | None = None
        self.engine = None
        self.cp: str | None = None
        self.point: str | None = None
        self.timings = Timings()
        self.loads: Counter = Counter()  # CP URI -> engine loads

    def ensure(self, cp: str) -> None:
        """An engine loaded from ``cp`` (the one held, when it is that CP's)."""
        from chatvec.eval.engines import load_engine_for

        if self.engine is not None and self.cp != cp:
            self.close()
        if self.engine is None:
            start = time.perf_counter()
            extra = {"worker_extension": EXTENSION} if self.settings.engine == "vllm" else {}
            self.engine = load_engine_for(self.settings, cp, **extra)
            self.swapper = Swapper(self.engine, self.budget)
            self.cp = cp
            self.loads[cp] += 1
            self.timings.engine_start += time.perf_counter() - start
            self.timings.starts += 1

    def take(self, point: Point) -> None:
        """Make ``point`` the engine's weights (loading its CP model first when needed)."""
        self.ensure(point.cp)
        self.point = None
        timing = self.swapper.load_point(point.plan)
        self.point = point.name
        self.timings.swap += timing.seconds
        self.timings.swaps += 1
        self.timings.resident += int(timing.resident)
        self.timings.load += timing.load_seconds
        if not timing.resident:
            self.timings.streamed.append(f"{point.name}: {timing.why}")
        logger.info(
            "swapped %s into the %s engine of %s in %.2f s (%d tensors, %s)",
            point.name,
            self.settings.engine,
            point.cp,
            timing.seconds,
            timing.tensors,
            "from memory" if timing.resident else "streamed from storage",
        )

    def evaluator(self, run: RunContext, job: ModelJob, store: Store, point: Point):
        """A ModelEvaluator for ``job`` on this engine; a load or swap failure fails its cells."""
        from chatvec.eval.runner import ModelEvaluator

        try:
            self.take(point)
        except Exception as exc:  # recorded per cell, as a model that does not load
            logger.error("in-engine point %s failed: %s", point.name, exc)
            self.point = None
            error = exc

            def fail():
                raise error

            return ModelEvaluator(job.model, job.uri, run=run, store=store, identity=job.identity, engine_factory=fail)
        return ModelEvaluator(job.model, job.uri, run=run, store=store, identity=job.identity, engine=self.engine)

    def close(self) -> None:
        if self.swapper is not None:
            self.swapper.close()
        if self.engine is not None:
            self.engine.close()
        self.engine, self.cp, self.point, self.swapper = None, None, None, None


def _timed_run(evaluator, cells, on_result, timings: Timings) -> list[CellResult]:
    start = time.perf_counter()
    try:
        return evaluator.run_all(cells, on_result=on_result)
    finally:
        timings.cells += time.perf_counter() - start


class InEngineExecutor:
    """chatvec.eval.pipeline's CellExecutor for merge points, in this process. Judging is the usual one."""

    def __init__(self, points: dict[str, Point], store: Store | None = None, budget: int | None = None) -> None:
        self.points = points
        self.store = store
        self.budget = budget
        self.timings = Timings()

    def start(self, settings: RunSettings) -> RunSettings:
        return settings

    def generate(
        self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]:
        store = self.store or Store(run.out_uri)
        holder = PointEngine(run.settings, self.budget)
        results: list[CellResult] = []
        try:
            for job in _by_cp(jobs, self.points):
                evaluator = holder.evaluator(run, job, store, self.points[job.model])
                try:
                    results += _timed_run(evaluator, job.cells, progress.update, holder.timings)
                finally:
                    evaluator.close()  # leaves a borrowed engine open
        finally:
            holder.close()
            self.timings.add(holder.timings)
        return results, dict(holder.loads)

    def judge(self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress):
        from chatvec.eval.runner import LocalCellExecutor

        return LocalCellExecutor(self.store).judge(run, judge, cells, progress)


def _by_cp(jobs: Sequence[ModelJob], points: dict[str, Point]) -> list[ModelJob]:
    """Jobs of one CP model next to each other, so each engine loads its CP once."""
    order = {cp: i for i, cp in enumerate(dict.fromkeys(points[j.model].cp for j in jobs))}
    return sorted(jobs, key=lambda j: order[points[j.model].cp])


# -- on Ray ---------------------------------------------------------------------------------------
@dataclass
class TargetJob:
    """The points of one CP model: one actor loads the CP once and runs them all, point by point."""

    cp: str
    jobs: dict[str, ModelJob]  # point name -> its cells, in the order they run

    @property
    def cells(self) -> list[Cell]:
        return [c for job in self.jobs.values() for c in job.cells]


def target_jobs(jobs: Sequence[ModelJob], points: dict[str, Point]) -> list[TargetJob]:
    out: dict[str, TargetJob] = {}
    for job in _by_cp(jobs, points):
        out.setdefault(points[job.model].cp, TargetJob(points[job.model].cp, {})).jobs[job.model] = job
    return list(out.values())


class InEngineWorker:
    """A Ray eval actor holding a PointEngine for one CP model; each cell runs on its point's
    weights, swapped in when the cell's point differs from the one in the engine."""

    def __init__(self, run: RunContext, points: dict[str, Point], budget: int | None = None) -> None:
        self.run_context = run
        self.points = points
        self.store = Store(run.out_uri)
        self.holder = PointEngine(run.settings, budget)
        self.job: TargetJob | None = None
        self.evaluator = None
        self.current: str | None = None

    def prepare(self, job: TargetJob) -> dict:
        """Load the target's CP model (kept when it is the one held). A load error is kept: each
        cell then fails with it, as the cells of a model that does not load."""
        self.job, self.current = job, None
        error = None
        before = Counter(self.holder.loads)
        try:
            self.holder.ensure(job.cp)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        return {"pid": os.getpid(), "loads": dict(self.holder.loads - before), "error": error}

    def run(self, cell: Cell) -> CellResult:
        if cell.model != self.current:
            if self.evaluator is not None:
                self.evaluator.close()
            self.evaluator = self.holder.evaluator(
                self.run_context, self.job.jobs[cell.model], self.store, self.points[cell.model]
            )
            self.current = cell.model
        start = time.perf_counter()
        try:
            return self.evaluator.run_cell(cell)
        finally:
            self.holder.timings.cells += time.perf_counter() - start

    def close(self) -> None:
        self.holder.close()


class RayInEngineExecutor:
    """Merge points on Ray eval actors, one CP model (target) per actor at a time; the judge
    phase is the RayExecutor's. A dead actor is handled as for models: the cell it ran fails,
    the rest of its target goes back to the queue for a fresh actor."""

    def __init__(self, workers: int, config, points: dict[str, Point], budget: int | None = None) -> None:
        from chatvec.cluster.eval_driver import RayExecutor

        self.base = RayExecutor(workers, config)
        self.points = points
        self.budget = budget
        self.timings = Timings()

    def start(self, settings: RunSettings) -> RunSettings:
        return self.base.start(settings)

    def generate(self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress):
        import ray

        from chatvec.cluster.eval_driver import Seat, _sum_loads, actor_name, run_pool

        actor_cls = ray.remote(InEngineWorker)

        def make(n: int):
            return actor_cls.options(name=actor_name("in-engine", run.run_id, n), **self.base.options).remote(
                run, self.points, self.budget
            )

        work = [Seat(t, deque(t.cells)) for t in target_jobs(jobs, self.points)]
        got, counts = run_pool(
            make,
            work,
            self.base.workers,
            stage="generate",
            store=Store(run.out_uri),
            run_id=run.run_id,
            progress=progress,
        )
        return got, _sum_loads(counts)

    def judge(self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress):
        return self.base.judge(run, judge, cells, progress)


# -- a sweep's in-engine part ---------------------------------------------------------------------
@dataclass
class InEngineRun:
    """What the sweep evaluates in-engine: points by name, and the time it took."""

    points: dict[str, Point] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    echo: Any = field(default=print, repr=False)

    @classmethod
    def plan(cls, sweep_plan, sweep, *, engine: str, echo=print) -> tuple[InEngineRun, list]:
        """Split the sweep's merges; returns (the in-engine run, the merges to write as checkpoints)."""
        targets = {t.key: t.cp for t in sweep.targets}
        inside, outside = split_points(sweep_plan.merges, echo)
        check_in_engine(engine, sorted({targets[m.target] for m in inside}), sweep.device)
        run = cls({m.name: Point(m.name, targets[m.target], m.plan) for m in inside}, echo=echo)
        if inside:
            echo(
                f"in-engine: {len(inside)} merge point(s) swapped into engines loaded from "
                f"{len({targets[m.target] for m in inside})} CP model(s); no checkpoint written for them"
            )
        return run, outside

    def evaluate(
        self,
        models: dict[str, str],
        *,
        benchmarks,
        languages,
        engine: str,
        judge,
        workers: int,
        out_uri: str,
        run_id: str,
        config,
        device,
        batch_size,
        max_new_tokens,
        limit,
        judge_max_new_tokens=None,
        toxicity=None,
    ):
        """The in-engine models of one evaluation group (the others go through run_eval as usual)."""
        from chatvec.cluster.eval_driver import run_settings
        from chatvec.eval.pipeline import run_pipeline

        settings = run_settings(
            config,
            engine=engine,
            device=device,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            limit=limit,
            judge_max_new_tokens=judge_max_new_tokens,
        )
        points = {name: self.points[name] for name in models}
        budget = resident_budget(config.eval.in_engine_memory)
        if workers == 0:
            executor = InEngineExecutor(points, budget=budget)
        else:
            executor = RayInEngineExecutor(workers, config, points, budget)
        outcome = run_pipeline(
            models,
            benchmarks=benchmarks,
            languages=languages,
            judge=judge,
            out_uri=out_uri,
            run_id=run_id,
            settings=settings,
            executor=executor,
            show_progress=False,
            model_identities={name: p.identity for name, p in points.items()},
            toxicity=toxicity,
        )
        self.timings.add(executor.timings)
        self._report(executor.timings)
        return outcome

    def _report(self, t: Timings) -> None:
        """How the swaps went, in the run's output (a streamed swap reads every input again)."""
        if not t.swaps:
            return
        self.echo(
            f"  in-engine swaps: {t.resident} of {t.swaps} from memory ({t.swap:.2f} s in all, "
            f"{t.load:.2f} s of it reading inputs into memory)"
        )
        for line in t.streamed:
            self.echo(f"  streamed from storage: {line}")
