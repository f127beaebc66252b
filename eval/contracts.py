"""The evaluation's contracts: the data that travels between the pipeline, the evaluators and
wherever cells run, and the interfaces of the pieces that run them.

Nothing here imports another chatvec.eval module: the pipeline (``chatvec.eval.pipeline``), the
evaluators (``chatvec.eval.runner``), the judges and the Ray layer all stand on this module, so
none of them needs another's internals to agree on a shape.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa


@dataclass(frozen=True)
class Cell:
    """One (model, language, benchmark) unit of work and of output."""

    model: str
    language: str
    benchmark: str
    # the benchmark's spec travels with the cell so an actor needs nothing else to run it
    spec: object = field(default=None, compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.language}/{self.benchmark}"

    def _rel(self, top: str, ext: str) -> str:
        return f"{top}/model={self.model}/language={self.language}/benchmark={self.benchmark}.{ext}"

    @property
    def samples_rel(self) -> str:
        return self._rel("samples", "parquet")

    @property
    def status_rel(self) -> str:
        return self._rel("status", "json")


DONE, FAILED, SKIPPED = "done", "failed", "skipped"
GENERATE, JUDGE = "generate", "judge"


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings that travel with the work to wherever it runs."""

    engine: str = "hf"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    gpus_per_engine: int = 1  # vLLM tensor_parallel_size
    max_new_tokens: int | None = None  # caps every benchmark's own setting, and the judge's (quick runs)
    judge_max_new_tokens: int = 2048  # room for a judge that reasons before it rates
    limit: int | None = None  # at most this many items per cell
    cache_dir: str | None = None  # local copies of remote models
    progress: bool = False  # per-batch progress bars inside a cell
    engine_options: dict = field(default_factory=dict)  # the engine's own settings (eval.vllm of the config)


@dataclass(frozen=True)
class RunContext:
    """What every evaluator of a run needs, wherever it runs (picklable: it goes to actors)."""

    out_uri: str
    run_id: str
    settings: RunSettings
    languages: tuple[str, ...]  # every language of the run (language detection compares them)
    judged: bool  # a judge will score the judged metrics
    judge_identity: str | None = None  # recorded in the identity of judged cells
    toxicity: str | None = None  # the toxicity scorer's spec (chatvec.eval.toxicity), loaded where cells run
    toxicity_identity: str | None = None  # recorded in the identity of toxicity cells


@dataclass
class ModelJob:
    """One model's cells, run by one evaluator that loads the model once."""

    model: str
    uri: str
    cells: list[Cell]
    identity: str | None = None  # chatvec.eval.identity.model_identity, or a merge fingerprint for swapped weights
    item_counts: dict[Cell, int] = field(default_factory=dict)  # items each cell runs (planning read them)


@dataclass
class CellResult:
    model: str
    language: str
    benchmark: str
    state: str  # done, failed, skipped
    stage: str  # generate or judge
    error: str | None = None
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.model}/{self.language}/{self.benchmark}"

    @classmethod
    def of(cls, cell: Cell, state: str, stage: str, **kw) -> CellResult:
        return cls(cell.model, cell.language, cell.benchmark, state, stage, **kw)


@dataclass
class EvalOutcome:
    run_id: str
    out_uri: str
    summary: pa.Table
    results: list[CellResult] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)  # model URI -> engine loads this run
    cells: int = 0
    redone: dict[str, list[str]] = field(default_factory=dict)  # cell key -> why it was computed again

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.state == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def counts(self) -> dict[str, int]:
        gen = [r for r in self.results if r.stage == GENERATE]
        return {
            "cells": self.cells,
            "generated": sum(r.state == DONE for r in gen),
            "skipped": sum(r.state == SKIPPED for r in gen),
            "judged": sum(r.state == DONE for r in self.results if r.stage == JUDGE),
            "failed": len(self.failed),
            "prompt_tokens": sum(r.prompt_tokens for r in self.results),
            "completion_tokens": sum(r.completion_tokens for r in self.results),
        }


class Progress:
    """Cells done / total and tokens per second, on one tqdm bar."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="cell", disable=not enabled or total == 0)
        self.start = time.perf_counter()
        self.tokens = 0
        self.failed = 0

    def update(self, result: CellResult) -> None:
        self.tokens += result.prompt_tokens + result.completion_tokens
        self.failed += result.state == FAILED
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s" + (f", {self.failed} failed" if self.failed else ""))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class CellExecutor(Protocol):
    """Runs cells somewhere. Each method returns the cells' results and the engine loads it made
    (model URI -> count)."""

    def start(self, settings: RunSettings) -> RunSettings:
        """Get ready (start Ray, check resources); may adjust the settings to what it found."""
        ...

    def generate(
        self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]: ...

    def judge(
        self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]: ...


# -- judges ---------------------------------------------------------------------------------------
@dataclass
class JudgeReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request failed (after any retries); ``text`` is then empty


@runtime_checkable
class JudgeBackend(Protocol):
    identity: str

    def judge(self, prompts: list[str], *, max_new_tokens: int, progress: bool = False) -> list[JudgeReply]:
        """One reply per prompt, in prompt order."""
        ...

    def close(self) -> None: ...
