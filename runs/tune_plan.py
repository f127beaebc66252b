"""Planning a search: the target, its benchmarks, the objectives and constraints resolved, the
space, the dev/test split written, the grid's recipes, the baselines. Every problem a user can
fix is found here and reported at once, before any model loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from chatvec.core.errors import ChatvecError
from chatvec.core.storage import Store, join
from chatvec.runs.sweep import TargetDef, grid_points
from chatvec.runs.tune_config import (
    ConstraintDef,
    ObjectiveDef,
    TuneFile,
    has_grid,
    raise_problems,
)
from chatvec.runs.tune_space import Space, space_of
from chatvec.runs.tune_split import Split, make_splits, part_specs

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"  # inside the run's results folder


@dataclass
class TunePlan:
    tune: TuneFile
    target: TargetDef
    run_id: str
    root: str
    results_uri: str
    report_uri: str
    specs: list  # the target's benchmarks (BenchmarkSpec) in play
    languages: list[str]
    objectives: list[ObjectiveDef]  # benchmark, language and direction filled in
    constraints: list[ConstraintDef]
    space: Space
    splits: list[Split] = field(default_factory=list)
    dev_specs: list = field(default_factory=list)
    test_specs: list = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)  # model name -> Recipe
    baselines: dict[str, str] = field(default_factory=dict)  # model name -> URI
    roles: dict[str, str] = field(default_factory=dict)  # baseline name -> cp or chat

    @property
    def tune_uri(self) -> str:
        return join(self.results_uri, TUNE_DIR)

    @property
    def tune_store(self) -> Store:
        return Store(self.tune_uri)

    def baseline(self, role: str) -> str | None:
        return next((n for n, r in self.roles.items() if r == role), None)


def _pick_target(tune: TuneFile, problems: list[str]) -> TargetDef | None:
    s = tune.search
    if s.target is not None:
        found = [t for t in tune.targets if t.key == s.target]
        if not found:
            problems.append(
                f"search.target {s.target!r} is not a target (targets: {', '.join(t.key for t in tune.targets)})"
            )
        return found[0] if found else None
    if len(tune.targets) == 1:
        return tune.targets[0]
    wanted = {o.language for o in s.objectives if o.language}
    found = [t for t in tune.targets if t.language in wanted]
    if len(found) == 1:
        return found[0]
    problems.append(
        "the file has several targets: name the one whose recipe is searched with search.target "
        f"({', '.join(t.key for t in tune.targets)})"
    )
    return None


def _resolve(what: str, o: ObjectiveDef, target: TargetDef, specs: list, problems: list[str]) -> Any:
    """``o`` with its benchmark, language and direction filled in (None: a problem was noted)."""
    from chatvec.eval.history import lower_is_better
    from chatvec.eval.kinds import get_kind

    bench = o.benchmark
    if bench is None:
        if len(specs) != 1:
            problems.append(f"{what} {o.metric!r}: name its benchmark ({', '.join(s.name for s in specs)})")
            return None
        bench = specs[0].name
    spec = next((s for s in specs if s.name == bench), None)
    if spec is None:
        problems.append(
            f"{what} {o.metric!r} names benchmark {bench!r}, which target {target.key!r} does not run "
            f"(it runs {', '.join(s.name for s in specs)})"
        )
        return None
    language = o.language or target.language
    if language not in spec.languages:
        problems.append(
            f"{what} {o.metric!r}: benchmark {bench!r} has no data in {language} ({', '.join(spec.languages)})"
        )
        return None
    metrics = get_kind(spec.kind).metrics
    if metrics and o.metric not in metrics:  # kinds with open metric sets (lm-eval) declare none
        problems.append(
            f"{what} names metric {o.metric!r}, which benchmark {bench!r} ({spec.kind}) does not produce; "
            f"its metrics: {', '.join(metrics)}"
        )
        return None
    direction = o.direction or ("minimize" if lower_is_better(o.metric) else "maximize")
    return o.model_copy(update={"benchmark": bench, "language": language, "direction": direction})


def check_tune(tune: TuneFile, source: str) -> tuple[TargetDef, list, list, list, Space]:
    """(target, benchmark specs, objectives, constraints, space), or one ConfigError with every problem."""
    from chatvec.eval.benchmarks import resolve_benchmarks

    s = tune.search
    problems: list[str] = []
    target = _pick_target(tune, problems)
    if target is None:
        raise_problems(source, problems)
    try:
        specs = resolve_benchmarks(target.benchmarks)
    except ChatvecError as exc:
        raise_problems(source, problems + [f"target {target.key}: {exc}"])
    objectives = [_resolve("the objective", o, target, specs, problems) for o in s.objectives]
    constraints = [_resolve("constraint", c, target, specs, problems) for c in s.constraints]
    usable = target.vectors or list(tune.vectors)
    for name in s.space.ratios:
        if name not in usable:
            problems.append(
                f"search.space.ratios names vector {name!r}, which target {target.key!r} does not use ({', '.join(usable)})"
            )
    space = space_of(tune, target)
    if not space.vectors:
        problems.append(
            "the search space is empty: give each vector's ratio range under search.space.ratios, "
            f"e.g. {{{usable[0]}: [0.5, 2.0]}}"
        )
    elif not space.distributions():
        problems.append(
            "the search space is empty: every ratio range is a single value and there is one method and one "
            "embedding policy; give a range [low, high] or several choices"
        )
    sampler = s.sampler or ("nsga2" if len(s.objectives) > 1 else "tpe")
    if sampler == "cmaes":
        if len(s.objectives) > 1:
            problems.append("sampler cmaes searches one objective; use nsga2 for several")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append("sampler cmaes needs the `cmaes` package: pip install cmaes (or use tpe)")
    raise_problems(source, problems)
    return target, specs, objectives, constraints, space


def _grid(tune: TuneFile, target: TargetDef) -> dict[str, Any]:
    return {name: recipe for name, *_point, recipe in grid_points(tune, target)}


def plan_tune(tune: TuneFile, *, source: str, run_id: str, root: str) -> TunePlan:
    """Check the file, split the data (written into the run's folder) and name every model."""
    from chatvec.core import layout
    from chatvec.eval import history
    from chatvec.eval.items import load_items

    target, specs, objectives, constraints, space = check_tune(tune, source)
    named = {(o.benchmark, o.language) for o in objectives + constraints}
    languages = list(dict.fromkeys([target.language] + [lang for _b, lang in named]))
    plan = TunePlan(
        tune=tune,
        target=target,
        run_id=run_id,
        root=root,
        results_uri=history.run_uri(root, run_id),
        report_uri=layout.report_uri(root, run_id),
        specs=specs,
        languages=languages,
        objectives=objectives,
        constraints=constraints,
        space=space,
    )
    items = {}
    for spec in specs:
        for lang in languages:
            if lang in spec.languages and (lang == target.language or (spec.name, lang) in named):
                items[(spec.name, lang)] = load_items(spec, lang)[: tune.eval.limit]
    sp = tune.search.split
    plan.splits = make_splits(
        plan.tune_store,
        items,
        test=sp.test,
        seed=tune.search.seed if sp.seed is None else sp.seed,
        stratify=sp.stratify,
        run_id=run_id,
    )
    plan.dev_specs = part_specs(specs, plan.splits, plan.tune_store, "dev")
    plan.test_specs = part_specs(specs, plan.splits, plan.tune_store, "test")
    if has_grid(tune):
        plan.grid = _grid(tune, target)
    bounds = {c.bound for c in constraints}
    if tune.baselines.cp or "cp" in bounds:
        plan.baselines[f"cp.{target.key}"] = target.cp
        plan.roles[f"cp.{target.key}"] = "cp"
    if tune.baselines.chat or "chat" in bounds:
        first = next(iter(space.vectors), None) or (target.vectors or list(tune.vectors))[0]
        plan.baselines[f"chat.{first}"] = tune.vectors[first].chat
        plan.roles[f"chat.{first}"] = "chat"
    return plan
