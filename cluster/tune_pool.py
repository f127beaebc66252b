"""Where a search's trials run: engines that stay loaded for the whole search.

A search evaluates a few merge points at a time, over and over, all of one CP model. The
in-engine sweep's executors (cluster/in_engine.py) load an engine per evaluation call; these keep
theirs across calls, so each engine loads the CP model once per search and then only takes one
trial's merged tensors after another (``PointEngine``):

- ``InProcessTrials`` (``--workers 0``): one engine in this process;
- ``RayTrials`` (``--workers N``): N long-lived Ray eval actors, each with its own engine; a
  call's trials go to whichever actor is free. An actor that dies fails the cells of the trial
  it ran (the search runs that trial again) and is replaced by a fresh one.

Both are ``chatvec.eval.pipeline`` CellExecutors: ``run_pipeline`` plans and records the cells
as it does for any model, with the trial's merge fingerprint as model identity. Both keep a judge
model loaded from the first judged call to ``close`` (in this process, or on judge actors that
``run_pool`` hands back), so a search loads its judge once, not once per call.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Sequence

from chatvec.cluster.in_engine import Point, PointEngine, Timings, _timed_run
from chatvec.core.storage import Store
from chatvec.eval.contracts import FAILED, GENERATE, Cell, CellResult, ModelJob, Progress, RunContext, RunSettings
from chatvec.eval.results import write_status

logger = logging.getLogger(__name__)


class _Judging:
    """The judge phase's time and judge loads, summed."""

    judge_seconds: float = 0.0
    judge_loads: int = 0

    def _timed_judge(self, fn, *args):
        start = time.perf_counter()
        try:
            results, loads = fn(*args)
        finally:
            self.judge_seconds += time.perf_counter() - start
        self.judge_loads += sum(loads.values())
        return results, loads


class InProcessTrials(_Judging):
    """Trials in this process, on one engine loaded once. ``points`` grows as the search asks."""

    def __init__(self, points: dict[str, Point]) -> None:
        self.points = points
        self.holder: PointEngine | None = None
        self.judge_runner = None  # the judge, kept loaded from the first judged call to ``close``

    @property
    def timings(self) -> Timings:
        return self.holder.timings if self.holder else Timings()

    def start(self, settings: RunSettings) -> RunSettings:
        if self.holder is None:
            self.holder = PointEngine(settings)
        return settings

    def generate(self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress):
        store = Store(run.out_uri)
        results: list[CellResult] = []
        for job in jobs:
            evaluator = self.holder.evaluator(run, job, store, self.points[job.model])
            try:
                results += _timed_run(evaluator, job.cells, progress.update, self.holder.timings)
            finally:
                evaluator.close()  # leaves the borrowed engine open
        return results, {}

    def judge(self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress):
        return self._timed_judge(self._judge, run, judge, cells, progress)

    def _judge(self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress):
        from chatvec.eval.runner import JudgeRunner

        runner = self.judge_runner
        if runner is None or runner.spec != judge or runner.settings != run.settings or runner.load_error:
            if runner is not None:
                runner.close()
            runner = self.judge_runner = JudgeRunner(judge, run=run, store=Store(run.out_uri))
        runner.use_run(run)
        before = Counter(runner.loads)
        results = runner.run_all(cells, on_result=progress.update)
        return results, dict(runner.loads - before)

    def close(self) -> None:
        if self.judge_runner is not None:
            self.judge_runner.close()
            self.judge_runner = None
        if self.holder is not None:
            self.holder.close()


class TrialWorker:
    """A Ray eval actor with one engine for the whole search; runs one trial's cells per call."""

    def __init__(self, settings: RunSettings) -> None:
        self.holder = PointEngine(settings)

    def run_job(self, run: RunContext, job: ModelJob, point: Point) -> tuple[list[CellResult], dict]:
        store = Store(run.out_uri)
        before = {k: (list(v) if isinstance(v, list) else v) for k, v in self.holder.timings.__dict__.items()}
        evaluator = self.holder.evaluator(run, job, store, point)
        try:
            results = _timed_run(evaluator, job.cells, None, self.holder.timings)
        finally:
            evaluator.close()
        # numbers as differences; lists (the points streamed from storage) as what was added since
        spent = {
            k: v[len(before[k]) :] if isinstance(v, list) else v - before[k]
            for k, v in self.holder.timings.__dict__.items()
        }
        return results, {**spent, "pid": os.getpid()}

    def close(self) -> None:
        self.holder.close()


class RayTrials(_Judging):
    """Trials on ``workers`` long-lived Ray eval actors (started on the first call, kept until
    ``close``). Judging is the RayExecutor's, on judge actors kept loaded between calls."""

    def __init__(self, workers: int, config, points: dict[str, Point]) -> None:
        from chatvec.cluster.eval_driver import RayExecutor

        self.base = RayExecutor(workers, config)
        self.points = points
        self.actors: list = []
        self.made = 0
        self.settings: RunSettings | None = None
        self.timings = Timings()
        self.pids: set[int] = set()
        self.judges: list = []  # judge actors, kept loaded from the first judged call to ``close``
        self.judged_by: tuple | None = None  # (judge, settings) the kept judge actors hold

    def start(self, settings: RunSettings) -> RunSettings:
        if self.settings is None:
            self.settings = self.base.start(settings)
        return self.settings

    def _actor(self, run_id: str):
        import ray

        from chatvec.cluster.eval_driver import actor_name

        self.made += 1
        cls = ray.remote(TrialWorker)
        return cls.options(name=actor_name("tune", run_id, self.made), **self.base.options).remote(self.settings)

    def generate(self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from chatvec.cluster.liveness import wait_one

        store = Store(run.out_uri)
        while len(self.actors) < min(self.base.workers, len(jobs)):
            self.actors.append(self._actor(run.run_id))
        queue, idle = deque(jobs), list(range(len(self.actors)))
        inflight: dict = {}
        results: list[CellResult] = []

        def fail(job: ModelJob, error: str) -> None:
            for cell in job.cells:
                write_status(store, cell, FAILED, stage=GENERATE, error=error, run_id=run.run_id)
                result = CellResult.of(cell, FAILED, GENERATE, error=error)
                results.append(result)
                progress.update(result)

        while queue or inflight:
            while queue and idle:
                i, job = idle.pop(), queue.popleft()
                inflight[self.actors[i].run_job.remote(run, job, self.points[job.model])] = (i, job)
            ref = wait_one(list(inflight), what="tune trials")[0]
            i, job = inflight.pop(ref)
            try:
                got, spent = ray.get(ref)
            except RayActorError as exc:
                error = f"the eval actor died: {type(exc).__name__}: {exc}"[:2000]
                logger.error("trial %s: %s", job.model, error)
                fail(job, error)
                try:
                    ray.kill(self.actors[i])
                except Exception:  # already gone
                    pass
                self.actors[i] = self._actor(run.run_id)
            except RayTaskError as exc:
                fail(job, f"{type(exc).__name__}: {exc}"[:2000])
            else:
                self.pids.add(spent.pop("pid"))
                self.timings.add(spent)
                for result in got:
                    results.append(result)
                    progress.update(result)
            idle.append(i)
        return results, {}

    def judge(self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress):
        from chatvec.cluster.eval_driver import close_actors

        if self.judged_by != (judge, run.settings):  # another judge: the kept ones go
            close_actors(self.judges)
            self.judged_by = (judge, run.settings)
        return self._timed_judge(self.base.judge, run, judge, cells, progress, self.judges)

    def close(self) -> None:
        from chatvec.cluster.eval_driver import close_actors

        close_actors(self.actors)
        close_actors(self.judges)
