"""Running an evaluation, in plain Python: used as is in-process and wrapped by the Ray actors.

The unit of work is a *cell*, (model, language, benchmark). A run is

1. ``prepare_run``: names checked, benchmark data read and checked (bad data fails here, before
   any model loads), the run id claimed, the cells planned;
2. generation: per model, a ``ModelEvaluator`` loads the model's engine ONCE and runs every cell
   of that model; each cell's samples file is written as soon as the cell is done;
3. the judge phase: a ``JudgeRunner`` loads the judge ONCE and fills in the judged metrics of
   every cell that waits for it, rewriting those cells' files;
4. ``summarize``: the summary table, written to ``summary.parquet``.

A cell whose samples file exists is not generated again; a failure (an exception in a cell, a
model that does not load) is written to the cell's status record and the other cells go on.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from eval.benchmarks import BenchmarkSpec, check_name, filter_languages, resolve_benchmarks
from eval.results import (  # noqa: F401  (summarize is part of this module's API)
    Cell,
    claim_run,
    elapsed,
    has_samples,
    needs_judge,
    now,
    read_samples,
    summarize,
    write_samples,
    write_status,
    write_summary,
)
from eval.schema import JUDGE_ERROR, NEEDS_JUDGE, samples_table
from merge.errors import InputError
from merge.storage import Store

logger = logging.getLogger(__name__)

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
    judge_max_new_tokens: int = 512
    limit: int | None = None  # at most this many items per cell
    cache_dir: str | None = None  # local copies of remote models
    progress: bool = False  # per-batch progress bars inside a cell


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
    def of(cls, cell: Cell, state: str, stage: str, **kw) -> "CellResult":
        return cls(cell.model, cell.language, cell.benchmark, state, stage, **kw)


@dataclass
class EvalOutcome:
    run_id: str
    out_uri: str
    summary: pa.Table
    results: list[CellResult] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)  # model URI -> engine loads this run
    cells: int = 0

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


# -- planning -------------------------------------------------------------------------------------
def plan_cells(models: Mapping[str, str], benchmarks: Iterable[str | BenchmarkSpec] | None = None,
               languages: Iterable[str] | None = None) -> list[Cell]:
    """Every (model, language, benchmark) cell, model by model. ``benchmarks`` None = all shipped
    samples; ``languages`` None = every language each benchmark has."""
    if not models:
        raise InputError("name at least one model: --model NAME=URI")
    for name in models:
        check_name(name, "model name")
    pairs = filter_languages(resolve_benchmarks(benchmarks), languages)
    return [Cell(model, lang, spec.name, spec) for model in models for spec, lang in pairs]


def check_benchmark_data(cells: Sequence[Cell]) -> None:
    """Read every (benchmark, language) once so bad data fails before any model loads."""
    from eval.items import load_items

    seen = set()
    for cell in cells:
        if (cell.benchmark, cell.language) not in seen:
            seen.add((cell.benchmark, cell.language))
            load_items(cell.spec, cell.language)


def prepare_run(models: Mapping[str, str], *, benchmarks=None, languages=None, out_uri: str,
                run_id: str | None = None, check_data: bool = True) -> tuple[str, list[Cell]]:
    cells = plan_cells(models, benchmarks, languages)
    if check_data:
        check_benchmark_data(cells)
    return claim_run(Store(out_uri), run_id), cells


def cells_to_generate(out_uri: str, cells: Sequence[Cell]) -> list[Cell]:
    store = Store(out_uri)
    return [c for c in cells if not has_samples(store, c)]


def cells_to_judge(out_uri: str, cells: Sequence[Cell]) -> list[Cell]:
    store = Store(out_uri)
    todo = []
    for c in cells:
        table = read_samples(store, c)
        if table is not None and needs_judge(table):
            todo.append(c)
    return todo


def absolute_uri(uri: str) -> str:
    """A local path made absolute (actors run elsewhere); URIs and Hugging Face ids unchanged."""
    import os

    from merge.storage import is_local, local_path

    if not is_local(uri):
        return uri
    path = local_path(uri)
    if os.path.isabs(path) or (not os.path.exists(path) and path.count("/") == 1 and not path.startswith(".")):
        return path  # absolute already, or an org/name repo id
    return os.path.abspath(path)


def absolute_run_args(models: Mapping[str, str], judge: str | None, out_uri: str):
    return ({k: absolute_uri(v) for k, v in models.items()}, absolute_uri(judge) if judge else None,
            absolute_uri(out_uri))


def languages_in_play(cells: Sequence[Cell]) -> tuple[str, ...]:
    return tuple(sorted({c.language for c in cells}))


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


class _EngineHolder:
    """One engine (for ``uri``, with ``settings``), loaded once and used for a series of cells."""

    uri: str
    settings: RunSettings
    engine = None
    load_error: str | None = None

    def load(self) -> None:
        self._load_engine()

    def ensure_loaded(self) -> None:
        """Load once; a model that failed to load is not tried again for every cell."""
        if self.engine is not None:
            return
        if self.load_error is not None:
            raise RuntimeError(f"model {self.uri} did not load: {self.load_error}")
        try:
            self.load()
        except Exception as exc:
            self.load_error = _error_text(exc)
            raise

    def _load_engine(self) -> None:
        from eval.engines import load_engine

        s = self.settings
        self.engine = load_engine(s.engine, self.uri, device=s.device, dtype=s.dtype, batch_size=s.batch_size,
                                  gpus=s.gpus_per_engine, cache_dir=s.cache_dir)

    def _one(self, cell: Cell) -> CellResult:
        raise NotImplementedError

    def run_all(self, cells: Sequence[Cell], on_result=None) -> list[CellResult]:
        out = []
        for cell in cells:
            result = self._one(cell)
            out.append(result)
            if on_result:
                on_result(result)
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# -- generation -----------------------------------------------------------------------------------
class ModelEvaluator(_EngineHolder):
    """Holds one model's engine and runs that model's cells. Load once, run many, close."""

    def __init__(self, model: str, uri: str, *, out_uri: str, run_id: str, settings: RunSettings,
                 languages: Sequence[str], judge: bool) -> None:
        self.model, self.uri = model, uri
        self.store = Store(out_uri)
        self.run_id = run_id
        self.settings = settings
        self.judge = judge
        self.engine = None
        self.load_error = None
        from eval.fidelity import FidelityScorer

        self.fidelity = FidelityScorer(languages)

    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell and write its samples; any failure is recorded, not raised."""
        start = time.perf_counter()
        try:
            self.ensure_loaded()
            rows = self._rows(cell)
            write_samples(self.store, cell, samples_table(rows))
        except Exception as exc:  # a cell's failure must not stop the others
            error = _error_text(exc)
            logger.error("cell %s failed: %s", cell.key, error)
            logger.debug("%s", traceback.format_exc())
            write_status(self.store, cell, FAILED, stage=GENERATE, error=error, run_id=self.run_id)
            return CellResult.of(cell, FAILED, GENERATE, error=error, seconds=elapsed(start))
        result = CellResult.of(
            cell, DONE, GENERATE, rows=len(rows), seconds=elapsed(start),
            prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in _first_per_item(rows)),
            completion_tokens=sum(r.get("completion_tokens") or 0 for r in _first_per_item(rows)),
        )
        write_status(self.store, cell, DONE, stage=GENERATE, run_id=self.run_id, rows=result.rows,
                     prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     seconds=result.seconds, engine=self.settings.engine, model_uri=self.uri)
        return result

    def _rows(self, cell: Cell) -> list[dict]:
        from eval.items import load_items
        from eval.kinds import get_kind
        from eval.kinds.base import CellContext
        from eval.prompts import Prompts

        spec: BenchmarkSpec = cell.spec
        kind = get_kind(spec.kind)
        items = load_items(spec, cell.language)
        if self.settings.limit:
            items = items[: self.settings.limit]
        ctx = CellContext(
            engine=self.engine,
            prompts=Prompts(self.engine.tokenizer, model_name=self.model, use_template=spec.chat_template),
            fidelity=self.fidelity, spec=spec, language=cell.language, judge=self.judge,
            max_new_tokens=self.settings.max_new_tokens, progress=self.settings.progress,
        )
        rows = kind.run(items, ctx)
        created = now()
        for r in rows:
            r.update(run_id=self.run_id, model=cell.model, language=cell.language, benchmark=cell.benchmark,
                     kind=spec.kind, engine=self.settings.engine, created_at=created)
        return rows

    def _one(self, cell: Cell) -> CellResult:
        return self.run_cell(cell)


def _first_per_item(rows: list[dict]) -> list[dict]:
    """One row per item: token counts repeat on every metric row of an item."""
    seen, out = set(), []
    for r in rows:
        if r["item_id"] not in seen:
            seen.add(r["item_id"])
            out.append(r)
    return out


# -- the judge phase ------------------------------------------------------------------------------
class JudgeRunner(_EngineHolder):
    """Holds the judge model's engine and scores the judged metrics of whole cells."""

    def __init__(self, judge_uri: str, *, out_uri: str, run_id: str, settings: RunSettings) -> None:
        self.uri = judge_uri
        self.store = Store(out_uri)
        self.run_id = run_id
        self.settings = settings
        self.engine = None
        self.load_error = None
        self.prompts = None

    def load(self) -> None:
        from eval.prompts import Prompts

        self._load_engine()
        self.prompts = Prompts(self.engine.tokenizer, model_name=f"judge {self.uri}")

    def judge_cell(self, cell: Cell) -> CellResult:
        start = time.perf_counter()
        try:
            self.ensure_loaded()
            table = read_samples(self.store, cell)
            if table is None:
                return CellResult.of(cell, SKIPPED, JUDGE, error="no samples to judge")
            rows, tokens = self._judge_rows(table.to_pylist())
            write_samples(self.store, cell, samples_table(rows))
        except Exception as exc:
            error = _error_text(exc)
            logger.error("judging cell %s failed: %s", cell.key, error)
            write_status(self.store, cell, FAILED, stage=JUDGE, error=error, run_id=self.run_id)
            return CellResult.of(cell, FAILED, JUDGE, error=error, seconds=elapsed(start))
        judged = [r for r in rows if r["judge_model"] == self.uri]
        write_status(self.store, cell, DONE, stage=JUDGE, run_id=self.run_id, rows=len(rows), judged=len(judged),
                     judge=self.uri, seconds=elapsed(start))
        return CellResult.of(cell, DONE, JUDGE, rows=len(judged), seconds=elapsed(start),
                             prompt_tokens=tokens[0], completion_tokens=tokens[1])

    def _judge_rows(self, rows: list[dict]) -> tuple[list[dict], tuple[int, int]]:
        from eval.engines.base import Decoding, GenerationRequest
        from eval.kinds import get_kind

        todo, requests = [], []
        cap = self.settings.max_new_tokens
        n = self.settings.judge_max_new_tokens
        dec = Decoding(max_new_tokens=min(n, cap) if cap else n)
        for r in rows:
            if r["judge_status"] not in NEEDS_JUDGE:
                continue
            text = get_kind(r["kind"]).judge_prompt(r)
            if text is None:
                continue
            _, ids = self.prompts.chat_ids(self.prompts.conversation([("user", text)]))
            todo.append(r)
            requests.append(GenerationRequest(ids, dec))
        if not todo:
            return rows, (0, 0)
        gens = self.engine.generate(requests, progress=self.settings.progress)
        for r, gen in zip(todo, gens):
            try:
                score, status = get_kind(r["kind"]).read_judgment(r, gen.text)
                error = None
            except Exception as exc:  # a kind's reader failing on odd text marks the row, not the cell
                score, status, error = None, JUDGE_ERROR, _error_text(exc)
            r.update(score=score, judge_status=status, judge_raw=gen.text, judge_model=self.uri, error=error)
        return rows, (sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens))

    def _one(self, cell: Cell) -> CellResult:
        return self.judge_cell(cell)


# -- progress -------------------------------------------------------------------------------------
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


# -- in-process run -------------------------------------------------------------------------------
def run_in_process(models: Mapping[str, str], *, benchmarks=None, languages=None, judge: str | None = None,
                   out_uri: str, run_id: str | None = None, settings: RunSettings = RunSettings(),
                   show_progress: bool = True) -> EvalOutcome:
    """The whole run in this process, one model at a time (``--workers 0``)."""
    from eval.engines import LOAD_COUNTS

    models, judge, out_uri = absolute_run_args(models, judge, out_uri)
    run_id, cells = prepare_run(models, benchmarks=benchmarks, languages=languages, out_uri=out_uri, run_id=run_id)
    loads_before = dict(LOAD_COUNTS)
    todo = cells_to_generate(out_uri, cells)
    results = [CellResult.of(c, SKIPPED, GENERATE) for c in cells if c not in set(todo)]
    langs = languages_in_play(cells)
    progress = Progress(len(todo), "eval", show_progress)
    for model, uri in models.items():
        mine = [c for c in todo if c.model == model]
        if not mine:
            continue
        evaluator = ModelEvaluator(model, uri, out_uri=out_uri, run_id=run_id, settings=settings,
                                   languages=langs, judge=judge is not None)
        try:
            results += evaluator.run_all(mine, on_result=progress.update)
        finally:
            evaluator.close()
    progress.close()
    if judge is not None:
        pending = cells_to_judge(out_uri, cells)
        if pending:
            progress = Progress(len(pending), "judge", show_progress)
            runner = JudgeRunner(judge, out_uri=out_uri, run_id=run_id, settings=settings)
            try:
                results += runner.run_all(pending, on_result=progress.update)
            finally:
                runner.close()
                progress.close()
    summary = summarize(out_uri, run_id)
    write_summary(out_uri, summary)
    loads = {uri: LOAD_COUNTS[uri] - loads_before.get(uri, 0) for uri in LOAD_COUNTS
             if LOAD_COUNTS[uri] - loads_before.get(uri, 0)}
    return EvalOutcome(run_id=run_id, out_uri=out_uri, summary=summary, results=results, loads=loads, cells=len(cells))
