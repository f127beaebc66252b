"""Cell identity: a rerun reuses a cell only when what it was computed from is the same.

Real tiny models, real benchmark files, real reruns into the same output folder."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from chatvec.core.layout import MANIFEST  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.contracts import (  # noqa: E402
    DONE,
    SKIPPED,
    Cell,  # noqa: E402
    RunSettings,
)
from chatvec.eval.errors import NewerSchemaError  # noqa: E402
from chatvec.eval.identity import CellIdentity, engine_identity, model_identity  # noqa: E402
from chatvec.eval.pipeline import run_pipeline  # noqa: E402
from chatvec.eval.results import read_cell_identity, read_table  # noqa: E402
from chatvec.eval.runner import LocalCellExecutor  # noqa: E402
from chatvec.eval.schema import JUDGED, SAMPLES_SCHEMA, VERSION_KEY  # noqa: E402

SETTINGS = RunSettings(device="cpu", batch_size=4, max_new_tokens=4)
JUDGE_STATES = {JUDGED, "unparseable", "out_of_range", "ambiguous"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    return {
        name: str(build_model_dir(root / name, seed=seed, shard_size=None))
        for name, seed in (("alpha", 1), ("beta", 2), ("judge", 3), ("judge2", 4))
    }


def write_questions(path, questions):
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions), encoding="utf-8")
    return path


def run(model_dir, out, benchmarks, *, settings=SETTINGS, judge=None):
    return run_pipeline(
        {"m": str(model_dir)},
        executor=LocalCellExecutor(),
        benchmarks=benchmarks,
        languages=["en"],
        out_uri=str(out),
        judge=judge,
        settings=settings,
        show_progress=False,
    )


def states(outcome) -> dict[str, str]:
    return {r.key: r.state for r in outcome.results if r.stage == "generate"}


def test_unchanged_inputs_reuse_and_changed_ones_recompute(models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models["alpha"], model)
    data = write_questions(tmp_path / "q.jsonl", ["Why is the sky blue?", "Name a colour.", "Count to three."])
    benchmarks = [f"mine={data}:chat:en", "choice"]
    out = tmp_path / "out"
    first = run(model, out, benchmarks)
    assert first.ok and set(states(first).values()) == {DONE} and first.redone == {}
    recorded = read_cell_identity(Store(str(out)), Cell("m", "en", "mine"))
    assert isinstance(recorded, CellIdentity) and recorded.model.startswith("files:")
    import transformers

    assert recorded.engine == engine_identity("hf") == f"hf {transformers.__version__}"

    # the same command: every cell reused, nothing loaded
    same = run(model, out, benchmarks)
    assert set(states(same).values()) == {SKIPPED} and same.loads == {} and same.redone == {}

    # other weights in the same folder: every cell of the model is computed again
    shutil.copy(f"{models['beta']}/model.safetensors", model / "model.safetensors")
    swapped = run(model, out, benchmarks)
    assert set(states(swapped).values()) == {DONE}
    assert swapped.redone == {"m/en/mine": ["the model's files changed"], "m/en/choice": ["the model's files changed"]}
    answers = {
        r["item_id"]: r["response"]
        for r in read_table(Store(str(out)), Cell("m", "en", "mine").samples_rel).to_pylist()
    }
    beta = run(models["beta"], tmp_path / "beta", [f"mine={data}:chat:en"])
    assert beta.ok
    assert answers == {
        r["item_id"]: r["response"]
        for r in read_table(Store(str(tmp_path / "beta")), Cell("m", "en", "mine").samples_rel).to_pylist()
    }

    # one more item in the data: only that benchmark's cell
    write_questions(data, ["Why is the sky blue?", "Name a colour.", "Count to three.", "Say hello."])
    grown = run(model, out, benchmarks)
    assert states(grown) == {"m/en/mine": DONE, "m/en/choice": SKIPPED}
    assert grown.redone == {"m/en/mine": ["the benchmark data changed"]}
    assert {r["n"] + r["n_unscored"] for r in grown.summary.to_pylist() if r["benchmark"] == "mine"} == {4}

    # a longer answer budget: the generating cell only (choice scores options, it generates nothing)
    longer = run(model, out, benchmarks, settings=RunSettings(device="cpu", batch_size=4, max_new_tokens=6))
    assert states(longer) == {"m/en/mine": DONE, "m/en/choice": SKIPPED}
    assert longer.redone == {"m/en/mine": ["the benchmark's options or decoding changed"]}

    # a limit: fewer items in both cells
    limited = run(model, out, benchmarks, settings=RunSettings(device="cpu", batch_size=4, max_new_tokens=6, limit=2))
    assert set(states(limited).values()) == {DONE}
    assert all("the benchmark data changed" in reasons for reasons in limited.redone.values())
    assert {r["n"] + r["n_unscored"] for r in limited.summary.to_pylist()} == {2}


def test_a_new_judge_judges_again(models, tmp_path):
    data = write_questions(tmp_path / "q.jsonl", ["Why is the sky blue?", "Name a colour."])
    out = tmp_path / "out"
    benchmarks = [f"mine={data}:chat:en"]
    first = run(models["alpha"], out, benchmarks, judge=models["judge"])
    assert first.ok and first.counts["judged"] == 1
    rel = Cell("m", "en", "mine").samples_rel
    before = read_table(Store(str(out)), rel).to_pylist()
    # the same judge: nothing to do
    same = run(models["alpha"], out, benchmarks, judge=models["judge"])
    assert same.counts["judged"] == 0 and same.loads == {}
    # another judge: the answers stay, every judged row is judged again, by the new judge
    other = run(models["alpha"], out, benchmarks, judge=models["judge2"])
    assert other.counts["generated"] == 0 and other.counts["judged"] == 1
    assert other.redone == {"m/en/mine": ["the judge changed"]} and other.loads == {models["judge2"]: 1}
    after = read_table(Store(str(out)), rel).to_pylist()
    assert [r["response"] for r in after] == [r["response"] for r in before]
    judged = [r for r in after if r["metric"] == "judge_score"]
    assert judged and all(r["judge_model"] == models["judge2"] and r["judge_status"] in JUDGE_STATES for r in judged)
    identity = read_cell_identity(Store(str(out)), Cell("m", "en", "mine"))
    assert identity.judge.startswith(models["judge2"] + " files:") and identity.judge.endswith(" budget=4")
    # a larger judge budget is another judgment too
    more = run(
        models["alpha"],
        out,
        benchmarks,
        judge=models["judge2"],
        settings=RunSettings(device="cpu", batch_size=4, max_new_tokens=4, judge_max_new_tokens=3),
    )
    assert more.counts["generated"] == 0 and more.redone == {"m/en/mine": ["the judge changed"]}
    # a judge that does not load: the old judgments are not kept beside the new judge's name
    broken = run(models["alpha"], out, benchmarks, judge=str(tmp_path / "no-judge-here"))
    assert not broken.ok and broken.redone == {"m/en/mine": ["the judge changed"]}
    summary = {r["metric"]: r for r in broken.summary.to_pylist()}
    assert summary["judge_score"]["n"] == 0 and summary["judge_score"]["n_unscored"] == 2


def test_a_file_from_a_newer_chatvec_is_refused(models, tmp_path):
    out = tmp_path / "out"
    assert run(models["alpha"], out, ["perplexity"]).ok
    rel = Cell("m", "en", "perplexity").samples_rel
    path = out / rel
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, VERSION_KEY: b"99"}), path)
    with pytest.raises(NewerSchemaError, match="written by a newer chatvec .*schema 99; this one reads up to 1"):
        run(models["alpha"], out, ["perplexity"])
    assert SAMPLES_SCHEMA.metadata[VERSION_KEY] == b"1"


def test_a_merged_model_is_known_by_its_manifest_wherever_it_lies(models, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(models["alpha"], a)
    files = {p.name: {"size": p.stat().st_size} for p in a.iterdir() if p.is_file()}
    (a / MANIFEST).write_text(json.dumps({"fingerprint": "f" * 64, "files": files}))
    assert model_identity(str(a)) == "merge:" + "f" * 16
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copy)  # new mtimes, same merge
    assert model_identity(str(b)) == model_identity(str(a))
    # weights that are not the manifest's: known by the files again
    shutil.copy(f"{models['beta']}/model.safetensors", b / "model.safetensors")
    with open(b / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    assert model_identity(str(b)).startswith("files:")
    assert model_identity(str(tmp_path / "missing")) is None


def test_the_vllm_version_comes_from_the_module():
    vllm = pytest.importorskip("vllm")
    assert engine_identity("vllm") == f"vllm {vllm.__version__}"


def test_an_engine_loaded_elsewhere_runs_cells_under_the_given_identity(models, tmp_path):
    """The in-engine sweep's path: the evaluator borrows a loaded engine (weights swapped in place)
    and records the merge's identity; closing the evaluator leaves the engine to its owner."""
    from chatvec.eval.contracts import RunContext
    from chatvec.eval.engines import load_engine
    from chatvec.eval.engines.base import Decoding, GenerationRequest
    from chatvec.eval.identity import merged_model_identity
    from chatvec.eval.pipeline import plan_run
    from chatvec.eval.runner import ModelEvaluator

    engine = load_engine("hf", models["alpha"], device="cpu", batch_size=4)
    out = str(tmp_path / "out")
    try:
        run_id, cells, _items = plan_run(
            {"point": models["alpha"]}, benchmarks=["perplexity"], languages=["en"], store=Store(out), run_id=None
        )
        run = RunContext(out_uri=out, run_id=run_id, settings=SETTINGS, languages=("en",), judged=False)
        evaluator = ModelEvaluator(
            "point",
            models["alpha"],
            run=run,
            identity=merged_model_identity("ab" * 32),
            engine=engine,
        )
        (result,) = evaluator.run_all(cells)
        evaluator.close()
        assert result.state == DONE
        recorded = read_cell_identity(Store(out), cells[0])
        assert recorded.model == "merge:" + "ab" * 8
        # still the owner's engine, still loaded
        assert engine.generate([GenerationRequest([1, 2, 3], Decoding(max_new_tokens=2))])[0].completion_tokens >= 1
        # the pipeline reuses the cell while the merge's identity is the same, and redoes it when not
        from chatvec.eval.pipeline import run_pipeline

        same = run_pipeline(
            {"point": models["alpha"]},
            executor=LocalCellExecutor(),
            benchmarks=["perplexity"],
            languages=["en"],
            out_uri=out,
            settings=SETTINGS,
            show_progress=False,
            model_identities={"point": merged_model_identity("ab" * 32)},
        )
        assert same.redone == {} and same.loads == {}
        other = run_pipeline(
            {"point": models["alpha"]},
            executor=LocalCellExecutor(),
            benchmarks=["perplexity"],
            languages=["en"],
            out_uri=out,
            settings=SETTINGS,
            show_progress=False,
        )
        assert other.redone == {"point/en/perplexity": ["the model's files changed"]}  # its files are not the merge
    finally:
        engine.close()


def test_identities_are_read_from_an_object_store(models, s3_server, s3_bucket):
    out = f"{s3_bucket}/results/identity"
    benchmarks = ["choice"]
    first = run(models["alpha"], out, benchmarks)
    assert first.ok and set(states(first).values()) == {DONE}
    recorded = read_cell_identity(Store(out), Cell("m", "en", "choice"))
    assert isinstance(recorded, CellIdentity) and recorded.model.startswith("files:")
    same = run(models["alpha"], out, benchmarks)
    assert set(states(same).values()) == {SKIPPED} and same.loads == {}
    fewer = run(models["alpha"], out, benchmarks, settings=RunSettings(device="cpu", batch_size=4, limit=2))
    assert set(states(fewer).values()) == {DONE} and "the benchmark data changed" in fewer.redone["m/en/choice"]
