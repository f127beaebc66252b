"""The evaluation, once: plan the cells, generate, judge, summarize.

The unit of work is a *cell*, (model, language, benchmark). ``run_pipeline`` is the whole run:

1. plan: names checked, benchmark data read and checked (bad data fails here, before any model
   loads), the run id claimed, the cells planned, each with the identity of its inputs
   (``chatvec.eval.identity``); a finished cell whose inputs changed is redone, and the run says why;
2. generate: per model, one evaluator loads the model's engine ONCE and runs that model's cells;
   each cell's samples file is written as soon as the cell is done;
3. judge: one judge backend (``chatvec.eval.judging``) fills in the judged metrics of every cell that
   waits for it (or was judged by another judge), rewriting those cells' files;
4. summarize: the summary table, written to ``summary.parquet``.

Where the cells run is a ``CellExecutor`` (``chatvec.eval.contracts``), chosen by the caller:
``chatvec.eval.runner.LocalCellExecutor`` runs them in this process;
``chatvec.cluster.eval_driver.RayExecutor`` on Ray actors. An executor only schedules: what a
cell does is ``chatvec.eval.runner.ModelEvaluator`` / ``JudgeRunner`` in both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa

from chatvec.core.errors import InputError
from chatvec.core.storage import Store
from chatvec.eval.benchmarks import BenchmarkSpec, check_name, filter_languages, resolve_benchmarks
from chatvec.eval.contracts import (
    GENERATE,
    SKIPPED,
    Cell,
    CellExecutor,
    CellResult,
    EvalOutcome,
    ModelJob,
    Progress,
    RunContext,
    RunSettings,
)
from chatvec.eval.gating import gates_of
from chatvec.eval.identity import CellIdentity, cell_identity, model_identity
from chatvec.eval.preflight import check_models
from chatvec.eval.results import (
    claim_run,
    identity_of,
    read_cell_identity,
    read_samples,
    summarize,
    write_samples,
    write_summary,
)
from chatvec.eval.schema import NEEDS_JUDGE, NOT_JUDGED, PENDING, samples_table

logger = logging.getLogger(__name__)


# -- planning -------------------------------------------------------------------------------------
def plan_cells(
    models: Mapping[str, str],
    benchmarks: Iterable[str | BenchmarkSpec] | None = None,
    languages: Iterable[str] | None = None,
) -> list[Cell]:
    """Every (model, language, benchmark) cell, model by model. ``benchmarks`` None = all shipped
    samples; ``languages`` None = every language each benchmark has."""
    if not models:
        raise InputError("name at least one model: --model NAME=URI")
    for name in models:
        check_name(name, "model name")
    pairs = filter_languages(resolve_benchmarks(benchmarks), languages)
    return [Cell(model, lang, spec.name, spec) for model in models for spec, lang in pairs]


def check_benchmark_data(cells: Sequence[Cell]) -> dict[tuple[str, str], list[dict]]:
    """Read every (benchmark, language) once so bad data fails before any model loads; returns
    the items by (benchmark, language)."""
    from chatvec.eval.items import load_items

    items: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        if (cell.benchmark, cell.language) not in items:
            items[(cell.benchmark, cell.language)] = load_items(cell.spec, cell.language)
    return items


def plan_run(
    models: Mapping[str, str], *, benchmarks, languages, store: Store, run_id: str | None
) -> tuple[str, list[Cell], dict[tuple[str, str], list[dict]]]:
    """The cells, with every benchmark's data checked before anything is written, then the run
    id claimed in ``store``: (run id, cells, items by (benchmark, language))."""
    cells = plan_cells(models, benchmarks, languages)
    items = check_benchmark_data(cells)
    check_models(models)  # unusable model folders fail the run before any model loads
    return claim_run(store, run_id), cells, items


def planned_identities(
    cells: Sequence[Cell],
    items: Mapping[tuple[str, str], list[dict]],
    model_ids: Mapping[str, str | None],
    settings: RunSettings,
    toxicity: str | None = None,
) -> dict[Cell, CellIdentity]:
    """The identity each cell would have if computed now."""
    out = {}
    for cell in cells:
        used = items[(cell.benchmark, cell.language)]
        if settings.limit:
            used = used[: settings.limit]
        out[cell] = cell_identity(
            model=model_ids.get(cell.model),
            spec=cell.spec,
            language=cell.language,
            items=used,
            settings=settings,
            toxicity=toxicity,
        )
    return out


def cells_to_generate(
    store: Store, cells: Sequence[Cell], planned: Mapping[Cell, CellIdentity] | None = None
) -> tuple[list[Cell], dict[str, list[str]]]:
    """The cells to compute: those without a samples file, and those whose recorded identity
    differs from ``planned`` (their stale file is removed, so its numbers cannot be summarized
    with the others). Returns (cells, {cell key: reasons}) for the redone ones."""
    todo, redone = [], {}
    for cell in cells:
        recorded = read_cell_identity(store, cell)
        if recorded is False:  # no samples file
            todo.append(cell)
            continue
        if planned is None:
            continue
        if recorded is None:
            reasons = ["no record of its inputs (written by an older chatvec)"]
        else:
            reasons = planned[cell].changes(recorded)
        if reasons:
            todo.append(cell)
            redone[cell.key] = reasons
            store.delete(cell.samples_rel)
    return todo, redone


def cells_to_judge(
    store: Store, cells: Sequence[Cell], judge_identity: str | None = None
) -> tuple[list[Cell], dict[str, list[str]]]:
    """Cells with rows waiting for a judge, and cells judged by another judge than this one. The
    latter's judgments are forgotten first (their rows wait again), so a judge phase that fails
    leaves them unscored, never scored by the old judge next to cells scored by the new one."""
    todo, rejudged = [], {}
    for cell in cells:
        table = read_samples(store, cell)
        if table is None:
            continue
        statuses = table.column("judge_status").to_pylist()
        judged = [s for s in statuses if s != NOT_JUDGED and s not in NEEDS_JUDGE]
        waiting = [s for s in statuses if s in NEEDS_JUDGE]
        recorded = identity_of(table)
        if judged and judge_identity is not None and (recorded is None or recorded.judge != judge_identity):
            write_samples(store, cell, forget_judgments(table), (recorded or CellIdentity()).with_judge(None))
            rejudged[cell.key] = ["the judge changed"]
            todo.append(cell)
        elif waiting:
            todo.append(cell)
    return todo, rejudged


def forget_judgments(table: pa.Table) -> pa.Table:
    """The samples with every judged row waiting for a judge again (score and judgment cleared)."""
    rows = table.to_pylist()
    for r in rows:
        if r["judge_status"] != NOT_JUDGED:
            r.update(score=None, judge_status=PENDING, judge_raw=None, judge_model=None, error=None)
    return samples_table(rows)


def languages_in_play(cells: Sequence[Cell]) -> tuple[str, ...]:
    return tuple(sorted({c.language for c in cells}))


def absolute_uri(uri: str) -> str:
    """A local path made absolute (actors run elsewhere); URIs and Hugging Face ids unchanged."""
    import os

    from chatvec.core.storage import is_local, local_path

    if not is_local(uri):
        return uri
    path = local_path(uri)
    if os.path.isabs(path) or (not os.path.exists(path) and path.count("/") == 1 and not path.startswith(".")):
        return path  # absolute already, or an org/name repo id
    return os.path.abspath(path)


def absolute_run_args(models: Mapping[str, str], judge: str | None, out_uri: str):
    return (
        {k: absolute_uri(v) for k, v in models.items()},
        absolute_uri(judge) if judge else None,
        absolute_uri(out_uri),
    )


def _merge_loads(total: dict[str, int], more: Mapping[str, int]) -> None:
    for uri, n in more.items():
        if n:
            total[uri] = total.get(uri, 0) + n


def _tell_redone(redone: Mapping[str, list[str]], what: str) -> None:
    for key, reasons in redone.items():
        logger.warning("%s %s again: %s", what, key, "; ".join(reasons))


# -- the run --------------------------------------------------------------------------------------
def run_pipeline(
    models: Mapping[str, str],
    *,
    benchmarks=None,
    languages=None,
    judge: str | None = None,
    out_uri: str,
    run_id: str | None = None,
    settings: RunSettings = RunSettings(),  # noqa: B008 - frozen, so one shared default is safe
    executor: CellExecutor,
    show_progress: bool = True,
    model_identities: Mapping[str, str] | None = None,
    toxicity: str | None = None,
) -> EvalOutcome:
    """Evaluate ``models`` ({name: uri}) on benchmarks x languages into ``out_uri``, cells run by
    ``executor``. ``model_identities`` overrides the identity of named
    models (weights swapped into an engine carry their merge fingerprint)."""
    from chatvec.eval.judging import judge_identity
    from chatvec.eval.toxicity_scorers import absolute_toxicity, toxicity_identity

    models, judge, out_uri = absolute_run_args(models, judge, out_uri)
    toxicity = absolute_toxicity(toxicity)
    # an unknown scorer or a missing key fails here, before anything is written or loaded
    scorer_id = toxicity_identity(toxicity) if toxicity else None
    store = Store(out_uri)  # the run's one Store for its output
    run_id, cells, items = plan_run(models, benchmarks=benchmarks, languages=languages, store=store, run_id=run_id)
    ids = {m: (model_identities or {}).get(m) or model_identity(uri) for m, uri in models.items()}
    planned = planned_identities(cells, items, ids, settings, scorer_id)
    todo, redone = cells_to_generate(store, cells, planned)
    _tell_redone(redone, "computing")
    settings = executor.start(settings)
    run = RunContext(
        out_uri=out_uri,
        run_id=run_id,
        settings=settings,
        languages=languages_in_play(cells),
        judged=judge is not None,
        judge_identity=judge_identity(judge, settings) if judge else None,
        toxicity=toxicity,
        toxicity_identity=scorer_id,
    )
    todo_set = set(todo)
    results = [CellResult.of(c, SKIPPED, GENERATE) for c in cells if c not in todo_set]
    loads: dict[str, int] = {}
    counts = {c: len(items[(c.benchmark, c.language)][: settings.limit or None]) for c in todo}
    jobs = [
        ModelJob(m, uri, [c for c in todo if c.model == m], ids[m], {c: n for c, n in counts.items() if c.model == m})
        for m, uri in models.items()
    ]
    jobs = [j for j in jobs if j.cells]
    if jobs:
        progress = Progress(len(todo), "eval", show_progress)
        try:
            got, made = executor.generate(run, jobs, progress)
        finally:
            progress.close()
        results += got
        _merge_loads(loads, made)
    if judge is not None:
        pending, rejudged = cells_to_judge(store, cells, run.judge_identity)
        _tell_redone({k: v for k, v in rejudged.items() if k not in redone}, "judging")
        for key, reasons in rejudged.items():
            redone.setdefault(key, []).extend(r for r in reasons if r not in redone.get(key, []))
        if pending:
            progress = Progress(len(pending), "judge", show_progress)
            try:
                got, made = executor.judge(run, judge, pending, progress)
            finally:
                progress.close()
            results += got
            _merge_loads(loads, made)
    summary = summarize(store, run_id, gates=gates_of(c.spec for c in cells))
    write_summary(store, summary)
    return EvalOutcome(
        run_id=run_id, out_uri=out_uri, summary=summary, results=results, loads=loads, cells=len(cells), redone=redone
    )
