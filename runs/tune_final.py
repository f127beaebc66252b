"""After the search: the finalists on the held-out test items, compared item by item, and their
recipes written where ``chatvec merge --recipe`` takes them.

The finalists: the top-k feasible trials on dev (the Pareto front first, for several
objectives), the grid's best point on dev when the file has a grid, the CP and chat models. The
winner is the best trial on dev, chosen before any test item is seen; the test says whether it
beats the reference (the grid's best point, else the CP model) on the first objective: a paired
bootstrap interval of the per-item differences (chatvec.eval.paired) that excludes 0 on the good
side. Choosing the winner on test would make the test a second dev set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from chatvec.core.storage import Store
from chatvec.eval.paired import PairedDiff, compare_models, format_diff
from chatvec.runs.tune_plan import TunePlan
from chatvec.runs.tune_study import TrialRecord, metric_key

RECIPES = "recipes"
TRIAL_RECIPES = "trials"


@dataclass
class Finalist:
    name: str
    role: str  # best, top<i>, grid, cp, chat
    dev: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    record: TrialRecord | None = None
    recipe: Any = None
    recipe_uri: str | None = None


@dataclass
class Comparison:
    a: str  # the reference
    b: str  # the finalist
    objective: str
    diff: PairedDiff
    better: bool  # the interval excludes 0 on the objective's good side

    def text(self) -> str:
        return format_diff(self.diff)


@dataclass
class Verdict:
    winner: str | None
    reference: str | None
    comparison: Comparison | None
    text: str


def recipe_yaml(recipe, header: list[str]) -> str:
    body = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header) + body


def write_recipe(store: Store, rel: str, recipe, header: list[str]) -> str:
    store.write_text(rel, recipe_yaml(recipe, header))
    return store.describe(rel)


def _rows(store: Store, plan: TunePlan, model: str) -> list[dict]:
    from chatvec.eval.contracts import Cell
    from chatvec.eval.results import read_samples

    rows = []
    for o in plan.objectives:
        table = read_samples(store, Cell(model, o.language, f"{o.benchmark}.test"))
        if table is not None:
            rows += [r for r in table.to_pylist() if r["metric"] == o.metric]
    return rows


def compare(plan: TunePlan, a: str, b: str) -> list[Comparison]:
    """B against A on each objective, on the test items both answered."""
    store = Store(plan.results_uri)
    diffs = compare_models(_rows(store, plan, a), _rows(store, plan, b))
    out = []
    for o in plan.objectives:
        d = diffs.get((o.language, f"{o.benchmark}.test", o.metric))
        if d is None or d.diff is None:
            continue
        good = d.lo > 0 if o.direction == "maximize" else d.hi < 0
        out.append(Comparison(a, b, metric_key(o), d, d.excludes_zero and good))
    return out


def verdict(plan: TunePlan, finalists: list[Finalist]) -> tuple[Verdict, list[Comparison]]:
    """Every trial finalist against each reference; the winner's line."""
    by_role = {f.role: f for f in finalists}
    refs = [f for f in finalists if f.role in ("grid", "cp", "chat")]
    comparisons = [c for f in finalists if f.record is not None for r in refs for c in compare(plan, r.name, f.name)]
    winner = by_role.get("best")
    ref = by_role.get("grid") or by_role.get("cp")
    if winner is None:
        return Verdict(
            None, ref.name if ref else None, None, "no trial was feasible on dev: nothing to confirm on test"
        ), comparisons
    if ref is None:
        return Verdict(
            winner.name,
            None,
            None,
            f"{winner.name} is the best trial on dev; no grid or CP model to compare it with on test",
        ), comparisons
    first = metric_key(plan.objectives[0])
    mine = next((c for c in comparisons if c.a == ref.name and c.b == winner.name and c.objective == first), None)
    what = "the grid's best point" if ref.role == "grid" else "the CP model"
    if mine is None:
        return Verdict(
            winner.name, ref.name, None, f"{winner.name} and {ref.name} share no scored test item"
        ), comparisons
    d = mine.diff
    if mine.better:
        text = f"{winner.name} (the best trial on dev) beats {what} {ref.name} on test: {first} {mine.text()} over {d.n} items"
    else:
        text = f"no recipe is shown better than {what} {ref.name} on test: {winner.name} gives {first} {mine.text()} over {d.n} items (the interval does not exclude 0 on the good side)"
    return Verdict(winner.name, ref.name, mine, text), comparisons
