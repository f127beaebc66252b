"""Benchmarks: named data sources per language plus a kind and decoding settings.

Three ways to name benchmarks (``--benchmark`` and ``run_eval(benchmarks=...)`` take any mix):

- a shipped sample by name: ``chat``, ``multiturn``, ``safety``, ``choice``, ``perplexity``
  (``chatvec benchmarks`` lists them with their languages);
- ``NAME=SOURCE:KIND:LANGUAGE``, e.g. ``vicuna-ko=data/vicuna_ko.jsonl:chat:ko``. SOURCE is a
  JSONL or Parquet file at any storage URI (local, ``s3://``, ...), a Hugging Face dataset
  ``dataset:ORG/NAME[:CONFIG][@SPLIT]`` (needs the ``datasets`` package; split defaults to
  ``test``), or for the ``lm-eval`` kind a comma-separated list of lm-evaluation-harness task
  names. Repeating a NAME with other languages adds languages to the same benchmark;
- a YAML file (``*.yaml`` / ``*.yml``) holding ``benchmarks:``, a list of full specs::

      benchmarks:
        - name: vicuna
          kind: chat
          data: {zh-Hant: s3://bucket/vicuna_zh_hant.jsonl, ko: data/vicuna_ko.jsonl}
          max_new_tokens: 1024
          repetition_penalty: 1.15
          system_prompt: null
          fields: {question: instruction}   # the kind's field name -> the name in your data
          limit: 80                         # at most this many items per language
          scripts: {}                       # language -> script, for languages no detector knows,
                                            # e.g. {toy-l1: Latin, toy-l2: Cyrillic}

The item fields each kind needs are in ``eval/kinds/<kind>.py`` and in ``chatvec benchmarks
--fields``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatvec.core.errors import InputError

logger = logging.getLogger(__name__)

SHIPPED_PREFIX = "shipped:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# shipped samples: name -> (kind, description); data in eval/data/<name>/<language>.jsonl
SHIPPED: dict[str, tuple[str, str]] = {
    "chat": ("chat", "open questions with reference answers (judged 0-10)"),
    "multiturn": ("multiturn", "two-turn conversations (second answer judged 0-10)"),
    "safety": ("safety", "harmful requests (unsafe rate by judge, refusal rate by phrases)"),
    "choice": ("choice", "multiple-choice general knowledge (log-likelihood accuracy)"),
    "perplexity": ("perplexity", "short passages of plain text (perplexity, bits per byte)"),
}


def check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value or ""):
        raise InputError(f"{what} {value!r} is not a valid name: use letters, digits, '.', '_' and '-'")
    return value


class BenchmarkSpec(BaseModel):
    """One benchmark: a kind, one data source per language, decoding and prompt settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    data: dict[str, str] = Field(description="language code -> data source")
    description: str = ""
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int = 0
    system_prompt: str | None = None
    chat_template: bool = True
    fields: dict[str, str] = Field(default_factory=dict, description="kind's field -> field in the data")
    limit: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific settings")
    # languages the language detector does not know, told apart by the script of their letters
    scripts: dict[str, str] = Field(default_factory=dict, description="language code -> Unicode script name")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-'")
        return v

    @field_validator("data")
    @classmethod
    def _languages(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("name at least one language and its data source")
        for lang in v:
            if not NAME_RE.match(lang):
                raise ValueError(f"language code {lang!r}: use letters, digits, '.', '_' and '-'")
        return v

    @property
    def languages(self) -> list[str]:
        return list(self.data)


class BenchmarkFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    benchmarks: list[BenchmarkSpec]


# -- shipped samples ------------------------------------------------------------------------------
def data_dir() -> str:
    return str(resources.files("chatvec.eval") / "data")


def source_path(source: str) -> str:
    """Where a data source is read from: shipped samples inside this installation."""
    if source.startswith(SHIPPED_PREFIX):
        return os.path.join(data_dir(), *source[len(SHIPPED_PREFIX) :].split("/"))
    return source


def absolute_source(source: str, base: str | None = None) -> str:
    """Local relative paths made absolute (against ``base`` or the working directory), so a
    Ray actor, whose working directory differs, reads the same file."""
    from chatvec.core.storage import is_local, local_path

    if source.startswith((SHIPPED_PREFIX, "dataset:")) or not is_local(source):
        return source
    path = local_path(source)
    return path if os.path.isabs(path) else os.path.abspath(os.path.join(base or os.getcwd(), path))


def shipped_benchmarks() -> list[BenchmarkSpec]:
    root = data_dir()
    specs = []
    for name, (kind, description) in SHIPPED.items():
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.endswith(".jsonl"))
        # "shipped:" is resolved where the data is read, so an actor on another machine finds
        # the copy in its own installation
        data = {f[: -len(".jsonl")]: f"{SHIPPED_PREFIX}{name}/{f}" for f in files}
        if data:
            specs.append(BenchmarkSpec(name=name, kind=kind, data=data, description=description))
    return specs


# -- parsing what the user named ------------------------------------------------------------------
def parse_benchmark(arg: str | BenchmarkSpec) -> list[BenchmarkSpec]:
    """Specs named by one ``--benchmark`` value (see the module docstring for the forms)."""
    if isinstance(arg, BenchmarkSpec):
        return [_absolute(arg, None)]
    arg = arg.strip()
    if arg.endswith((".yaml", ".yml")) and "=" not in arg:
        from chatvec.core.storage import is_local, local_path
        from chatvec.core.yamlconfig import load_model

        base = os.path.dirname(os.path.abspath(local_path(arg))) if is_local(arg) else None
        specs = load_model(arg, BenchmarkFile).benchmarks
        return [_absolute(s, base) for s in specs]
    if "=" in arg:
        name, rest = arg.split("=", 1)
        parts = rest.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise InputError(
                f"--benchmark {arg!r}: write NAME=SOURCE:KIND:LANGUAGE, e.g. vicuna=data/vicuna_ko.jsonl:chat:ko"
            )
        source, kind, language = parts
        check_name(name, "benchmark name")
        check_name(language, "language code")
        from chatvec.eval.kinds import kind_class

        kind_class(kind)
        return [_absolute(BenchmarkSpec(name=name, kind=kind, data={language: source}), None)]
    shipped = {s.name: s for s in shipped_benchmarks()}
    if arg in shipped:
        return [shipped[arg]]
    raise InputError(
        f"unknown benchmark {arg!r}; shipped ones are {', '.join(shipped)} "
        "(or give NAME=SOURCE:KIND:LANGUAGE, or a YAML file of benchmarks)"
    )


def _absolute(spec: BenchmarkSpec, base: str | None) -> BenchmarkSpec:
    if spec.kind == "lm-eval":  # its source names tasks, not files
        opts = dict(spec.options)
        if opts.get("include_path"):
            opts["include_path"] = absolute_source(opts["include_path"], base)
        return spec.model_copy(update={"options": opts})
    return spec.model_copy(update={"data": {k: absolute_source(v, base) for k, v in spec.data.items()}})


def resolve_benchmarks(benchmarks: Iterable[str | BenchmarkSpec] | None) -> list[BenchmarkSpec]:
    """All specs named (all shipped samples when None), with same-named specs joined by language."""
    if benchmarks is None:
        return shipped_benchmarks()
    merged: dict[str, BenchmarkSpec] = {}
    for arg in benchmarks:
        for spec in parse_benchmark(arg):
            if spec.name not in merged:
                merged[spec.name] = spec
                continue
            have = merged[spec.name]
            if have.kind != spec.kind:
                raise InputError(
                    f"benchmark {spec.name!r} is named twice with different kinds "
                    f"({have.kind}, {spec.kind}); give them different names"
                )
            clash = set(have.data) & set(spec.data)
            if clash and any(have.data[k] != spec.data[k] for k in clash):
                raise InputError(f"benchmark {spec.name!r} names two sources for {sorted(clash)}")
            merged[spec.name] = have.model_copy(update={"data": {**have.data, **spec.data}})
    if not merged:
        raise InputError("no benchmark named; omit --benchmark to run all shipped samples")
    return list(merged.values())


def filter_languages(
    specs: Sequence[BenchmarkSpec], languages: Iterable[str] | None
) -> list[tuple[BenchmarkSpec, str]]:
    """(spec, language) pairs to run; every requested language must be in some benchmark."""
    wanted = None if languages is None else list(dict.fromkeys(languages))
    pairs = []
    for spec in specs:
        for lang in spec.languages:
            if wanted is None or lang in wanted:
                pairs.append((spec, lang))
    if wanted is not None:
        have = {lang for spec in specs for lang in spec.languages}
        missing = [lang for lang in wanted if lang not in have]
        if missing:
            raise InputError(
                f"no benchmark has language(s) {', '.join(missing)}; the benchmarks named have "
                f"{', '.join(sorted(have)) or 'none'}"
            )
    return pairs
