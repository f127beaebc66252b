"""A tune file: a sweep file (runs/sweep.py) plus a ``search:`` section. ``chatvec tune`` reads it::

    ...                                   # vectors, targets, judge, engine, root: as in a sweep
    ratios: [0.5, 1.0, 1.25]              # optional: a grid, compared with the search on test
    search:
      space:
        ratios: {toy-chat: [0.25, 2.5]}   # per vector: [low, high] (one number: fixed)
        layers: {points: 3}               # optional: per-layer control points (recipe schedules)
        groups: [self_attn, mlp]          # optional: module groups with their own ratio
        methods: [add, {method: dare, density: [0.5, 1.0]}]
        embeddings: [all, skip]           # default: the sweep's embeddings
      objective: {metric: exact_match, benchmark: toy-task, language: toy-l2, direction: maximize}
      constraints: ["in_language >= 0.9", "unsafe <= cp"]
      trials: 24                          # the budget
      seed: 0
      parallel: 1                         # trials in flight at once
      sampler: tpe                        # tpe (one objective), nsga2 (several), cmaes
      split: {test: 0.5, seed: 0, stratify: auto}
      top_k: 3

Everything a user can get wrong is checked by ``check_tune`` before any model loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from chatvec.core.errors import ConfigError
from chatvec.merge.methods import METHOD_NAMES
from chatvec.runs.sweep import EmbeddingChoice, Sweep, _Strict, embedding_list, method_list

_CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(>=|<=)\s*(cp|chat|[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


def _range(v: Any) -> Any:
    """One number is a fixed value: [x, x]."""
    return [v, v] if isinstance(v, (int, float)) else v


class LayerSpace(_Strict):
    """Per-layer ratios: ``points`` control points over layer depth, interpolated linearly."""

    points: int = Field(ge=2, le=16)
    range: tuple[float, float] | None = None  # default: each vector's ratio range

    @field_validator("range", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return _range(v)


class MethodSpace(_Strict):
    method: Literal[METHOD_NAMES] = "add"  # type: ignore[valid-type]
    density: tuple[float, float] = (1.0, 1.0)  # ties/dare: [low, high], or one number
    seed: int = 0

    @field_validator("density", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return _range(v)

    @field_validator("density")
    @classmethod
    def _density(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError("density is [low, high] with 0 < low <= high <= 1")
        return v


class SpaceDef(_Strict):
    ratios: dict[str, tuple[float, float]] = Field(default_factory=dict)
    layers: LayerSpace | None = None
    groups: list[str] = Field(default_factory=list)
    methods: list[MethodSpace] = Field(default_factory=lambda: [MethodSpace()], min_length=1)
    embeddings: list[EmbeddingChoice] | None = None  # default: the sweep's

    @field_validator("ratios", mode="before")
    @classmethod
    def _ones(cls, v: Any) -> Any:
        return {k: _range(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("ratios")
    @classmethod
    def _ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in v.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: a ratio range is [low, high] with 0 <= low <= high")
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return method_list(v)

    @field_validator("embeddings", mode="before")
    @classmethod
    def _embeddings(cls, v: Any) -> Any:
        return embedding_list(v)


class ObjectiveDef(_Strict):
    metric: str
    benchmark: str | None = None  # default: the target's benchmark, when it has one
    language: str | None = None  # default: the target's language
    direction: Literal["maximize", "minimize"] | None = None  # default: by the metric

    def label(self) -> str:
        return f"{self.metric} ({self.benchmark}, {self.language})"


class ConstraintDef(ObjectiveDef):
    """``metric op bound``; the bound is a number or a baseline's dev value (``cp``, ``chat``)."""

    op: Literal[">=", "<="]
    bound: float | Literal["cp", "chat"]

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _CONSTRAINT.match(v)
            if not m:
                raise ValueError(f"{v!r}: write a constraint as `METRIC >= NUMBER`, `METRIC <= cp` or `METRIC >= chat`")
            bound = m.group(3)
            return {"metric": m.group(1), "op": m.group(2), "bound": bound if bound in ("cp", "chat") else float(bound)}
        return v

    def text(self) -> str:
        bound = self.bound if isinstance(self.bound, str) else f"{self.bound:g}"
        return f"{self.metric} {self.op} {bound}"


class SplitDef(_Strict):
    test: float = Field(default=0.5, gt=0, lt=1)  # the share of items held out for the test
    seed: int | None = None  # default: the search's seed
    # the item field to stratify by; auto: `category`, else `task`, when the items have one
    stratify: str | None = "auto"


class SearchDef(_Strict):
    space: SpaceDef
    objective: ObjectiveDef | list[ObjectiveDef]
    constraints: list[ConstraintDef] = Field(default_factory=list)
    trials: int
    seed: int = 0
    parallel: int = Field(default=1, ge=1)
    sampler: Literal["tpe", "nsga2", "cmaes"] | None = None  # default: tpe, nsga2 for several objectives
    startup_trials: int | None = Field(default=None, ge=1)  # random trials before TPE models the space
    target: str | None = None  # default: the target whose language the objective names
    split: SplitDef = Field(default_factory=SplitDef)
    top_k: int = Field(default=3, ge=1)
    retries: int = Field(default=1, ge=0)  # a trial whose cells failed (a dead actor) is run again

    @field_validator("trials")
    @classmethod
    def _budget(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"the trial budget is {v}; give at least 1 trial")
        return v

    @property
    def objectives(self) -> list[ObjectiveDef]:
        return self.objective if isinstance(self.objective, list) else [self.objective]


class TuneFile(Sweep):
    search: SearchDef


def load_tune(path: str) -> TuneFile:
    """Read and validate a tune YAML; a ConfigError names every bad key with its line."""
    from chatvec.core.yamlconfig import load_model

    tune = load_model(path, TuneFile)
    if tune.name is None:
        stem = Path(path.rstrip("/")).stem
        tune.name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("-.") or "tune"
    return tune


def has_grid(tune: TuneFile) -> bool:
    """The file names a grid (``ratios``) of its own: its best point is compared on test."""
    return "ratios" in tune.model_fields_set


def raise_problems(path: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"{path}: the search cannot run:\n" + "\n".join(f"  - {p}" for p in problems))
