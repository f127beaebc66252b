"""One model on several engines (`--replicas`): the cells, and the items of a large cell in chunks,
spread over eval actors; a chunked cell is written once, whole, with the same rows, item for item,
as one engine writes; a replica killed mid-chunk fails that cell only, and the rerun completes it."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from test_faults_processes import Killer  # noqa: E402

from chatvec.cluster.eval_driver import RayExecutor, Seat, replica_seats, run_eval, run_pool  # noqa: E402
from chatvec.core.config import ChatvecConfig, EvalSettings  # noqa: E402
from chatvec.core.errors import ConfigError  # noqa: E402
from chatvec.core.storage import Store  # noqa: E402
from chatvec.demo.tiny import build_model_dir  # noqa: E402
from chatvec.eval.chunks import MIN_CHUNK_ITEMS, Chunk, plan_units  # noqa: E402
from chatvec.eval.contracts import DONE, GENERATE, Cell, CellResult, ModelJob, Progress, RunSettings  # noqa: E402
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


def spans(units, cell) -> list[tuple[int, int]]:
    return sorted((u.start, u.stop) for u in units if isinstance(u, Chunk) and u.cell == cell)


def test_units_cover_every_item_once_in_chunks_that_shrink_towards_the_end():
    cells = [Cell("m", "en", "small"), Cell("m", "en", "big"), Cell("m", "en", "other"), Cell("m", "en", "lm")]
    counts = {cells[0]: 5, cells[1]: 101, cells[2]: 30}  # "lm": a kind that reads no items
    units = plan_units(cells, counts, 3)
    big = spans(units, cells[1])
    assert big[0] == (0, 17)  # half of the items over the 3 engines, rounded up
    assert big[-1][1] == 101 and all(a[1] == b[0] for a, b in zip(big, big[1:]))
    sizes = [stop - start for start, stop in big]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) == MIN_CHUNK_ITEMS
    assert spans(units, cells[2]) == [(0, 8), (8, 16), (16, 30)]  # the short tail joined the chunk before
    assert cells[0] in units  # too few items to be worth a second engine
    assert units[0] == cells[3]  # unknown size: started first
    sizes = [u.items if isinstance(u, Chunk) else counts[u] for u in units[1:]]
    assert sizes == sorted(sizes, reverse=True)  # largest first, over all cells
    assert plan_units(cells, counts, 1) == cells  # one engine: the cells as they are


def test_chunks_are_cut_at_batch_boundaries_and_a_short_tail_joins_the_chunk_before_it():
    cell = Cell("m", "en", "big")
    sizes = [c.items for c in plan_units([cell], {cell: 1000}, 2, align=16)]
    assert sizes == [256, 192, 144, 112, 80, 64, 48, 32, 32, 16, 16, 8]
    assert spans(plan_units([cell], {cell: 36}, 2, align=16), cell) == [(0, 16), (16, 36)]
    assert plan_units([cell], {cell: 20}, 2, align=16) == [cell]


def test_auto_shares_the_actors_out_over_the_models():
    assert RayExecutor(8, CONFIG, "auto").replicas_for(2) == 4
    assert RayExecutor(3, CONFIG, "auto").replicas_for(5) == 1
    assert RayExecutor(2, CONFIG, 4).replicas_for(1) == 2  # never more engines than actors


def test_replica_seats_share_one_queue_per_model_cut_from_the_planned_item_counts(setup, tmp_path):
    cell, lm = Cell("m", "en", "long"), Cell("m", "en", "lm")  # "lm": a kind that reads no items
    job = ModelJob("m", setup["model"], [cell, lm], item_counts={cell: 20, lm: 0})
    seats = replica_seats([job], 2, RunSettings(engine="hf", batch_size=4))
    assert len(seats) == 2 and seats[0].units is seats[1].units
    assert list(seats[0].units)[0] == lm  # unknown size: started first, never cut
    assert sorted((u.start, u.stop) for u in seats[0].units if isinstance(u, Chunk)) == [(0, 8), (8, 20)]
    alone = replica_seats([job], 1, RunSettings(engine="hf"))
    assert len(alone) == 1 and list(alone[0].units) == [cell, lm]


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
    assert status["state"] == "done" and status["chunks"] == 3 and status["rows"] == single["rows"]
    # the same cells, the same identities: a rerun on one engine reuses all of them
    again = run_eval({"m": setup["model"]}, workers=0, out_uri=str(tmp_path / "two"), **setup["common"])
    assert again.counts["generated"] == 0 and again.redone == {}
    # the item limit is applied before the cell is cut: 24 of the 40 items, in chunks of 16 and 8
    limited = run_eval(
        {"m": setup["model"]}, workers=2, replicas=2, limit=24, out_uri=str(tmp_path / "lim"), **setup["common"]
    )
    status = json.loads(Store(str(tmp_path / "lim")).read_text(rel))
    items = {r["item_id"] for r in rows_of(tmp_path / "lim")["samples/model=m/language=en/benchmark=long.parquet"]}
    assert limited.ok and items == {f"q{i}" for i in range(24)} and status["chunks"] == 2


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


def test_replicas_pull_from_one_queue_so_the_one_that_runs_ahead_takes_more(ray_cluster, tmp_path):
    import ray

    class PacedWorker:
        """A pool member without an engine, for the scheduling alone (defined here so that Ray
        ships it by value): actor 0 takes 0.5 s a unit, the others 0.02 s; each result's
        ``rows`` names the actor that ran it."""

        def __init__(self, n: int) -> None:
            self.n = n

        def prepare(self, _what) -> dict:
            return {"pid": os.getpid(), "loads": {}, "error": None}

        def run(self, cell: Cell) -> CellResult:
            time.sleep(0.5 if self.n == 0 else 0.02)
            return CellResult.of(cell, DONE, GENERATE, rows=self.n)

        def close(self) -> None:
            pass

    cells = [Cell("m", "en", f"b{i}") for i in range(40)]
    queue = deque(cells)
    worker = ray.remote(num_cpus=0)(PacedWorker)
    results, _loads = run_pool(
        lambda n: worker.remote(n),
        [Seat("m", queue), Seat("m", queue)],
        2,
        stage=GENERATE,
        store=Store(str(tmp_path)),
        run_id="r",
        progress=Progress(len(cells), "pool", enabled=False),
    )
    assert sorted(r.benchmark for r in results) == sorted(c.benchmark for c in cells)  # each once
    ran = Counter(r.rows for r in results)
    assert ran[1] > 2 * ran[0], ran  # a fixed half each would be 20 and 20


def plain_workers():
    """Pool members without an engine (the class is made inside a function so that Ray ships it by
    value), and the list of the actors made so far; returns (make_actor, made)."""
    import ray

    class Worker:
        def prepare(self, _what) -> dict:
            return {"pid": os.getpid(), "loads": {}, "error": None}

        def run(self, cell: Cell) -> CellResult:
            return CellResult.of(cell, DONE, GENERATE)

        def ping(self) -> int:
            return os.getpid()

        def close(self) -> None:
            pass

    made: list = []

    def make(_n: int):
        made.append(ray.remote(num_cpus=0)(Worker).remote())
        return made[-1]

    return make, made


def two_seats(make, cells: int, tmp_path, progress: Progress, keep: list | None = None) -> list[CellResult]:
    """``cells`` cells of one model on two actors pulling from one queue."""
    queue = deque(Cell("m", "en", f"b{i}") for i in range(cells))
    results, _loads = run_pool(
        make,
        [Seat("m", queue), Seat("m", queue)],
        2,
        stage=GENERATE,
        store=Store(str(tmp_path)),
        run_id="r",
        progress=progress,
        keep=keep,
    )
    return results


def test_an_interrupted_pool_leaves_no_actor_behind(ray_cluster, tmp_path):
    """Ctrl-C (or a lost cluster) under run_pool: the exception goes up and every actor the pool
    made is killed, not left holding an engine for the life of the driver."""
    import ray
    from ray.exceptions import RayActorError

    class Interrupting(Progress):
        def update(self, result) -> None:
            raise KeyboardInterrupt

    make, made = plain_workers()
    with pytest.raises(KeyboardInterrupt):
        two_seats(make, 10, tmp_path, Interrupting(10, "pool", enabled=False))
    assert len(made) == 2
    for actor in made:
        with pytest.raises(RayActorError):
            ray.get(actor.ping.remote(), timeout=30)


def test_a_kept_actor_found_dead_fails_nothing(ray_cluster, tmp_path):
    """Actors kept between calls (a tune search's judges): one that died in between is replaced,
    and its units run on the fresh one without a failure."""
    import ray
    from ray.exceptions import RayActorError

    from chatvec.cluster.eval_driver import close_actors

    make, made = plain_workers()
    keep: list = []
    first = two_seats(make, 6, tmp_path, Progress(6, "pool", enabled=False), keep)
    assert len(first) == 6 and all(r.state == DONE for r in first) and len(keep) == 2 and len(made) == 2
    dead = keep[-1]  # the one the next call takes first
    ray.kill(dead)  # asynchronous: wait until the actor no longer answers
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(dead.ping.remote(), timeout=30)
        except RayActorError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the killed actor still answers")
    second = two_seats(make, 6, tmp_path, Progress(6, "pool", enabled=False), keep)
    assert len(second) == 6 and all(r.state == DONE for r in second), [r.error for r in second]
    assert len(made) == 3 and len(keep) == 2  # one fresh actor took the dead one's place
    close_actors(keep)
