"""`chatvec tune` end to end on the toy world with the hf engine, in this process: a real optuna
study, trials swapped into one engine, the finalists on held-out test items, recipe files that
`chatvec merge --recipe` reproduces, and a rerun that resumes without recomputing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from chatvec.core.config import ChatvecConfig
from chatvec.core.storage import Store
from chatvec.runs.tune_config import load_tune
from chatvec.runs.tune_run import run_tune

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "demo" / "toyworld" / "checkpoints"
CONFIG = ChatvecConfig()
TUNE = """\
name: t
vectors:
  toy: {{base: {world}/base, chat: {world}/chat}}
targets:
  - {{language: toy-l2, cp: {world}/cp, benchmarks: [{world}/benchmarks.yaml]}}
ratios: [1.25]
embeddings: [skip]
baselines: {{cp: true, chat: false}}
engine: hf
device: cpu
root: {root}
eval: {{limit: 16, max_new_tokens: 16}}
search:
  space:
    ratios: {{toy: [0.5, 2.0]}}
    embeddings: [all, skip]
  objective: {{metric: exact_match, direction: maximize}}
  constraints: ["closed >= cp"]
  trials: {trials}
  seed: 3
  top_k: 2
"""


def write(tmp: Path, trials: int = 3, name: str = "t") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(TUNE.format(world=TOY.as_posix(), root=(tmp / "store").as_posix(), trials=trials))
    return path


def sample_mtimes(root: Path, run_id: str) -> dict[str, int]:
    base = root / "results" / f"run={run_id}" / "samples"
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in base.rglob("*.parquet")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    path = write(tmp)
    lines: list[str] = []
    outcome = run_tune(load_tune(str(path)), source=str(path), run_id="r", config=CONFIG, workers=0, echo=lines.append)
    return tmp, path, outcome, lines, sample_mtimes(tmp / "store", "r")


def test_the_search_runs_trials_in_engine_and_confirms_on_test(first_run):
    tmp, _path, outcome, lines, mtimes = first_run
    store = tmp / "store"
    assert [r.state for r in outcome.trials] == ["complete"] * 3
    assert sum(line.startswith("trial ") and "trials/min" in line for line in lines) == 3
    assert not (store / "models").exists()  # the search writes no checkpoint
    tune_dir = store / "results" / "run=r" / "tune"
    journal = json.loads((tune_dir / "trials.json").read_text())["trials"]
    assert [t["state"] for t in journal] == ["complete"] * 3
    # every trial's cells carry its merge fingerprint as model identity
    import pyarrow.parquet as pq

    finalists = {f.name for f in outcome.finalists}
    for t in journal:
        cell = store / "results" / "run=r" / "samples" / f"model={t['name']}" / "language=toy-l2"
        on_test = ["benchmark=toy-task.test.parquet"] if t["name"] in finalists else []
        assert sorted(p.name for p in cell.iterdir()) == ["benchmark=toy-task.dev.parquet"] + on_test
        meta = pq.read_schema(cell / "benchmark=toy-task.dev.parquet").metadata
        assert json.loads(meta[b"chatvec.cell_identity"])["model"] == f"merge:{t['fingerprint'][:16]}"
    roles = {f.role for f in outcome.finalists}
    assert {"best", "grid", "cp"} <= roles
    for f in outcome.finalists:
        assert f.test, f"{f.name} has no test value"
        assert (
            store
            / "results"
            / "run=r"
            / "samples"
            / f"model={f.name}"
            / "language=toy-l2"
            / "benchmark=toy-task.test.parquet"
        ).is_file()
    best = next(f for f in outcome.finalists if f.role == "best")
    assert Path(best.recipe_uri).name.startswith("best.") and Path(best.recipe_uri).is_file()
    assert outcome.verdict.winner == best.name and outcome.verdict.comparison is not None
    assert "on test" in outcome.verdict.text
    report = Path(outcome.report_uri)
    assert report.is_file() and (report.parent / "tune-objective.png").stat().st_size > 1000
    assert "Paired comparisons on test" in report.read_text()
    assert len(mtimes) == 3 + 1 + 1 + len(outcome.finalists)  # trials, grid and CP on dev; the finalists on test


def test_a_rerun_tells_finished_trials_and_recomputes_nothing(first_run):
    tmp, path, outcome, _lines, mtimes = first_run
    lines: list[str] = []
    again = run_tune(load_tune(str(path)), source=str(path), run_id="r", config=CONFIG, workers=0, echo=lines.append)
    assert again.told_again == 3
    assert not any(line.startswith("trial ") for line in lines)  # nothing asked: the budget is spent
    assert sample_mtimes(tmp / "store", "r") == mtimes
    assert [r.fingerprint for r in again.trials] == [r.fingerprint for r in outcome.trials]
    assert again.verdict.text == outcome.verdict.text


def test_a_larger_budget_resumes_the_study(first_run, tmp_path):
    tmp, _path, outcome, _lines, mtimes = first_run
    path = write(tmp, trials=4, name="t4")
    lines: list[str] = []
    more = run_tune(load_tune(str(path)), source=str(path), run_id="r", config=CONFIG, workers=0, echo=lines.append)
    assert more.told_again == 3 and len(more.trials) == 4
    now = sample_mtimes(tmp / "store", "r")
    for trial in outcome.trials:  # the finished trials' cells are the same files
        key = f"model={trial.name}/language=toy-l2/benchmark=toy-task.dev.parquet"
        assert now[key] == mtimes[key]
    assert sum(line.startswith("trial ") for line in lines) == 1


def test_a_trial_in_flight_when_the_driver_died_is_asked_again_and_its_cells_reused(first_run):
    tmp, path, _outcome, _lines, _mtimes = first_run
    store = Store(str(tmp / "store" / "results" / "run=r" / "tune"))
    journal = json.loads(store.read_text("trials.json"))
    last = journal["trials"][-1]
    last.update(state="asked", values=None, metrics={}, violations=[])  # the driver died before telling it
    store.write_text("trials.json", json.dumps(journal))
    before = sample_mtimes(tmp / "store", "r")
    path4 = write(tmp, trials=len(journal["trials"]), name="again")
    lines: list[str] = []
    again = run_tune(load_tune(str(path4)), source=str(path4), run_id="r", config=CONFIG, workers=0, echo=lines.append)
    assert again.told_again == len(journal["trials"]) - 1
    assert again.trials[-1].fingerprint == last["fingerprint"] and again.trials[-1].state == "complete"
    assert sample_mtimes(tmp / "store", "r") == before  # its finished cells were reused


def test_the_recipe_files_reproduce_a_trial_with_chatvec_merge(first_run, tmp_path):
    tmp, _path, outcome, _lines, _mtimes = first_run
    best = next(f for f in outcome.finalists if f.role == "best")
    trial_file = tmp / "store" / "results" / "run=r" / "tune" / "trials" / f"{best.name}.yaml"
    for recipe in (Path(best.recipe_uri), trial_file):
        out = tmp_path / recipe.stem
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatvec.cli",
                "merge",
                "--recipe",
                str(recipe),
                "--out",
                str(out),
                "--workers",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((out / "chatvec_manifest.json").read_text())
        assert manifest["fingerprint"] == best.record.fingerprint


def test_split_is_recorded_seeded_stratified_and_disjoint(first_run):
    tmp, _path, _outcome, _lines, _mtimes = first_run
    record = json.loads((tmp / "store" / "results" / "run=r" / "tune" / "split.json").read_text())
    assert record["settings"] == {"test": 0.5, "seed": 3, "stratify": "auto"}
    (cell,) = record["cells"]
    assert cell["field"] == "task"
    assert set(cell["dev"]).isdisjoint(cell["test"]) and len(cell["dev"]) + len(cell["test"]) == 16
    dev_file = tmp / "store" / "results" / "run=r" / "tune" / "split" / "toy-task" / "toy-l2.dev.jsonl"
    assert [json.loads(line)["id"] for line in dev_file.read_text().splitlines()] == cell["dev"]


def test_merge_best_commits_the_winner_through_the_merge_path(first_run):
    tmp, path, outcome, _lines, mtimes = first_run
    again = run_tune(
        load_tune(str(path)), source=str(path), run_id="r", config=CONFIG, workers=0, merge_best=True, echo=print
    )
    best = next(f for f in again.finalists if f.role == "best")
    manifest = json.loads((Path(again.merged_uri) / "chatvec_manifest.json").read_text())
    assert manifest["fingerprint"] == best.record.fingerprint
    assert Path(again.merged_uri).parent == tmp / "store" / "models"


def test_two_objectives_give_a_pareto_front(tmp_path):
    path = tmp_path / "pareto.yaml"
    text = TUNE.format(world=TOY.as_posix(), root=(tmp_path / "store").as_posix(), trials=4)
    text = text.replace(
        "  objective: {metric: exact_match, direction: maximize}\n",
        "  objective: [{metric: exact_match}, {metric: in_language}]\n  sampler: nsga2\n",
    )
    path.write_text(text.replace("eval: {limit: 16,", "eval: {limit: 8,"))
    outcome = run_tune(load_tune(str(path)), source=str(path), run_id="p", config=CONFIG, workers=0, echo=print)
    assert [len(r.values) for r in outcome.trials] == [2] * 4
    assert (Path(outcome.report_uri).parent / "tune-pareto.png").is_file()
    best = next(f for f in outcome.finalists if f.role == "best")
    assert set(best.test) >= {"exact_match/toy-task/toy-l2", "in_language/toy-task/toy-l2"}


def judged_tune(tmp_path: Path, workers: int) -> tuple:
    """A search with a judged chat benchmark beside the objective's, judged by a judge model (the
    toy chat model): its outcome, and the judge of each judged dev row of the chat cells."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(json.dumps({"id": f"c{i}", "question": f"reverse lirab folis {i}"}) + "\n" for i in range(8)),
        encoding="utf-8",
    )
    (tmp_path / "chat.yaml").write_text(
        f"benchmarks:\n- {{name: toy-chat, kind: chat, data: {{toy-l2: {chat.as_posix()}}}, scripts: {{toy-l2: Cyrillic}}}}\n"
    )
    text = TUNE.format(world=TOY.as_posix(), root=(tmp_path / "store").as_posix(), trials=3)
    text = text.replace("benchmarks: [", f"benchmarks: [{(tmp_path / 'chat.yaml').as_posix()}, ")
    text = text.replace("engine: hf\n", f"engine: hf\njudge: {(TOY / 'chat').as_posix()}\njudge_max_tokens: 4\n")
    text = text.replace("{metric: exact_match, direction: maximize}", "{metric: exact_match, benchmark: toy-task}")
    text = text.replace('["closed >= cp"]', "[{metric: closed, benchmark: toy-task, op: '>=', bound: cp}]")
    path = tmp_path / "judged.yaml"
    path.write_text(text.replace("eval: {limit: 16,", "eval: {limit: 8,"))
    outcome = run_tune(load_tune(str(path)), source=str(path), run_id="j", config=CONFIG, workers=workers, echo=print)
    samples = tmp_path / "store" / "results" / "run=j" / "samples"
    judged = [
        r["judge_model"]
        for p in samples.rglob("benchmark=toy-chat.dev.parquet")
        for r in pq.read_table(p, columns=["metric", "judge_model"]).to_pylist()
        if r["metric"] == "judge_score"
    ]
    return outcome, judged


def test_a_local_judge_loads_once_for_the_whole_search(tmp_path):
    """The judge is loaded on the first judged call (the grid's) and kept for every trial after
    it, not loaded once per trial."""
    outcome, judged = judged_tune(tmp_path, workers=0)
    assert [r.state for r in outcome.trials] == ["complete"] * 3
    assert outcome.timings["judge_s"] > 0  # every trial's chat cells were judged ...
    assert outcome.timings["judge_loads"] == 0  # ... by the judge the grid loaded before the search
    assert len(judged) >= 4 * 4 and set(judged) == {(TOY / "chat").as_posix()}  # grid + 3 trials, all judged
