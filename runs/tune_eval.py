"""Evaluating a search's models on one half of the split: trials and grid points in-engine (their
merged tensors swapped into engines loaded once from the CP model, cluster/tune_pool.py), the CP
and chat baselines as plain models. Every cell goes through ``run_pipeline`` into the run's
results folder, with the merge fingerprint as the model identity of a swapped-in point, so a
rerun reuses every finished cell."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from chatvec.eval.runner import LocalCellExecutor
from chatvec.runs.tune_plan import TunePlan

logger = logging.getLogger(__name__)

Metrics = dict[str, float | None]  # "metric/benchmark/language" -> value


@dataclass
class Evaluated:
    metrics: dict[str, Metrics] = field(default_factory=dict)  # model -> its values
    failed: dict[str, str] = field(default_factory=dict)  # model -> the first error


class Evaluator:
    """One per search: holds the trial executor (and its engines) from the first call to ``close``."""

    def __init__(self, plan: TunePlan, *, config, workers: int) -> None:
        from chatvec.cluster.tune_pool import InProcessTrials, RayTrials
        from chatvec.core.units import parse_size
        from chatvec.eval.contracts import RunSettings

        tune, ev = plan.tune, config.eval
        self.plan, self.config, self.workers = plan, config, workers
        engine = tune.engine or ev.engine
        self.settings = RunSettings(
            engine=engine,
            device=tune.device if tune.device != "auto" else ev.device,
            batch_size=tune.eval.batch_size or ev.batch_size,
            gpus_per_engine=1 if ev.gpus_per_engine == "auto" else max(1, int(ev.gpus_per_engine)),
            max_new_tokens=tune.eval.max_new_tokens,
            engine_options=ev.engine_options(engine),
            judge_max_new_tokens=tune.judge_max_tokens or ev.judge_max_new_tokens,
        )
        self.shard_size = parse_size(tune.shard_size or config.merge.shard_size)
        self.points: dict = {}
        self.trials = InProcessTrials(self.points) if workers == 0 else RayTrials(workers, config, self.points)

    def point(self, name: str, recipe):
        """The in-engine point of ``recipe`` (its plan validated against the checkpoints)."""
        from chatvec.cluster.in_engine import Point
        from chatvec.cluster.weight_swap import swappable
        from chatvec.core.errors import ConfigError
        from chatvec.merge.plan import build_plan

        plan = build_plan(recipe, shard_size=self.shard_size)
        why = swappable(plan)
        if why:
            raise ConfigError(f"a search runs in-engine, but {name}: {why}; set chat_tokens_from_chat: false")
        return Point(name, recipe.cp, plan)

    def _run(self, models: dict[str, str], part: str, executor, identities=None) -> Evaluated:
        from chatvec.eval.pipeline import run_pipeline

        p = self.plan
        outcome = run_pipeline(
            models,
            benchmarks=p.dev_specs if part == "dev" else p.test_specs,
            languages=p.languages,
            judge=p.tune.judge,
            out_uri=p.results_uri,
            run_id=p.run_id,
            settings=self.settings,
            executor=executor,
            show_progress=False,
            model_identities=identities,
        )
        got = Evaluated()
        suffix = f".{part}"
        for row in outcome.summary.to_pylist():
            if row["model"] in models and row["benchmark"].endswith(suffix):
                bench = row["benchmark"][: -len(suffix)]
                got.metrics.setdefault(row["model"], {})[f"{row['metric']}/{bench}/{row['language']}"] = row["value"]
        for r in outcome.failed:
            got.failed.setdefault(r.model, r.error or "failed")
        return got

    def points_on(self, points: dict, part: str) -> Evaluated:
        """Merge points ({name: Point}) on ``part``, in-engine."""
        self.points.update(points)
        return self._run(
            {n: pt.cp for n, pt in points.items()}, part, self.trials, {n: pt.identity for n, pt in points.items()}
        )

    def baselines_on(self, part: str) -> Evaluated:
        if not self.plan.baselines:
            return Evaluated()
        executor = LocalCellExecutor()
        if self.workers:
            from chatvec.cluster.eval_driver import RayExecutor

            executor = RayExecutor(self.workers, self.config)
        return self._run(dict(self.plan.baselines), part, executor)

    def close(self) -> None:
        self.trials.close()
