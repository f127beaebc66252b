"""One model on several engines (`--replicas`): the cells, and the items of a large cell in chunks,
spread over eval actors; a chunked cell is written once, whole, with the same rows, item for item,
as one engine writes; a replica killed mid-chunk fails that cell only, and the rerun completes it."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from test_faults_processes import Killer  # noqa: E402

from chatvec.cluster.eval_driver import RayExecutor, replica_jobs, run_eval  # noqa: E402
from chatvec.core.config import ChatvecConfig, EvalSettings  # noqa: E402
from chatvec.core.errors import ConfigError  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.chunks import Chunk, partition, plan_units  # noqa: E402
from chatvec.eval.contracts import Cell, ModelJob  # noqa: E402
from chatvec.eval.results import read_table  # noqa: E402

CONFIG = ChatvecConfig(eval=EvalSettings(cpus_per_engine=0))
# fields that say when and where a row was made, not what it holds
VOLATILE = {"created_at", "run_id", "latency_s"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = str(build_model_dir(root / "m", seed=31, shard_size=None))
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question number {i}?"}) + "\n" for i in range(40)))
    common = dict(
        benchmarks=[f"long={data}:chat:en", "choice"],
        languages=["en"],
        device="cpu",
        max_new_tokens=4,
        config=CONFIG,
        show_progress=False,
    )
    return {"model": model, "common": common}


def rows_of(out) -> dict[str, list[dict]]:
    store = Store(str(out))
    return {
        rel: [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_table(store, rel).to_pylist()]
        for rel in store.list("samples")
    }


def test_units_cover_every_item_once_and_balance():
    cells = [Cell("m", "en", "big"), Cell("m", "en", "small"), Cell("m", "en", "other")]
    counts = {cells[0]: 101, cells[1]: 5, cells[2]: 30}
    units = plan_units(cells, counts, 3)
    chunks = [u for u in units if isinstance(u, Chunk)]
    assert [(c.start, c.stop) for c in chunks if c.cell == cells[0]] == [(0, 34), (34, 67), (67, 101)]
    assert cells[1] in units  # too few items to be worth a second engine
    assert sum(c.items for c in chunks if c.cell == cells[2]) == 30
    groups = partition(units, counts, 3)
    assert len(groups) == 3 and sorted(map(id, sum(groups, []))) == sorted(map(id, units))
    loads = [sum(u.items if isinstance(u, Chunk) else counts[u] for u in g) for g in groups]
    assert max(loads) - min(loads) <= 34
    assert plan_units(cells, counts, 1) == cells


def test_auto_shares_the_actors_out_over_the_models():
    assert RayExecutor(8, CONFIG, "auto").replicas_for(2) == 4
    assert RayExecutor(3, CONFIG, "auto").replicas_for(5) == 1
    assert RayExecutor(2, CONFIG, 4).replicas_for(1) == 2  # never more engines than actors


def test_replica_jobs_respect_the_item_limit(setup, tmp_path):
    from chatvec.eval.benchmarks import resolve_benchmarks

    spec = resolve_benchmarks(setup["common"]["benchmarks"][:1])[0]
    cell = Cell("m", "en", spec.name, spec)
    jobs = replica_jobs([ModelJob("m", setup["model"], [cell])], 2, limit=20)
    assert [[(u.start, u.stop) for u in units] for _job, units in jobs] == [[(0, 10)], [(10, 20)]]


def test_replicas_below_one_are_refused_before_anything_runs(setup, tmp_path):
    with pytest.raises(ConfigError, match="--replicas"):
        run_eval({"m": setup["model"]}, workers=2, replicas=0, out_uri=str(tmp_path / "o"), **setup["common"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_replicas_write_the_rows_one_engine_writes(ray_cluster, setup, tmp_path):
    one = run_eval({"m": setup["model"]}, workers=0, out_uri=str(tmp_path / "one"), **setup["common"])
    two = run_eval({"m": setup["model"]}, workers=2, replicas=2, out_uri=str(tmp_path / "two"), **setup["common"])
    assert one.ok and two.ok
    assert two.loads == {setup["model"]: 2}  # two engines on the one model
    assert rows_of(tmp_path / "two") == rows_of(tmp_path / "one")
    rel = "status/model=m/language=en/benchmark=long.json"
    status, single = (json.loads(Store(str(tmp_path / o)).read_text(rel)) for o in ("two", "one"))
    assert status["state"] == "done" and status["chunks"] == 2 and status["rows"] == single["rows"]
    # the same cells, the same identities: a rerun on one engine reuses all of them
    again = run_eval({"m": setup["model"]}, workers=0, out_uri=str(tmp_path / "two"), **setup["common"])
    assert again.counts["generated"] == 0 and again.redone == {}


@pytest.mark.slow
def test_a_replica_killed_mid_chunk_fails_its_cell_whole_then_the_rerun_completes_it(ray_cluster, setup, tmp_path):
    out = tmp_path / "out"
    reference = tmp_path / "ref"
    common = {**setup["common"], "benchmarks": setup["common"]["benchmarks"][:1]}  # only the chunked cell
    run_eval({"m": setup["model"]}, workers=0, out_uri=str(reference), **common)
    killer = Killer("EvalWorker.run")
    first = run_eval({"m": setup["model"]}, workers=2, replicas=2, out_uri=str(out), **common)
    assert killer.stop(), "no replica was killed inside a chunk"
    assert len(first.failed) == 1 and "actor died" in first.failed[0].error
    failed = first.failed[0]
    assert failed.benchmark == "long" and "chunk" in failed.error
    # nothing of the failed cell looks complete: no samples file, a failed status
    rel = f"samples/model=m/language={failed.language}/benchmark={failed.benchmark}.parquet"
    assert not os.path.exists(out / rel)
    again = run_eval({"m": setup["model"]}, workers=2, replicas=2, out_uri=str(out), **common)
    assert again.ok
    assert rows_of(out) == rows_of(reference)
