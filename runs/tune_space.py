"""The search space: optuna distributions for a tune file's ``search.space``, and the one mapping
from a trial's parameters to a recipe (``ratio_value``, ``recipe_of``).

Parameter names: ``ratio.<vector>`` (a scalar ratio); with ``layers``, ``ratio.<vector>.p<i>``
(control points over layer depth); with ``groups``, the same again under
``ratio.<vector>.<group>`` for each module group; ``method``, ``density.<method>`` and
``embeddings`` where there is a choice. A range whose ends are equal is a fixed value, not a
parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatvec.runs.sweep import VectorDef
from chatvec.runs.tune_config import LayerSpace, MethodSpace

RatioValue = float | list[float] | dict[str, Any]


@dataclass
class Space:
    vectors: dict[str, VectorDef]  # the vectors in every recipe, with their ratio ranges below
    ranges: dict[str, tuple[float, float]]
    layers: LayerSpace | None
    groups: list[str]
    methods: list[MethodSpace]
    embeddings: list[str]

    # -- the distributions ----------------------------------------------------------------------
    def _ratio_params(self, vector: str) -> list[tuple[str, float, float]]:
        lo, hi = self.ranges[vector]
        layer_lo, layer_hi = self.layers.range if self.layers and self.layers.range else (lo, hi)
        out = []
        for prefix in [f"ratio.{vector}"] + [f"ratio.{vector}.{g}" for g in self.groups]:
            if self.layers is None:
                out.append((prefix, lo, hi))
            else:
                out += [(f"{prefix}.p{i}", layer_lo, layer_hi) for i in range(self.layers.points)]
        return out

    def distributions(self) -> dict[str, Any]:
        """Every parameter the space can ask for, with its optuna distribution."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out: dict[str, Any] = {}
        for vector in self.vectors:
            for name, lo, hi in self._ratio_params(vector):
                if hi > lo:
                    out[name] = FloatDistribution(lo, hi)
        if len(self.methods) > 1:
            out["method"] = CategoricalDistribution([m.method for m in self.methods])
        for m in self.methods:
            if m.density[1] > m.density[0]:
                out[f"density.{m.method}"] = FloatDistribution(*m.density)
        if len(self.embeddings) > 1:
            out["embeddings"] = CategoricalDistribution(list(self.embeddings))
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """Ask ``trial`` (an optuna Trial) for one point; returns its parameters."""
        dists = self.distributions()
        params: dict[str, Any] = {}
        for name, dist in dists.items():
            if name.startswith("density.") or name == "method":
                continue
            params[name] = _ask(trial, name, dist)
        if "method" in dists:
            params["method"] = _ask(trial, "method", dists["method"])
        method = self.method(params)
        if f"density.{method.method}" in dists:
            # only the chosen method's density is a parameter of this trial (a conditional one)
            params[f"density.{method.method}"] = _ask(
                trial, f"density.{method.method}", dists[f"density.{method.method}"]
            )
        return params

    def method(self, params: dict[str, Any]) -> MethodSpace:
        name = params.get("method", self.methods[0].method)
        return next(m for m in self.methods if m.method == name)


def _ask(trial, name: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    return trial.suggest_float(name, dist.low, dist.high)


def ratio_value(params: dict[str, Any], vector: str, space: Space) -> RatioValue:
    """The recipe's ``ratio`` for ``vector``: a float; with layers, the control points over
    layer depth (``[0.2, 1.0, 0.4]``); with groups, a mapping of module groups
    (``{default: ..., self_attn: ...}``), as recipe schedules take them."""
    lo, hi = space.ranges[vector]
    layer_lo, _ = space.layers.range if space.layers and space.layers.range else (lo, hi)

    def get(name: str, fixed: float) -> float:
        return float(params.get(name, fixed))

    def one(prefix: str) -> RatioValue:
        if space.layers is None:
            return get(prefix, lo)
        return [get(f"{prefix}.p{i}", layer_lo) for i in range(space.layers.points)]

    base = one(f"ratio.{vector}")
    if not space.groups:
        return base
    return {"default": base, **{g: one(f"ratio.{vector}.{g}") for g in space.groups}}


def recipe_of(params: dict[str, Any], space: Space, *, cp: str, tune) -> Any:
    """The recipe (chatvec.merge.recipe.Recipe) of one point of the space, for the CP model ``cp``."""
    from chatvec.merge.recipe import Recipe, VectorSpec

    method = space.method(params)
    density = float(params.get(f"density.{method.method}", method.density[0]))
    emb = params.get("embeddings", space.embeddings[0])
    vectors = [
        VectorSpec(
            base=v.base,
            chat=v.chat,
            ratio=ratio_value(params, name, space),
            method=method.method,
            density=density,
            seed=method.seed,
        )
        for name, v in space.vectors.items()
    ]
    return Recipe(
        cp=cp,
        vectors=vectors,
        embeddings=None if emb == "all" else emb,
        chat_tokens_from_chat=tune.chat_tokens_from_chat,
        dtype=tune.dtype,
    )


def space_of(tune, target) -> Space:
    """The space of ``tune``'s search for ``target`` (a runs.sweep.TargetDef)."""
    s = tune.search.space
    names = [v for v in (target.vectors or list(tune.vectors)) if v in s.ratios]
    return Space(
        vectors={v: tune.vectors[v] for v in names},
        ranges={v: s.ratios[v] for v in names},
        layers=s.layers,
        groups=list(s.groups),
        methods=list(s.methods),
        embeddings=list(s.embeddings or tune.embeddings),
    )


def params_of(recipe, space: Space) -> dict[str, Any] | None:
    """The parameters of a recipe with one scalar ratio per vector (a grid point) in this space,
    or None when the space cannot express it (another vector set, a fixed value that differs).
    In a per-layer space a scalar ratio is the flat curve: every control point at that ratio."""
    if [v.chat for v in recipe.vectors] != [v.chat for v in space.vectors.values()]:
        return None
    if any(not isinstance(v.ratio, (int, float)) for v in recipe.vectors):
        return None
    dists = space.distributions()
    params: dict[str, Any] = {}

    def put(name: str, value: Any, fixed: Any) -> bool:
        if name in dists:
            params[name] = value
            return True
        return value == fixed

    first = recipe.vectors[0]
    method = next((m for m in space.methods if m.method == first.method), None)
    ok = method is not None and len({(v.method, v.density) for v in recipe.vectors}) == 1
    for name, v in zip(space.vectors, recipe.vectors):
        ok = ok and all(put(p, float(v.ratio), lo) for p, lo, _hi in space._ratio_params(name))
    ok = ok and put("method", first.method, space.methods[0].method)
    ok = ok and put(f"density.{first.method}", float(first.density), method.density[0])
    ok = ok and put("embeddings", recipe.embeddings or "all", space.embeddings[0])
    return params if ok else None
