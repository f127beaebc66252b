"""A sweep: chat vectors x CP targets x ratios x methods x embedding policies, merged, evaluated
with baselines on each target's benchmarks, and reported. One YAML file describes it::

    name: paper-llama2-13b
    vectors:                          # named chat vectors: chat - base
      llama2-chat: {base: meta-llama/Llama-2-13b-hf, chat: meta-llama/Llama-2-13b-chat-hf}
    targets:                          # one CP model per target, with its language and benchmarks
      - {language: zh-Hant, cp: YOUR_ORG/llama-2-13b-zh-hant-cp, benchmarks: [sample-chat-zh-Hant]}
    ratios: [0.5, 1.0]               # a point may be a schedule: [0.2, 1.0, 0.4] or {default: 1, mlp: 0.5}
    methods: [add]                    # or {method: dare, density: 0.9, seed: 0}
    embeddings: skip                  # or a list to sweep: [all, skip]
    baselines: {cp: true, chat: true, extra: {}}
    judge: YOUR_ORG/judge-model
    toxicity: perspective             # or hf:MODEL: scores the toxicity benchmarks' continuations
    root: s3://bucket/chatvec         # default: storage.root of ray_config.yaml
    eval: {limit: 80, max_new_tokens: 1024}   # optional caps for quick runs
    nightly: {k: 2.0}                 # regression threshold, in combined stderrs

Every merge lands in ``<root>/models/<name>-<fingerprint>/``: the fingerprint covers the recipe
and the inputs' identities, so a merge already committed there is reused, and a changed input
gives a new folder instead of a refusal. Results go to ``<root>/results/run=<run_id>/`` and the
report to ``<root>/reports/<run_id>/index.html``. Running a plan is runs/sweep_run.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatvec.core import layout
from chatvec.core.errors import ConfigError
from chatvec.merge.methods import METHOD_NAMES
from chatvec.merge.schedule import Ratio, ScheduleValue, fingerprint_form, format_schedule, is_scalar, schedule_values

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_HINT = "use letters, digits, '.', '_' and '-' (it becomes part of folder names)"
EmbeddingChoice = Literal["skip", "overlap", "by-token", "all"]


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{v!r} is not a usable name: {_NAME_HINT}")
    return v


RATIOS_HINT = (
    "ratios must be > 0, and a schedule's values >= 0 with one > 0 at least "
    "(ratio 0 is the CP model: keep baselines.cp on)"
)


def _usable_ratio(r: ScheduleValue) -> bool:
    if is_scalar(r):
        return r > 0
    values = schedule_values(r)
    return all(x >= 0 for x in values) and any(x > 0 for x in values)


def _value_key(x: Any) -> Any:
    """Something hashable that is equal for equal list entries (ratios, policies, methods)."""
    if isinstance(x, BaseModel):
        return x.model_dump_json()
    return x if isinstance(x, str) else json.dumps(fingerprint_form(x))


def ratio_label(r: ScheduleValue) -> str:
    """A ratio in a model name: r0.5; a gradient by its points, r0.2_1_0.4; a mapping by a hash
    of its groups (the names must stay short and safe in folder names)."""
    if is_scalar(r):
        return f"r{r:g}"
    if isinstance(r, tuple) and len(r) <= 5:
        return "r" + "_".join(f"{x:g}" for x in r)
    digest = hashlib.sha256(json.dumps(fingerprint_form(r), sort_keys=True).encode()).hexdigest()
    return f"rs-{digest[:8]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VectorDef(_Strict):
    """A chat vector, chat - base. `chat` is also the chat baseline."""

    base: str
    chat: str


class MethodDef(_Strict):
    # the names come from the method table (merge/methods.py)
    method: Literal[METHOD_NAMES] = "add"  # type: ignore[valid-type]
    # ties keeps the top `density` of |tau| per tensor; dare keeps each entry with probability `density`
    density: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0

    def label(self) -> str:
        if self.method == "add":
            return "add"
        seed = f"-s{self.seed}" if self.seed else ""
        return f"{self.method}{self.density:g}{seed}"


class TargetDef(_Strict):
    """A CP model for one language and the benchmarks it is judged on."""

    language: str
    cp: str
    benchmarks: list[str] = Field(min_length=1)
    name: str | None = None  # default: the language; set it when two targets share a language
    vectors: list[str] | None = None  # default: every vector
    ratios: list[Ratio] | None = None  # default: the sweep's ratios
    baselines: dict[str, str] = Field(default_factory=dict)  # name -> URI, evaluated here only

    @property
    def key(self) -> str:
        return self.name or self.language


class Baselines(_Strict):
    cp: bool = True  # each target's CP model alone
    chat: bool = True  # each vector's chat model, in every target language
    extra: dict[str, str] = Field(default_factory=dict)  # name -> URI, in every target language


def method_list(v: Any) -> Any:
    """A file's `methods:` as a list of method entries: one name, one entry or a list of either."""
    v = [v] if isinstance(v, (str, dict)) else v
    return [{"method": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


def embedding_list(v: Any) -> Any:
    """A file's `embeddings:` as a list of policies; null means "all" (every row gets the vector)."""
    v = [v] if v is None or isinstance(v, str) else v
    return ["all" if e is None else e for e in v] if isinstance(v, list) else v


class Workers(_Strict):
    merge: int | None = Field(default=None, ge=0)  # 0: merge in this process without Ray
    eval: int | None = Field(default=None, ge=0)


class NightlySettings(_Strict):
    # a drop larger than k * sqrt(se_a^2 + se_b^2) (and than min_delta) is a regression
    k: float = Field(default=2.0, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    trend_runs: int = Field(default=10, ge=2)  # runs shown in the report's trend plots


class EvalOptions(_Strict):
    limit: int | None = Field(default=None, ge=1)  # at most this many items per benchmark and language
    max_new_tokens: int | None = Field(default=None, ge=1)  # caps every benchmark's own setting
    batch_size: int | None = Field(default=None, ge=1)  # default: eval.batch_size of ray_config.yaml


class Sweep(_Strict):
    name: str | None = None  # default: the file's stem
    vectors: dict[str, VectorDef] = Field(min_length=1)
    targets: list[TargetDef] = Field(min_length=1)
    # each point a number or a schedule (merge/schedule.py)
    ratios: list[Ratio] = Field(default_factory=lambda: [1.0], min_length=1)
    methods: list[MethodDef] = Field(default_factory=lambda: [MethodDef()], min_length=1)
    # "all" adds the vector to every embedding row (the vocabularies must then match)
    embeddings: list[EmbeddingChoice] = Field(default_factory=lambda: ["all"], min_length=1)
    chat_tokens_from_chat: bool = False
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    shard_size: str | None = None  # default: merge.shard_size of ray_config.yaml
    baselines: Baselines = Field(default_factory=Baselines)
    judge: str | None = None
    judge_max_tokens: int | None = Field(default=None, ge=1)  # default: eval.judge_max_new_tokens
    toxicity: str | None = None  # toxicity scorer: "perspective" or "hf:MODEL" (chatvec.eval.toxicity)
    engine: Literal["hf", "vllm"] | None = None  # default: eval.engine of ray_config.yaml
    # swap each merge point into an engine loaded from its CP model instead of writing checkpoints
    # (cluster/in_engine.py); points whose vocabulary grows are still merged to checkpoints
    in_engine: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    root: str | None = None  # default: storage.root of ray_config.yaml
    workers: Workers = Field(default_factory=Workers)
    replicas: int | Literal["auto"] | None = Field(default=None, ge=1)  # default: eval.replicas
    eval: EvalOptions = Field(default_factory=EvalOptions)
    nightly: NightlySettings = Field(default_factory=NightlySettings)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return method_list(v)

    @field_validator("embeddings", mode="before")
    @classmethod
    def _embeddings(cls, v: Any) -> Any:
        return embedding_list(v)

    @field_validator("ratios", "embeddings", "methods")
    @classmethod
    def _unique(cls, v: list) -> list:
        seen = [_value_key(x) for x in v]
        if len(set(seen)) != len(seen):
            raise ValueError("lists each value twice; give every value once")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[ScheduleValue]) -> list[ScheduleValue]:
        if not all(_usable_ratio(r) for r in v):
            raise ValueError(RATIOS_HINT)
        return v

    @field_validator("name")
    @classmethod
    def _sweep_name(cls, v: str | None) -> str | None:
        return v if v is None else _check_name(v)

    @field_validator("vectors")
    @classmethod
    def _vector_names(cls, v: dict) -> dict:
        for name in v:
            _check_name(name)
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Sweep:
        problems = []
        keys = [t.key for t in self.targets]
        for dup in sorted({k for k in keys if keys.count(k) > 1}):
            problems.append(f"two targets are named {dup!r}: give each a distinct `name`")
        names = [t.key for t in self.targets] + [t.language for t in self.targets]
        names += list(self.baselines.extra) + [n for t in self.targets for n in t.baselines]
        problems += [f"{n!r} is not a usable name: {_NAME_HINT}" for n in dict.fromkeys(names) if not _NAME.match(n)]
        for t in self.targets:
            for v in t.vectors or []:
                if v not in self.vectors:
                    problems.append(
                        f"target {t.key!r} names vector {v!r}, which `vectors` does not define (defined: {', '.join(self.vectors)})"
                    )
            if t.ratios is not None and (not t.ratios or not all(_usable_ratio(r) for r in t.ratios)):
                problems.append(f"target {t.key!r}: ratios must be a non-empty list: {RATIOS_HINT}")
        extra = list(self.baselines.extra) + [n for t in self.targets for n in t.baselines]
        for dup in sorted({n for n in extra if extra.count(n) > 1}):
            problems.append(f"baseline name {dup!r} is used twice: give each extra model its own name")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def load_sweep(path: str) -> Sweep:
    """Read and validate a sweep YAML; a ConfigError names every bad key with its line."""
    from chatvec.core.yamlconfig import load_model

    sweep = load_model(path, Sweep)
    if sweep.name is None:
        stem = Path(path.rstrip("/")).stem
        sweep.name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("-.") or "sweep"
    return sweep


# -- planning ------------------------------------------------------------------------------------
@dataclass
class PlannedMerge:
    name: str
    target: str
    language: str
    vector: str
    ratio: ScheduleValue  # a number, or a schedule (merge/schedule.py)
    method: str
    embeddings: str
    recipe: Any  # chatvec.merge.recipe.Recipe
    plan: Any = None  # chatvec.merge.plan.MergePlan
    out_uri: str = ""
    cached: bool = False
    # the name of an earlier merge with the same plan (two targets sharing a CP model): this one
    # is not merged again, it is evaluated from that merge's folder
    same_as: str | None = None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": "merged",
            "uri": self.out_uri,
            "target": self.target,
            "language": self.language,
            "vector": self.vector,
            # the report plots numbers over the ratio; a schedule point is shown by name
            "ratio": self.ratio if is_scalar(self.ratio) else None,
            "schedule": None if is_scalar(self.ratio) else format_schedule(self.ratio),
            "method": self.method,
            "embeddings": self.embeddings,
            "reused": self.cached,
        }


@dataclass
class EvalGroup:
    """Models that run the same benchmarks in the same languages: one evaluation call."""

    languages: list[str]
    benchmarks: list[str]
    models: dict[str, str] = field(default_factory=dict)  # name -> URI


@dataclass
class SweepPlan:
    root: str
    merges: list[PlannedMerge]
    baselines: list[dict[str, Any]]  # report.ModelInfo fields
    groups: list[EvalGroup]

    def models(self) -> list[dict[str, Any]]:
        return [m.info() for m in self.merges] + self.baselines


def model_name(vector: str, target: str, method: MethodDef, ratio: ScheduleValue, embeddings: str, sweep: Sweep) -> str:
    parts = [vector, target, method.label(), ratio_label(ratio)]
    if len(sweep.embeddings) > 1 or embeddings != "all":
        parts.append(f"emb-{embeddings}")
    return ".".join(parts)


EMBEDDINGS_HINT = (
    "The vocabularies differ: set `embeddings:` in the sweep file to skip (leave the CP model's "
    "embedding rows as they are), overlap (add the vector to the rows both vocabularies share by "
    "index) or by-token (match rows by token string); a list sweeps several."
)


def check_benchmarks(sweep: Sweep) -> list[str]:
    """Problems with the targets' benchmarks: unknown names, or no data in the target's language."""
    from chatvec.core.errors import ChatvecError
    from chatvec.eval.benchmarks import resolve_benchmarks

    problems = []
    for t in sweep.targets:
        try:
            specs = resolve_benchmarks(t.benchmarks)
        except ChatvecError as exc:
            problems.append(f"target {t.key}: {exc}")
            continue
        for spec in specs:
            if t.language not in spec.languages:
                problems.append(
                    f"target {t.key}: benchmark {spec.name!r} has no data in {t.language} "
                    f"(it has {', '.join(spec.languages)}); name a benchmark of that language"
                )
    if sweep.toxicity:  # an unknown scorer or a missing key is found before anything merges
        from chatvec.eval.toxicity_scorers import absolute_toxicity, toxicity_identity

        try:
            toxicity_identity(absolute_toxicity(sweep.toxicity))
        except ChatvecError as exc:
            problems.append(f"toxicity: {exc}")
    return problems


def grid_points(file, target) -> Iterator[tuple]:
    """One target's grid, as sweeps and searches name it: (model name, vector name, method, ratio,
    embedding policy, recipe) for every vector x method x embedding policy x ratio of ``file`` (a
    sweep or tune file) on ``target``."""
    from chatvec.merge.recipe import Recipe, VectorSpec

    for vname in target.vectors or list(file.vectors):
        vec = file.vectors[vname]
        for method in file.methods:
            for emb in file.embeddings:
                for ratio in target.ratios or file.ratios:
                    spec = VectorSpec(
                        base=vec.base,
                        chat=vec.chat,
                        ratio=ratio,
                        method=method.method,
                        density=method.density,
                        seed=method.seed,
                    )
                    recipe = Recipe(
                        cp=target.cp,
                        vectors=[spec],
                        embeddings=None if emb == "all" else emb,
                        chat_tokens_from_chat=file.chat_tokens_from_chat,
                        dtype=file.dtype,
                    )
                    yield model_name(vname, target.key, method, ratio, emb, file), vname, method, ratio, emb, recipe


def plan_sweep(sweep: Sweep, *, root: str, shard_size: int, progress=None) -> SweepPlan:
    """Every merge's recipe and validated plan, and every evaluation group.

    Plans are built (headers read and checked) before anything runs, so a bad input stops the
    sweep before the first byte is written; all problems of all merges are listed together.
    """
    from chatvec.core.errors import ChatvecError, PlanError
    from chatvec.merge.output import check_output
    from chatvec.merge.plan import build_plan

    merges = [
        PlannedMerge(
            name=name,
            target=t.key,
            language=t.language,
            vector=vname,
            ratio=ratio,
            method=method.label(),
            embeddings=emb,
            recipe=recipe,
        )
        for t in sweep.targets
        for name, vname, method, ratio, emb, recipe in grid_points(sweep, t)
    ]
    problems = check_benchmarks(sweep)
    hints: list[str] = []
    first: dict[str, PlannedMerge] = {}  # plan fingerprint -> the first merge planned with it
    for point in merges:
        if progress:
            progress(f"planning {point.name}")
        try:
            point.plan = build_plan(point.recipe, shard_size=shard_size)
        except PlanError as exc:
            problems += [f"{point.name}: {p}" for p in exc.problems]
            if any("policy" in p for p in exc.problems) and EMBEDDINGS_HINT not in hints:
                hints.append(EMBEDDINGS_HINT)
            continue
        except ChatvecError as exc:
            problems.append(f"{point.name}: {exc}")
            continue
        fingerprint = point.plan.fingerprint()
        twin = first.setdefault(fingerprint, point)
        if twin is not point:
            point.same_as, point.out_uri, point.cached = twin.name, twin.out_uri, twin.cached
            continue
        point.out_uri = layout.model_uri(root, f"{point.name}-{fingerprint[:12]}")
        point.cached = check_output(point.plan, point.out_uri, overwrite=False) is not None
    if problems:
        hints.append("Fix the sweep file or the models it names, then run it again; nothing was written.")
        raise PlanError(problems, hint="\n".join(hints))

    baselines: list[dict[str, Any]] = []
    # what each model runs: language -> benchmarks
    runs: dict[str, dict[str, list[str]]] = {}
    uris: dict[str, str] = {}

    def add(name: str, uri: str, assignment: dict[str, list[str]]) -> None:
        uris[name] = uri
        for language, benchmarks in assignment.items():
            have = runs.setdefault(name, {}).setdefault(language, [])
            have += [b for b in benchmarks if b not in have]

    for t in sweep.targets:
        mine = {t.language: t.benchmarks}
        for point in merges:
            if point.target == t.key:
                add(point.name, point.out_uri, mine)
        if sweep.baselines.cp:
            name = f"cp.{t.key}"
            baselines.append({"name": name, "role": "cp", "uri": t.cp, "target": t.key, "language": t.language})
            add(name, t.cp, mine)
        for name, uri in t.baselines.items():
            baselines.append({"name": name, "role": "extra", "uri": uri, "target": t.key, "language": t.language})
            add(name, uri, mine)
    # models shared by all targets run every benchmark of every target language
    everywhere: dict[str, list[str]] = {}
    for t in sweep.targets:
        have = everywhere.setdefault(t.language, [])
        have += [b for b in t.benchmarks if b not in have]
    shared = []
    if sweep.baselines.chat:
        used = {v for t in sweep.targets for v in (t.vectors or sweep.vectors)}
        shared += [(f"chat.{v}", sweep.vectors[v].chat, "chat", v) for v in sweep.vectors if v in used]
    shared += [(name, uri, "extra", None) for name, uri in sweep.baselines.extra.items()]
    for name, uri, role, vector in shared:
        baselines.append({"name": name, "role": role, "uri": uri, "vector": vector})
        add(name, uri, everywhere)
    names = [m.name for m in merges] + [b["name"] for b in baselines]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"model name(s) {', '.join(clashes)} are used twice; rename the extra baselines that clash")
    return SweepPlan(root=root, merges=merges, baselines=baselines, groups=_groups(runs, uris))


def _groups(runs: dict[str, dict[str, list[str]]], uris: dict[str, str]) -> list[EvalGroup]:
    """Evaluation calls: models with the same work share one. A model whose languages all run the
    same benchmarks (the chat baseline, usually) is one call over all its languages, so it is
    loaded once; otherwise it gets one call per language."""
    groups: dict[tuple, EvalGroup] = {}
    for name, assignment in runs.items():
        benchmark_sets = {tuple(b) for b in assignment.values()}
        if len(benchmark_sets) == 1:
            calls = [(tuple(assignment), next(iter(benchmark_sets)))]
        else:
            calls = [((lang,), tuple(b)) for lang, b in assignment.items()]
        for languages, benchmarks in calls:
            key = (languages, benchmarks)
            groups.setdefault(key, EvalGroup(list(languages), list(benchmarks))).models[name] = uris[name]
    return list(groups.values())
