"""What a cell does, wherever it runs: the evaluator (one model's cells) and the judge runner
(the judge phase of whole cells), plus ``LocalCellExecutor``, which runs them in this process.

The Ray actors in ``cluster/eval_driver.py`` hold the same two classes; the sequence of phases
is ``chatvec.eval.pipeline.run_pipeline``. A failure inside a cell (an exception, a model that does not
load) is written to the cell's status record and returned as a failed result; it never stops
the other cells.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence

from chatvec.core.errors import DiskFullError
from chatvec.core.storage import Store
from chatvec.eval.benchmarks import BenchmarkSpec
from chatvec.eval.chunks import Chunk, ChunkRows
from chatvec.eval.contracts import (
    DONE,
    FAILED,
    GENERATE,
    JUDGE,
    SKIPPED,
    Cell,
    CellResult,
    JudgeBackend,
    ModelJob,
    Progress,
    RunContext,
    RunSettings,
)
from chatvec.eval.engines.base import Engine
from chatvec.eval.identity import CellIdentity, cell_identity, model_identity
from chatvec.eval.results import elapsed, identity_of, now, read_samples, write_samples, write_status
from chatvec.eval.schema import JUDGE_ERROR, NEEDS_JUDGE, NOT_JUDGED, samples_table

logger = logging.getLogger(__name__)


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


class _LoadedOnce:
    """Something loaded once (a model's engine, a judge) and used for a series of cells. A load
    that failed is not tried again for every cell: each of them reports the first error."""

    load_error: str | None = None
    loads: Counter  # model URI -> loads this object made (an engine it was handed counts none)

    def _loaded(self) -> bool:
        raise NotImplementedError

    def _what(self) -> str:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def _one(self, cell: Cell) -> CellResult:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        if self._loaded():
            return
        if self.load_error is not None:
            raise RuntimeError(f"{self._what()} did not load: {self.load_error}")
        try:
            self.load()
        except Exception as exc:
            self.load_error = error_text(exc)
            raise
        self._count_load()

    def _count_load(self) -> None:
        raise NotImplementedError

    def run_all(self, cells: Sequence[Cell], on_result=None) -> list[CellResult]:
        out = []
        for cell in cells:
            result = self._one(cell)
            out.append(result)
            if on_result:
                on_result(result)
        return out


# -- generation -----------------------------------------------------------------------------------
class ModelEvaluator(_LoadedOnce):
    """One model's engine and that model's cells: load once (or borrow a loaded engine), run many.

    ``engine``: an engine that is already loaded (weights swapped in place for an in-engine sweep):
    it is used as is and left open by ``close``. ``engine_factory``: how to load one (default:
    ``settings.engine`` on ``uri``). ``identity``: the model's identity recorded with each cell
    (default: computed from the files at ``uri``). ``loads`` counts the engines it loaded.
    """

    def __init__(
        self,
        model: str,
        uri: str,
        *,
        run: RunContext,
        store: Store | None = None,
        identity: str | None = None,
        engine: Engine | None = None,
        engine_factory: Callable[[], Engine] | None = None,
    ) -> None:
        self.run = run
        self.model, self.uri = model, uri
        self.settings = self.run.settings
        self.store = store or Store(self.run.out_uri)
        self.identity = identity
        self.engine = engine
        self._owns_engine = engine is None
        self._factory = engine_factory or self._load_engine
        self.load_error: str | None = None
        self.loads: Counter = Counter()
        self._scorers: dict[tuple, object] = {}
        self._toxicity = None  # the run's toxicity scorer, loaded for the first cell that needs it
        self._chunked: dict[Cell, tuple[list[dict], CellIdentity]] = {}  # items read once per chunked cell

    # -- the engine -------------------------------------------------------------------------------
    def _load_engine(self) -> Engine:
        from chatvec.eval.engines import load_engine_for

        return load_engine_for(self.settings, self.uri)

    def load(self) -> None:
        self.engine = self._factory()

    def _count_load(self) -> None:
        self.loads[self.uri] += 1

    def _loaded(self) -> bool:
        return self.engine is not None

    def _what(self) -> str:
        return f"model {self.uri}"

    def _one(self, cell: Cell) -> CellResult:
        return self.run_cell(cell)

    def close(self) -> None:
        if self.engine is not None and self._owns_engine:
            self.engine.close()
        self.engine = None
        if self._toxicity is not None:
            self._toxicity.close()
            self._toxicity = None

    def toxicity(self):
        """The run's toxicity scorer (chatvec.eval.toxicity), loaded once in this evaluator; None
        when the run has none."""
        if self._toxicity is None and self.run.toxicity:
            from chatvec.eval.toxicity_scorers import make_toxicity

            self._toxicity = make_toxicity(self.run.toxicity, self.settings)
        return self._toxicity

    # -- cells ------------------------------------------------------------------------------------

    def run_cell(self, cell: Cell) -> CellResult:
        """Run one cell and write its samples; any failure is recorded, not raised."""
        start = time.perf_counter()
        try:
            self.ensure_loaded()
            rows, identity = self._rows_and_identity(cell)
            write_samples(self.store, cell, samples_table(rows), identity)
        except DiskFullError:  # no other cell could be written either: stop with the one clear error
            raise
        except Exception as exc:  # a cell's failure must not stop the others
            error = error_text(exc)
            logger.error("cell %s failed: %s", cell.key, error)
            logger.debug("%s", traceback.format_exc())
            write_status(self.store, cell, FAILED, stage=GENERATE, error=error, run_id=self.run.run_id)
            return CellResult.of(cell, FAILED, GENERATE, error=error, seconds=elapsed(start))
        per_item = one_row_per_item(rows)
        result = CellResult.of(
            cell,
            DONE,
            GENERATE,
            rows=len(rows),
            seconds=elapsed(start),
            prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in per_item),
            completion_tokens=sum(r.get("completion_tokens") or 0 for r in per_item),
        )
        write_status(
            self.store,
            cell,
            DONE,
            stage=GENERATE,
            run_id=self.run.run_id,
            rows=result.rows,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            seconds=result.seconds,
            engine=self.settings.engine,
            model_uri=self.uri,
        )
        return result

    def fidelity(self, spec: BenchmarkSpec):
        """The language scorer for a benchmark: the run's languages, plus a script detector for
        the languages the benchmark says are told apart by script (``scripts``)."""
        from chatvec.eval.fidelity import FidelityScorer, ScriptDetector

        key = tuple(sorted(spec.scripts.items()))
        if key not in self._scorers:
            detector = ScriptDetector(dict(spec.scripts)) if spec.scripts else None
            self._scorers[key] = FidelityScorer(self.run.languages, detectors={lang: detector for lang in spec.scripts})
        return self._scorers[key]

    def run_chunk(self, chunk: Chunk) -> ChunkRows:
        """Run one chunk of a cell (its items ``start:stop``) and return the rows, with the whole
        cell's identity; nothing is written (the collector writes the cell once, whole). Any
        failure is returned, not raised."""
        start = time.perf_counter()
        try:
            self.ensure_loaded()
            rows, identity = self._rows_and_identity(chunk.cell, span=(chunk.start, chunk.stop))
        except Exception as exc:  # a chunk's failure fails its cell, never the other cells
            return ChunkRows(chunk, error=error_text(exc), seconds=elapsed(start))
        per_item = one_row_per_item(rows)
        return ChunkRows(
            chunk,
            rows,
            identity,
            prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in per_item),
            completion_tokens=sum(r.get("completion_tokens") or 0 for r in per_item),
            seconds=elapsed(start),
        )

    def _rows_and_identity(self, cell: Cell, span: tuple[int, int] | None = None) -> tuple[list[dict], CellIdentity]:
        from chatvec.eval.items import load_items
        from chatvec.eval.kinds import get_kind
        from chatvec.eval.kinds.base import CellContext
        from chatvec.eval.prompts import Prompts

        spec: BenchmarkSpec = cell.spec
        kind = get_kind(spec.kind)
        if cell in self._chunked:  # another chunk of a cell this engine has run a chunk of
            items, identity = self._chunked[cell]
        else:
            items = load_items(spec, cell.language)
            if self.settings.limit:
                items = items[: self.settings.limit]
            if self.identity is None:
                self.identity = model_identity(self.uri)
            identity = cell_identity(
                model=self.identity,
                spec=spec,
                language=cell.language,
                items=items,
                settings=self.settings,
                toxicity=self.run.toxicity_identity,
            )
            if span is not None:
                self._chunked[cell] = (items, identity)
        if span is not None:  # a chunk: the identity above is the whole cell's
            items = items[span[0] : span[1]]
        ctx = CellContext(
            engine=self.engine,
            prompts=Prompts(self.engine.tokenizer, model_name=self.model, use_template=spec.chat_template),
            fidelity=self.fidelity(spec),
            spec=spec,
            language=cell.language,
            judge=self.run.judged,
            max_new_tokens=self.settings.max_new_tokens,
            progress=self.settings.progress,
            toxicity=self.toxicity() if kind.uses_toxicity else None,
        )
        rows = kind.run(items, ctx)
        created = now()
        for r in rows:
            r.update(
                run_id=self.run.run_id,
                model=cell.model,
                language=cell.language,
                benchmark=cell.benchmark,
                kind=spec.kind,
                engine=self.settings.engine,
                created_at=created,
            )
        return rows, identity


def one_row_per_item(rows: list[dict]) -> list[dict]:
    """The first row of each item: token counts repeat on every metric row of an item."""
    seen, out = set(), []
    for r in rows:
        if r["item_id"] not in seen:
            seen.add(r["item_id"])
            out.append(r)
    return out


# -- the judge phase ------------------------------------------------------------------------------
class JudgeRunner(_LoadedOnce):
    """Holds one judge backend (``chatvec.eval.judging``) and scores the judged metrics of whole cells.

    Rows waiting for a judge are judged; when the cell was judged by another judge than this
    run's (its recorded identity says so), every judged row is judged again."""

    def __init__(
        self, judge: str, *, run: RunContext, store: Store | None = None, backend: JudgeBackend | None = None
    ) -> None:
        """``backend``: a judge backend made already (``judge`` then only names it)."""
        self.spec = judge
        self.run = run
        self.settings = self.run.settings
        self.store = store or Store(self.run.out_uri)
        self.backend = backend
        self.load_error: str | None = None
        self.loads: Counter = Counter()

    @property
    def engine(self):
        """The local judge's engine, when the backend has one (None before loading)."""
        return getattr(self.backend, "engine", None)

    def load(self) -> None:
        from chatvec.eval.judging import make_judge

        self.backend = make_judge(self.spec, self.settings)

    def _count_load(self) -> None:
        if self.engine is not None:  # a local judge model; an API judge loads nothing
            self.loads[self.spec] += 1

    def _loaded(self) -> bool:
        return self.backend is not None

    def _what(self) -> str:
        return f"judge {self.spec}"

    def use_run(self, run: RunContext) -> None:
        """Judge the cells of ``run`` from now on, keeping the judge loaded (a caller that keeps one
        judge for several calls: a search, or a kept judge actor)."""
        if run.out_uri != self.run.out_uri:
            self.store = Store(run.out_uri)
        self.run = run

    def _one(self, cell: Cell) -> CellResult:
        return self.judge_cell(cell)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def judge_cell(self, cell: Cell) -> CellResult:
        start = time.perf_counter()
        try:
            self.ensure_loaded()
            table = read_samples(self.store, cell)
            if table is None:
                return CellResult.of(cell, SKIPPED, JUDGE, error="no samples to judge")
            identity = identity_of(table) or CellIdentity()
            again = self.run.judge_identity is not None and identity.judge != self.run.judge_identity
            rows, tokens = self._judge_rows(table.to_pylist(), again=again)
            write_samples(self.store, cell, samples_table(rows), identity.with_judge(self.run.judge_identity))
        except DiskFullError:  # as for generation: stop, the rerun resumes
            raise
        except Exception as exc:
            error = error_text(exc)
            logger.error("judging cell %s failed: %s", cell.key, error)
            write_status(self.store, cell, FAILED, stage=JUDGE, error=error, run_id=self.run.run_id)
            return CellResult.of(cell, FAILED, JUDGE, error=error, seconds=elapsed(start))
        judged = [r for r in rows if r["judge_model"] == self.backend.identity]
        write_status(
            self.store,
            cell,
            DONE,
            stage=JUDGE,
            run_id=self.run.run_id,
            rows=len(rows),
            judged=len(judged),
            judge=self.backend.identity,
            seconds=elapsed(start),
        )
        return CellResult.of(
            cell,
            DONE,
            JUDGE,
            rows=len(judged),
            seconds=elapsed(start),
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
        )

    def _judge_rows(self, rows: list[dict], *, again: bool = False) -> tuple[list[dict], tuple[int, int]]:
        from chatvec.eval.judging import judge_budget
        from chatvec.eval.kinds import get_kind

        todo, prompts = [], []
        budget = judge_budget(self.settings)
        for r in rows:
            waiting = r["judge_status"] in NEEDS_JUDGE or (again and r["judge_status"] != NOT_JUDGED)
            if not waiting:
                continue
            text = get_kind(r["kind"]).judge_prompt(r)
            if text is None:
                continue
            todo.append(r)
            prompts.append(text)
        if not todo:
            return rows, (0, 0)
        replies = self.backend.judge(prompts, max_new_tokens=budget, progress=self.settings.progress)
        for r, reply in zip(todo, replies):
            if reply.error is not None:
                score, status, error = None, JUDGE_ERROR, reply.error
            else:
                try:
                    score, status = get_kind(r["kind"]).read_judgment(r, reply.text)
                    error = None
                except Exception as exc:  # a kind's reader failing on odd text marks the row, not the cell
                    score, status, error = None, JUDGE_ERROR, error_text(exc)
            r.update(
                score=score, judge_status=status, judge_raw=reply.text, judge_model=self.backend.identity, error=error
            )
        return rows, (sum(x.prompt_tokens for x in replies), sum(x.completion_tokens for x in replies))


# -- in this process ------------------------------------------------------------------------------
class LocalCellExecutor:
    """Runs every cell in this process, one model at a time (``--workers 0``), on the run's Store."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store

    def _store(self, run: RunContext) -> Store:
        if self.store is None:
            self.store = Store(run.out_uri)
        return self.store

    def start(self, settings: RunSettings) -> RunSettings:
        return settings

    def generate(
        self, run: RunContext, jobs: Sequence[ModelJob], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]:
        store = self._store(run)
        results: list[CellResult] = []
        loads: Counter = Counter()
        for job in jobs:
            evaluator = ModelEvaluator(job.model, job.uri, run=run, store=store, identity=job.identity)
            try:
                results += evaluator.run_all(job.cells, on_result=progress.update)
            finally:
                evaluator.close()
                loads += evaluator.loads
        return results, dict(loads)

    def judge(
        self, run: RunContext, judge: str, cells: Sequence[Cell], progress: Progress
    ) -> tuple[list[CellResult], dict[str, int]]:
        runner = JudgeRunner(judge, run=run, store=self._store(run))
        try:
            results = runner.run_all(cells, on_result=progress.update)
        finally:
            runner.close()
        return results, dict(runner.loads)
