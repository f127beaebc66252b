"""``chatvec tune``: a recipe search on the dev items, confirmed on held-out test items.

The sequence: plan (runs/tune_plan.py: checks, dev/test split written into the run's folder),
the baselines and the grid on dev, the search (runs/tune_study.py: ask a few trials, evaluate
them in-engine, tell), the finalists on test (runs/tune_final.py), the recipe files, the report
(runs/tune_report.py) and, with ``merge_best``, the winner committed to ``models/`` through the
normal merge path. Nothing is written under ``models/`` otherwise.

Under the run's results folder, ``tune/`` holds ``split.json`` and the split data, the journal
``trials.json``, every trial's recipe (``trials/<name>.yaml``) and the finalists' recipes
(``recipes/best.<name>.yaml``, ``recipes/top2.<name>.yaml``, ..., ``recipes/grid.<name>.yaml``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from chatvec.runs.tune_config import TuneFile
from chatvec.runs.tune_eval import Evaluator
from chatvec.runs.tune_final import RECIPES, TRIAL_RECIPES, Finalist, Verdict, verdict, write_recipe
from chatvec.runs.tune_plan import TunePlan, plan_tune
from chatvec.runs.tune_space import params_of, recipe_of
from chatvec.runs.tune_study import (
    ASKED,
    COMPLETE,
    FAILED,
    Journal,
    Pace,
    TrialRecord,
    best_line,
    make_study,
    metric_key,
    ranked,
    replay,
    tell_known,
    told_values,
    violations,
)

logger = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    run_id: str
    root: str
    results_uri: str
    report_uri: str
    trials: list[TrialRecord]
    finalists: list[Finalist]
    verdict: Verdict
    comparisons: list = field(default_factory=list)
    told_again: int = 0  # finished trials of an earlier run told to the study, not recomputed
    merged_uri: str | None = None
    timings: dict = field(default_factory=dict)


def _trial_name(fingerprint: str) -> str:
    return f"r-{fingerprint[:12]}"


class Search:
    """The ask/evaluate/tell loop over one study."""

    def __init__(self, plan: TunePlan, evaluator: Evaluator, baselines: dict, echo, grid_dev=None) -> None:
        self.plan, self.evaluator, self.baselines, self.echo = plan, evaluator, baselines, echo
        self.search = plan.tune.search
        self.directions = [o.direction for o in plan.objectives]
        self.keys = [metric_key(o) for o in plan.objectives + plan.constraints]
        self.journal = Journal(plan.tune_store)
        self.study, self.sampler = make_study(self.search, self.directions)
        self.penalize = self.sampler == "cmaes" and bool(plan.constraints)
        dists = plan.space.distributions()
        self.grid_told = 0
        for name, metrics in (grid_dev.metrics if grid_dev else {}).items():
            record = TrialRecord(-1, name, {}, "")
            if self._measured(record, metrics) and tell_known(
                self.study, params_of(plan.grid[name], plan.space), dists, record, self.directions, self.penalize
            ):
                self.grid_told += 1
        self.told_again = replay(self.study, self.journal, dists, self.directions, self.penalize)

    def _measured(self, record: TrialRecord, metrics: dict | None) -> bool:
        """Fill in ``record``'s dev values; False when an objective has no value."""
        values = [None if metrics is None else metrics.get(metric_key(o)) for o in self.plan.objectives]
        if any(v is None for v in values):
            return False
        record.metrics = {k: metrics.get(k) for k in self.keys}
        record.values = [float(v) for v in values]
        record.violations = violations(self.plan.constraints, metrics, self.baselines)
        record.state = COMPLETE
        return True

    def _ask(self, batch_so_far: list) -> tuple[object, TrialRecord, object]:
        trial = self.study.ask()
        params = self.plan.space.suggest(trial)
        recipe = recipe_of(params, self.plan.space, cp=self.plan.target.cp, tune=self.plan.tune)
        point = self.evaluator.point("trial", recipe)
        fp = point.plan.fingerprint()
        name = _trial_name(fp)
        point.name = name
        record = TrialRecord(
            number=len(self.journal.records) + len(batch_so_far), name=name, params=params, fingerprint=fp
        )
        header = [f"trial {record.number} of tune run {self.plan.run_id}: chatvec merge --recipe THIS_FILE --out DIR"]
        write_recipe(self.plan.tune_store, f"{TRIAL_RECIPES}/{name}.yaml", recipe, header)
        return trial, record, point

    def _finish(self, trial, record: TrialRecord, metrics: dict | None, error: str | None) -> None:
        if error or not self._measured(record, metrics):
            from optuna.trial import TrialState

            record.state, record.error = FAILED, error or "the objective has no value (no scored item)"
            self.study.tell(trial, state=TrialState.FAIL)
            return
        trial.set_user_attr("violations", record.violations)
        trial.set_user_attr("name", record.name)
        self.study.tell(trial, told_values(record, self.directions, self.penalize))

    def run(self) -> list[TrialRecord]:
        budget, pace = self.search.trials, Pace()
        if self.grid_told:
            self.echo(f"the study starts from the grid: {self.grid_told} grid point(s) told to it")
        if self.told_again:
            self.echo(f"resuming: {self.told_again} finished trial(s) told to the study again, not recomputed")
        while len(self.journal.finished) < budget:
            n = min(self.search.parallel, budget - len(self.journal.finished))
            batch: list = []
            for _ in range(n):
                batch.append(self._ask(batch))
            self.journal.records += [rec for _t, rec, _p in batch]
            self.journal.save()  # asked: a rerun asks these again first
            start = time.perf_counter()
            points = {rec.name: pt for _t, rec, pt in batch}
            got = self.evaluator.points_on(points, "dev")
            for _ in range(self.search.retries):
                again = {name: points[name] for name in got.failed}
                if not again:
                    break
                self.echo(f"  running {len(again)} trial(s) again, their cells failed: {', '.join(again)}")
                retry = self.evaluator.points_on(again, "dev")
                for name in again:
                    got.failed.pop(name, None)
                    got.metrics[name] = retry.metrics.get(name, {})
                    if name in retry.failed:
                        got.failed[name] = retry.failed[name]
            seconds = (time.perf_counter() - start) / len(batch)
            for trial, rec, _pt in batch:
                rec.seconds = seconds
                self._finish(trial, rec, got.metrics.get(rec.name), got.failed.get(rec.name))
                pace.done += 1
                self.journal.save()
                self.echo(self._line(rec, pace))
        return self.journal.records

    def _line(self, rec: TrialRecord, pace: Pace) -> str:
        done = len(self.journal.finished)
        if rec.state == FAILED:
            what = f"failed: {rec.error}"
        else:
            what = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.plan.objectives, rec.values))
            if not rec.feasible:
                what += " (infeasible)"
        best = best_line([r for r in self.journal.records if r.state != ASKED], self.directions)
        return f"trial {done}/{self.search.trials} {rec.name}: {what}; {best}; {pace.per_minute():.1f} trials/min"


def _best_grid(plan: TunePlan, got, baselines: dict) -> str | None:
    """The grid point with the best first objective on dev among those meeting the constraints."""
    first, sign = metric_key(plan.objectives[0]), 1 if plan.objectives[0].direction == "maximize" else -1
    scored = []
    for name in plan.grid:
        m = got.metrics.get(name, {})
        if m.get(first) is None or name in got.failed:
            continue
        if all(v <= 0 for v in violations(plan.constraints, m, baselines)):
            scored.append((sign * m[first], name))
    return max(scored)[1] if scored else None


def run_tune(
    tune: TuneFile,
    *,
    source: str,
    run_id: str,
    config,
    workers: int | None = None,
    merge_best: bool = False,
    echo=print,
) -> TuneOutcome:
    """Plan, search on dev, confirm on test, write recipes and the report. Rerunning a run id
    resumes it: finished trials and cells are kept."""
    from chatvec.eval import history
    from chatvec.runs.run_lock import RunLock

    root = tune.root or config.storage.root
    history.check_run_id(run_id)
    workers = config.eval.workers if workers is None else workers
    plan = plan_tune(tune, source=source, run_id=run_id, root=root)
    with RunLock(root, run_id, kind="tune"):
        return _run(plan, config=config, workers=workers, merge_best=merge_best, echo=echo)


def _run(plan: TunePlan, *, config, workers: int, merge_best: bool, echo) -> TuneOutcome:
    from chatvec.eval import history
    from chatvec.runs.tune_report import write_tune_report

    s, store = plan.tune.search, plan.tune_store
    n_dev = sum(len(x.dev) for x in plan.splits)
    n_test = sum(len(x.test) for x in plan.splits)
    echo(
        f"tune {plan.tune.name}: target {plan.target.key}, {len(plan.space.distributions())} parameter(s), "
        f"{s.trials} trial(s), {n_dev} dev / {n_test} test item(s); run {plan.run_id} under {plan.root}"
    )
    info = run_info(plan, status="running")
    history.write_run_info(plan.root, plan.run_id, info)
    evaluator = Evaluator(plan, config=config, workers=workers)
    started = time.perf_counter()
    try:
        _probe(plan, evaluator)
        base_dev = evaluator.baselines_on("dev")
        baselines = {plan.roles[n]: m for n, m in base_dev.metrics.items()}
        grid_points = {n: evaluator.point(n, r) for n, r in plan.grid.items()}
        grid_best = None
        if grid_points:
            echo(f"the grid: {len(grid_points)} point(s) on dev")
            grid_dev = evaluator.points_on(grid_points, "dev")
            grid_best = _best_grid(plan, grid_dev, baselines)
            echo(f"  best grid point on dev: {grid_best}")
        search = Search(plan, evaluator, baselines, echo, grid_dev if grid_points else None)
        before, search_start = _spent(evaluator), time.perf_counter()
        records = search.run()
        ran = sum(r.state != ASKED for r in records) - search.told_again  # trials run by this process
        timings = _timings(evaluator, before, time.perf_counter() - search_start, ran)

        top = ranked(records, search.directions)[: s.top_k]
        finalists = [
            Finalist(r.name, "best" if i == 0 else f"top{i + 1}", dev=r.metrics, record=r) for i, r in enumerate(top)
        ]
        if grid_best:
            finalists.append(Finalist(grid_best, "grid", dev=grid_dev.metrics.get(grid_best, {})))
        finalists += [Finalist(n, plan.roles[n], dev=base_dev.metrics.get(n, {})) for n in plan.baselines]
        echo(f"test: {len(finalists)} finalist(s) on {n_test} held-out item(s)")
        for f in finalists:
            if f.record is not None:
                f.recipe = recipe_of(f.record.params, plan.space, cp=plan.target.cp, tune=plan.tune)
            elif f.role == "grid":
                f.recipe = plan.grid[f.name]
        points = {f.name: evaluator.point(f.name, f.recipe) for f in finalists if f.recipe is not None}
        tested = evaluator.points_on(points, "test")
        base_test = evaluator.baselines_on("test")
        for f in finalists:
            f.test = {**tested.metrics, **base_test.metrics}.get(f.name, {})
        timings["total_s"] = time.perf_counter() - started
    finally:
        evaluator.close()
    result, comparisons = verdict(plan, finalists)
    for f in finalists:
        if f.recipe is not None:
            rel = f"{RECIPES}/{f.role}.{f.name}.yaml"
            header = [f"{f.role} of tune run {plan.run_id} ({result.text if f.role == 'best' else 'a finalist'})"]
            f.recipe_uri = write_recipe(store, rel, f.recipe, header)
    echo(result.text)
    outcome = TuneOutcome(
        run_id=plan.run_id,
        root=plan.root,
        results_uri=plan.results_uri,
        report_uri="",
        trials=records,
        finalists=finalists,
        verdict=result,
        comparisons=comparisons,
        told_again=search.told_again,
        timings=timings,
    )
    winner = next((f for f in finalists if f.role == "best"), None)
    if merge_best and winner is not None:
        outcome.merged_uri = _merge_winner(plan, winner, config, workers, echo)
    outcome.report_uri = write_tune_report(plan, outcome, grid_dev.metrics if grid_points else {})
    history.write_run_info(
        plan.root, plan.run_id, run_info(plan, status="finished", outcome=outcome, started_at=info["started_at"])
    )
    return outcome


def _probe(plan: TunePlan, evaluator: Evaluator) -> None:
    """Plan one recipe per embedding policy and method of the space, so a space the checkpoints
    cannot take (vocabularies that differ under ``all``, say) stops before any model loads."""
    space, dists = plan.space, plan.space.distributions()
    for emb in space.embeddings:
        for method in space.methods:
            params = {k: v for k, v in (("embeddings", emb), ("method", method.method)) if k in dists}
            evaluator.point("probe", recipe_of(params, space, cp=plan.target.cp, tune=plan.tune))


def run_info(plan: TunePlan, *, status: str, outcome: TuneOutcome | None = None, started_at: str | None = None) -> dict:
    """The run's record (``sweep.json``, as sweeps write it), so ``chatvec results`` lists it."""
    from chatvec.runs.sweep_run import _now

    info = {
        "run_id": plan.run_id,
        "sweep": plan.tune.name,
        "kind": "tune",
        "status": status,
        "root": plan.root,
        "started_at": started_at or _now(),
        "models": [{"name": n, "role": r, "uri": plan.baselines[n]} for n, r in plan.roles.items()],
        "sweep_config": plan.tune.model_dump(mode="json"),
    }
    if outcome is not None:
        info.update(finished_at=_now(), verdict=outcome.verdict.text, winner=outcome.verdict.winner)
    return info


def _spent(evaluator: Evaluator) -> dict:
    trials = evaluator.trials
    return {**trials.timings.__dict__, "judge": trials.judge_seconds, "judge_loads": trials.judge_loads}


def _timings(evaluator: Evaluator, before: dict, seconds: float, trials: int) -> dict:
    """Where the search's time went (the grid and the test phase are not part of it)."""
    now = _spent(evaluator)
    d = {k: now[k] - before[k] for k in now if isinstance(now[k], (int, float))}
    return {
        "trials": trials,
        "search_s": seconds,
        "trials_per_min": trials / max(seconds / 60, 1e-9),
        "engine_start_s": d["engine_start"],
        "swap_s": d["swap"],
        "generate_s": d["cells"],
        "judge_s": d["judge"],
        "judge_loads": d["judge_loads"],
        "swaps": d["swaps"],
        "swaps_from_memory": d.get("resident", 0),
    }


def _merge_winner(plan: TunePlan, winner: Finalist, config, workers: int, echo) -> str:
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core import layout
    from chatvec.core.units import parse_size
    from chatvec.merge.plan import build_plan

    merge_plan = build_plan(winner.recipe, shard_size=parse_size(plan.tune.shard_size or config.merge.shard_size))
    out = layout.model_uri(plan.root, f"{plan.tune.name}.best-{merge_plan.fingerprint()[:12]}")
    merge_workers = 0 if workers == 0 else config.merge.workers
    summary = run_merge_job(
        merge_plan, out, workers=merge_workers, device=plan.tune.device, overwrite=False, config=config
    )
    echo(f"merged the winner to {out}" + (" (already committed)" if summary.cached else ""))
    return out
