"""Two Ray nodes on one host (Ray's own `ray.cluster_utils.Cluster`: a head and a worker, each with its
own raylet, object store and environment): a merge, an evaluation and a sweep whose actors run on both
nodes, reading and writing only s3:// (moto on loopback), each node with its own model cache.

The cluster lives in a child process (this file run as a script), so it never meets the one local Ray
that the test session shares. The child joins the cluster the way a user does (`ray.address` set to
the head's address, token authentication on), writes what it saw to a JSON file and stops the
cluster; the tests below check that file and the bucket. Each node gets 1 logical CPU and every actor
asks for 1, so two live actors are on two different nodes whatever Ray's scheduler prefers.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.5
NODES = ("node-a", "node-b")
EVAL_ARGS = dict(
    benchmarks=["chat", "choice"], languages=["en"], device="cpu", max_new_tokens=4, limit=2, show_progress=False
)
SWEEP = """\
name: multinode
vectors:
  v: {{base: {bucket}/sweep/base, chat: {bucket}/sweep/chat}}
targets:
  - {{language: en, cp: {bucket}/sweep/cp, benchmarks: [chat]}}
ratios: [1.0]
baselines: {{cp: true, chat: false}}
engine: hf
device: cpu
root: {bucket}/chatvec
shard_size: 100KB
workers: {{merge: 2, eval: 2}}
eval: {{limit: 2, max_new_tokens: 4, batch_size: 2}}
"""


def listing(folder: str | os.PathLike) -> list[str]:
    """Model folders in a cache (hidden temporary copies included: they would be a leak too)."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# -- the child process: start the cluster, run the three jobs, report ---------------------------------------
def _scenario(spec: dict) -> dict:
    import ray
    from conftest import free_port
    from ray.cluster_utils import Cluster
    from ray_merge import WatchedMerge

    from chatvec.cluster.eval_driver import run_eval
    from chatvec.core.config import ChatvecConfig, EvalSettings, MergeSettings, RaySettings
    from chatvec.core.units import parse_size
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec
    from chatvec.runs.sweep import load_sweep
    from chatvec.runs.sweep_run import run_sweep

    caches = spec["node_caches"]

    def node_args(name: str) -> dict:
        # What `ray start` would get on a real node: its resources, and its environment (the
        # model cache on that node's disk; AWS_* and the token are inherited like any variable).
        return dict(
            num_cpus=1,
            num_gpus=0,
            resources={name: 1.0},
            env_vars={"CHATVEC_CACHE": caches[name]},
            object_store_memory=100 << 20,
            dashboard_agent_listen_port=free_port(),
        )

    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            **node_args(NODES[0]),
            gcs_server_port=free_port(),
            include_dashboard=False,
            dashboard_port=free_port(),
            temp_dir=spec["ray_temp"],
        ),
    )
    report: dict = {}
    try:
        cluster.add_node(**node_args(NODES[1]))
        cluster.wait_for_nodes()
        config = ChatvecConfig(
            ray=RaySettings(address=cluster.address, namespace="chatvec-multinode"),
            merge=MergeSettings(workers=2, cpus_per_worker=1, gpus_per_worker=0, device="cpu"),
            eval=EvalSettings(workers=2, cpus_per_engine=1, gpus_per_engine=0, judge_workers=1, device="cpu"),
        )
        from chatvec.cluster.runtime import ensure_ray

        ensure_ray(config)

        @ray.remote(num_cpus=0)
        def where() -> tuple[str, str | None]:
            return ray.get_runtime_context().get_node_id(), os.environ.get("CHATVEC_CACHE")

        report["nodes"] = {name: ray.get(where.options(resources={name: 0.001}).remote()) for name in NODES}

        src = spec["merge_inputs"]
        recipe = Recipe(cp=src["cp"], vectors=[VectorSpec(base=src["base"], chat=src["chat"], ratio=RATIO)])
        merge = WatchedMerge(
            build_plan(recipe, shard_size=parse_size("50KB")), spec["merge_out"], workers=2, config=config, device="cpu"
        )
        summary = merge.run()
        report["merge"] = {
            "shards_written": summary.shards_written,
            "shards": len(merge.plan.shards),
            "actors": [{"node_id": i["node_id"], "shards_written": i["shards_written"]} for i in merge.final_info],
        }

        outcome = run_eval(
            spec["eval_models"], workers=2, out_uri=spec["eval_out"], run_id="multinode", config=config, **EVAL_ARGS
        )
        report["eval"] = {
            "ok": outcome.ok,
            "counts": dict(outcome.counts),
            "loads": outcome.loads,
            "caches": {name: listing(caches[name]) for name in NODES},
        }

        sweep = load_sweep(spec["sweep_file"])
        lines: list[str] = []
        result = run_sweep(sweep, run_id="night-1", config=config, echo=lines.append)
        report["sweep"] = {
            "exit_status": result.exit_status,
            "merged": result.merged,
            "failed": [str(c) for c in result.failed_cells],
            "report_uri": result.report_uri,
            "caches": {name: listing(caches[name]) for name in NODES},
            "lines": lines,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


# -- the tests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multinode(tmp_path_factory, s3_server):
    from test_cluster_merge import build_small_triple

    from chatvec.demo.tiny import build_model_dir

    work = tmp_path_factory.mktemp("multinode")
    bucket = s3_server.make_bucket()
    triple = build_small_triple(work / "triple")
    models = {
        name: build_model_dir(work / "eval" / name, seed=seed, shard_size="50KB")
        for name, seed in (("a", 21), ("b", 22))
    }
    upload = lambda local, uri: s3_server.upload_dir(local, f"{bucket}/{uri}")  # noqa: E731
    merge_inputs = {role: upload(getattr(triple, role), f"merge/{role}") for role in ("cp", "base", "chat")}
    for role in ("cp", "base", "chat"):
        upload(getattr(triple, role), f"sweep/{role}")
    eval_models = {name: upload(path, f"eval/{name}") for name, path in models.items()}
    sweep_file = work / "multinode.yaml"
    sweep_file.write_text(SWEEP.format(bucket=bucket))

    # a folder of its own for the cluster's sessions (short: Ray's socket paths must stay under 108 bytes)
    ray_temp = tmp_path_factory.mktemp("mnray")
    (ray_temp / "ray").mkdir()
    driver_cwd, driver_cache = work / "driver-cwd", work / "driver-cache"
    driver_cwd.mkdir()
    spec = {
        "ray_temp": str(ray_temp),
        "node_caches": {name: str(work / f"cache-{name}") for name in NODES},
        "merge_inputs": merge_inputs,
        "merge_out": f"{bucket}/models/merged",
        "eval_models": eval_models,
        "eval_out": f"{bucket}/results/eval",
        "sweep_file": str(sweep_file),
    }
    spec_file, report_file = work / "spec.json", work / "report.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
        # the address file Cluster writes goes here, not to the shared /tmp/ray
        RAY_TMPDIR=str(ray_temp),
        CHATVEC_CACHE=str(driver_cache),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "tests"),
    )
    log = work / "driver.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(spec_file), str(report_file)],
            cwd=driver_cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # the child and every Ray process it started share its session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=30)
    if proc.returncode != 0 or not report_file.is_file():
        pytest.fail(f"the two-node scenario exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
    return {
        "report": json.loads(report_file.read_text()),
        "spec": spec,
        "triple": triple,
        "models": models,
        "driver_cwd": driver_cwd,
        "driver_cache": driver_cache,
        "bucket": bucket,
    }


def _rows(out: str) -> dict[str, list[tuple]]:
    from chatvec.core.storage import Store
    from chatvec.eval.results import read_table

    store = Store(out)
    keep = ("item_id", "metric", "score", "response", "in_language")
    return {
        rel: sorted(tuple(r[k] for k in keep) for r in read_table(store, rel).to_pylist())
        for rel in store.list("samples")
    }


def _copy_of(folder: str, uri: str) -> bool:
    """Whether a cache folder holds a complete copy of the model at ``uri``: every file, same bytes."""
    from chatvec.core.storage import Store

    store = Store(uri)
    files = [rel for rel in store.list() if not rel.startswith(".")]
    return bool(files) and all(
        Path(folder, rel).is_file() and Path(folder, rel).read_bytes() == store.read_bytes(rel) for rel in files
    )


def _which(cache: str, names: list[str], uris: list[str]) -> list[str]:
    """For each cache folder in ``names``, the one URI in ``uris`` it is a copy of."""
    found = []
    for name in names:
        match = [uri for uri in uris if _copy_of(os.path.join(cache, name), uri)]
        assert len(match) == 1, f"{name} in {cache} is a copy of {match or 'nothing'}"
        found.append(match[0])
    return found


def test_each_node_runs_with_its_own_environment(multinode):
    nodes = multinode["report"]["nodes"]
    assert len({node_id for node_id, _cache in nodes.values()}) == 2
    assert {name: cache for name, (_id, cache) in nodes.items()} == multinode["spec"]["node_caches"]


def test_merge_actors_on_both_nodes_write_the_reference_to_s3(multinode):
    from test_cluster_merge import assert_matches_reference

    report = multinode["report"]
    merge = report["merge"]
    assert merge["shards_written"] == merge["shards"] > 2
    node_ids = {node_id for node_id, _cache in report["nodes"].values()}
    assert {a["node_id"] for a in merge["actors"]} == node_ids
    assert all(a["shards_written"] > 0 for a in merge["actors"])
    assert_matches_reference(multinode["spec"]["merge_out"], multinode["triple"], ratio=RATIO)


def test_eval_actors_on_both_nodes_copy_models_into_their_own_node_cache(multinode, tmp_path):
    from chatvec.cluster.eval_driver import run_eval
    from chatvec.core.config import ChatvecConfig

    spec, ev = multinode["spec"], multinode["report"]["eval"]
    assert ev["ok"] and ev["counts"]["generated"] == 4
    assert ev["loads"] == {uri: 1 for uri in spec["eval_models"].values()}
    # one model per node, each copied to that node's own cache and nowhere else
    uris = list(spec["eval_models"].values())
    assert all(len(ev["caches"][name]) == 1 for name in NODES), ev["caches"]
    copied = [_which(spec["node_caches"][name], ev["caches"][name], uris)[0] for name in NODES]
    assert sorted(copied) == sorted(uris)
    # the same numbers as evaluating the local folders in this process
    local = run_eval(
        {k: str(v) for k, v in multinode["models"].items()},
        workers=0,
        out_uri=str(tmp_path / "local"),
        run_id="local",
        config=ChatvecConfig(),
        **EVAL_ARGS,
    )
    assert local.ok
    assert _rows(spec["eval_out"]) == _rows(str(tmp_path / "local"))


def test_sweep_merges_and_evaluates_on_both_nodes_into_s3(multinode):
    from chatvec.core.storage import Store

    spec, report = multinode["spec"], multinode["report"]
    sweep = report["sweep"]
    assert sweep["exit_status"] == 0 and sweep["failed"] == [], sweep["lines"]
    assert len(sweep["merged"]) == 1
    root = f"{multinode['bucket']}/chatvec"
    merged_dirs = sorted({rel.split("/")[1] for rel in Store(root).list("models")})
    assert len(merged_dirs) == 1
    assert Store(f"{root}/models/{merged_dirs[0]}").is_file("chatvec_manifest.json")
    assert Store(root).is_file("reports/night-1/index.html")
    # the merged model and the CP baseline were evaluated on different nodes, each from its own cache
    gained = {name: sorted(set(sweep["caches"][name]) - set(report["eval"]["caches"][name])) for name in NODES}
    assert all(len(g) == 1 for g in gained.values()), gained
    want = [f"{root}/models/{merged_dirs[0]}", f"{multinode['bucket']}/sweep/cp"]
    copied = [_which(spec["node_caches"][name], gained[name], want)[0] for name in NODES]
    assert sorted(copied) == sorted(want)


def test_nothing_was_written_to_the_drivers_disk(multinode):
    assert listing(multinode["driver_cache"]) == []
    assert listing(multinode["driver_cwd"]) == []


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec_path, report_path = sys.argv[1], sys.argv[2]
    result = _scenario(json.loads(Path(spec_path).read_text()))
    Path(report_path).write_text(json.dumps(result, indent=1))
    # skip C++ static destructors at exit (pyarrow's thread pools), as the chatvec command does
    sys.stdout.flush()
    os._exit(0)
