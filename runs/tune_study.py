"""The search itself: an optuna study driven by ask and tell, and its journal.

Samplers: TPE for one objective (multivariate, with a constant liar when several trials are in
flight), NSGA-II for several (a Pareto front), CMA-ES on request. Constraints go through
optuna's own constraints support (``constraints_func``: TPE and NSGA-II prefer feasible trials);
CMA-ES has none, so there a violated constraint is a penalty on the told value
(``PENALTY`` x the summed violations). Either way the finalists are chosen among feasible trials.

The journal, ``<run>/tune/trials.json``, records each trial when it is asked (its parameters,
recipe fingerprint and model name) and when it is told (its dev values). A rerun of the run
builds a fresh study and tells it every finished trial again (``add_trial`` with the recorded
values and constraint violations), then asks again, first, the trials that were in flight when
the last run stopped (``enqueue_trial``): the same recipes, so their finished cells are reused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from chatvec.core.errors import ConfigError
from chatvec.core.storage import Store

logger = logging.getLogger(__name__)

JOURNAL = "trials.json"
PENALTY = 10.0
ASKED, COMPLETE, FAILED = "asked", "complete", "failed"


@dataclass
class TrialRecord:
    number: int
    name: str  # the model name of its cells: r-<recipe fingerprint>
    params: dict[str, Any]
    fingerprint: str
    state: str = ASKED
    values: list[float] | None = None  # the objectives on dev, as measured (never penalized)
    metrics: dict[str, float | None] = field(default_factory=dict)  # "metric/benchmark/language" -> dev value
    violations: list[float] = field(default_factory=list)  # per constraint; <= 0 is satisfied
    seconds: float = 0.0
    error: str | None = None

    @property
    def feasible(self) -> bool:
        return self.state == COMPLETE and all(v <= 0 for v in self.violations)


class Journal:
    """The trials of one search, rewritten whole at every change (a few KB)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.records: list[TrialRecord] = []
        if store.is_file(JOURNAL):
            self.records = [TrialRecord(**r) for r in json.loads(store.read_text(JOURNAL))["trials"]]

    def save(self) -> None:
        self.store.write_text(JOURNAL, json.dumps({"trials": [asdict(r) for r in self.records]}, indent=1))

    @property
    def finished(self) -> list[TrialRecord]:
        return [r for r in self.records if r.state != ASKED]


def make_study(search, directions: list[str]):
    """A fresh in-memory study with the file's sampler, seeded."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # constraints_func and constant_liar are marked experimental; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kind = search.sampler or ("nsga2" if len(directions) > 1 else "tpe")
    constraints = (lambda t: t.user_attrs.get("violations", [1.0])) if search.constraints else None
    if kind == "tpe":
        startup = search.startup_trials or max(4, min(10, search.trials // 4))
        sampler = optuna.samplers.TPESampler(
            seed=search.seed,
            n_startup_trials=startup,
            multivariate=True,
            group=True,  # conditional parameters (a method's density) are modelled per group
            constant_liar=search.parallel > 1,
            constraints_func=constraints,
        )
    elif kind == "nsga2":
        population = max(4, min(50, search.trials // 3))
        sampler = optuna.samplers.NSGAIISampler(
            seed=search.seed, population_size=population, constraints_func=constraints
        )
    else:
        sampler = optuna.samplers.CmaEsSampler(seed=search.seed)
    return optuna.create_study(directions=directions, sampler=sampler), kind


def told_values(record: TrialRecord, directions: list[str], penalize: bool) -> list[float]:
    """What the sampler is told: the measured values, less a penalty per violated constraint
    for a sampler without constraints support."""
    excess = sum(max(0.0, v) for v in record.violations) if penalize else 0.0
    return [
        v - PENALTY * excess if d == "maximize" else v + PENALTY * excess for v, d in zip(record.values, directions)
    ]


def replay(study, journal: Journal, distributions: dict[str, Any], directions: list[str], penalize: bool) -> int:
    """Tell a fresh study the journal's finished trials; enqueue the ones still in flight.
    Returns how many were told."""
    import optuna
    from optuna.samplers._base import _CONSTRAINTS_KEY
    from optuna.trial import TrialState, create_trial

    told, pending = [], []
    for rec in journal.records:
        if rec.state == ASKED:
            pending.append(rec)
            continue
        try:
            dists = {k: distributions[k] for k in rec.params}
        except KeyError as exc:
            raise ConfigError(
                f"the search space changed since this run started (it has no parameter {exc.args[0]!r} any more): "
                "start a new run with another --run-id"
            ) from None
        complete = rec.state == COMPLETE
        frozen = create_trial(
            state=TrialState.COMPLETE if complete else TrialState.FAIL,
            params=rec.params,
            distributions=dists,
            values=told_values(rec, directions, penalize) if complete else None,
            user_attrs={"violations": rec.violations, "name": rec.name},
            system_attrs={_CONSTRAINTS_KEY: rec.violations} if rec.violations else {},
        )
        try:
            study.add_trial(frozen)
        except (ValueError, optuna.exceptions.OptunaError) as exc:
            raise ConfigError(
                f"trial {rec.number} of the journal no longer fits the search space ({exc}): use another --run-id"
            ) from None
        told.append(rec)
    for rec in pending:
        study.enqueue_trial(rec.params, skip_if_exists=False)
    for i, rec in enumerate(told):
        rec.number = i  # trials in the order they were told; the ones in flight come after
    journal.records = told
    return len(told)


def tell_known(
    study, params: dict[str, Any], distributions: dict[str, Any], record: TrialRecord, directions, penalize
) -> bool:
    """Tell the study a point measured outside the search (a grid point), so the sampler starts
    from what the grid knows; False when the point lies outside the space."""
    from optuna.samplers._base import _CONSTRAINTS_KEY
    from optuna.trial import TrialState, create_trial

    if params is None or any(not _inside(distributions.get(k), v) for k, v in params.items()):
        return False
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            params=params,
            distributions={k: distributions[k] for k in params},
            values=told_values(record, directions, penalize),
            user_attrs={"violations": record.violations, "name": record.name},
            system_attrs={_CONSTRAINTS_KEY: record.violations} if record.violations else {},
        )
    )
    return True


def _inside(dist, value) -> bool:
    if dist is None:
        return False
    try:
        return dist._contains(dist.to_internal_repr(value))
    except ValueError:  # a category the distribution does not have
        return False


def violations(constraints, metrics: dict[str, float | None], baseline_metrics: dict[str, dict]) -> list[float]:
    """Per constraint, how far the trial is from satisfying it (<= 0: satisfied); a missing value
    counts as violated."""
    out = []
    for c in constraints:
        key = metric_key(c)
        value = metrics.get(key)
        bound = c.bound if not isinstance(c.bound, str) else baseline_metrics.get(c.bound, {}).get(key)
        if value is None or bound is None or math.isnan(value):
            out.append(1.0)
        else:
            out.append(bound - value if c.op == ">=" else value - bound)
    return out


def metric_key(o) -> str:
    return f"{o.metric}/{o.benchmark}/{o.language}"


class Pace:
    """Trials per minute and the best value so far, for the per-trial progress line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.done = 0

    def per_minute(self) -> float:
        return self.done / max((time.perf_counter() - self.start) / 60.0, 1e-9)


def best_line(records: list[TrialRecord], directions: list[str]) -> str:
    feasible = [r for r in records if r.feasible]
    if not feasible:
        return "no feasible trial yet"
    if len(directions) > 1:
        return f"{len(pareto(feasible, directions))} on the Pareto front"
    pick = max if directions[0] == "maximize" else min
    best = pick(feasible, key=lambda r: r.values[0])
    return f"best {best.values[0]:.4g} (trial {best.number})"


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    sign = [1 if d == "maximize" else -1 for d in directions]
    ge = all(s * x >= s * y for s, x, y in zip(sign, a, b))
    return ge and any(s * x > s * y for s, x, y in zip(sign, a, b))


def pareto(records: list[TrialRecord], directions: list[str]) -> list[TrialRecord]:
    return [r for r in records if not any(_dominates(o.values, r.values, directions) for o in records if o is not r)]


def ranked(records: list[TrialRecord], directions: list[str]) -> list[TrialRecord]:
    """Feasible finished trials, best first: by the objective, or for several the Pareto front
    (ordered by the first objective) and then the rest. One trial per recipe."""
    seen, unique = set(), []
    for r in records:
        if r.feasible and r.fingerprint not in seen:
            seen.add(r.fingerprint)
            unique.append(r)
    sign = 1 if directions[0] == "maximize" else -1
    by_first = sorted(unique, key=lambda r: (-sign * r.values[0], r.number))
    if len(directions) == 1:
        return by_first
    front = {id(r) for r in pareto(unique, directions)}
    return [r for r in by_first if id(r) in front] + [r for r in by_first if id(r) not in front]
