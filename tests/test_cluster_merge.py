"""The Ray-distributed merge: right numbers through 2 actors (local folder and S3), logical-GPU
placement, cached recipes, and refusing a second merge into the same output."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from ray_merge import WatchedMerge

from chatvec.cluster.merge_driver import run_merge_job
from chatvec.core.config import ChatvecConfig
from chatvec.core.errors import ConfigError
from chatvec.core.lock import OutputLockedError
from chatvec.core.storage import Store

RATIO = 0.5


def build_small_triple(root: Path):
    from chatvec.demo.tiny import build_triple

    return build_triple(root, "llama", seed=3, shard_size="50KB")


def make_plan(triple, *, ratio: float = RATIO, shard_size: str | int = "50KB", inputs: dict | None = None):
    from chatvec.core.units import parse_size
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    src = inputs or {"cp": str(triple.cp), "base": str(triple.base), "chat": str(triple.chat)}
    recipe = Recipe(cp=src["cp"], vectors=[VectorSpec(base=src["base"], chat=src["chat"], ratio=ratio)])
    return build_plan(recipe, shard_size=parse_size(shard_size))


def make_config(**merge) -> ChatvecConfig:
    cfg = ChatvecConfig()
    return cfg.model_copy(update={"merge": cfg.merge.model_copy(update=merge)})


def read_tensors(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    store = Store(uri)
    tensors: dict[str, torch.Tensor] = {}
    for rel in store.list():
        if rel.endswith(".safetensors") and "/" not in rel:
            tensors.update(load(store.read_bytes(rel)))
    return tensors


def assert_matches_reference(out_uri: str, triple, *, ratio: float) -> None:
    """Every output tensor equals cp + ratio * (chat - base) computed in float64, up to the one
    rounding to the output dtype (float32 arithmetic may land one bf16 step off at a tie)."""
    out = read_tensors(out_uri)
    cp, base, chat = (read_tensors(str(p)) for p in (triple.cp, triple.base, triple.chat))
    assert out and set(out) == set(cp)
    index = json.loads(Store(out_uri).read_text("model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(out)
    for name, got in out.items():
        assert got.dtype == cp[name].dtype and got.shape == cp[name].shape, name
        ref = cp[name].double() + ratio * (chat[name].double() - base[name].double())
        step = torch.pow(2.0, torch.floor(torch.log2(ref.abs().clamp_min(2.0**-126))) - 7)
        err = (got.double() - ref).abs()
        assert bool((err <= step).all()), f"{name}: max error {float(err.max())} over one bf16 step"


def output_files(uri: str) -> dict[str, bytes]:
    """Every file of a merged model except chatvec's own bookkeeping."""
    store = Store(uri)
    return {rel: store.read_bytes(rel) for rel in store.list() if not rel.startswith(".chatvec/")}


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return build_small_triple(tmp_path_factory.mktemp("triple"))


def test_two_actors_on_logical_gpus_give_the_reference_numbers(ray_cluster, triple, tmp_path, caplog):
    out = str(tmp_path / "merged")
    merge = WatchedMerge(make_plan(triple), out, workers=2, config=make_config(gpus_per_worker=1), device="auto")
    summary = merge.run()
    assert not summary.cached and summary.shards_resumed == 0
    assert summary.shards_written == len(merge.plan.shards) > 2

    # Ray gave each actor its own (logical) GPU; torch sees none here, so both computed on CPU.
    assert len(merge.actor_info) == 2
    visible = [info["cuda_visible_devices"] for info in merge.actor_info]
    assert None not in visible and visible[0] != visible[1]
    assert sorted(info["gpu_ids"][0] for info in merge.actor_info) == sorted(visible)
    assert {info["device"] for info in merge.actor_info} == {"cpu"}
    assert summary.device == "cpu"
    # both actors took a share of the shards
    assert len(merge.final_info) == 2 and all(info["shards_written"] > 0 for info in merge.final_info)
    assert sum(info["shards_written"] for info in merge.final_info) == summary.shards_written
    assert_matches_reference(out, triple, ratio=RATIO)


def test_s3_inputs_and_output_through_two_actors(ray_cluster, s3_server, triple):
    bucket = s3_server.make_bucket()
    inputs = {
        role: s3_server.upload_dir(getattr(triple, role), f"{bucket}/in/{role}") for role in ("cp", "base", "chat")
    }
    out = f"{bucket}/models/merged"
    summary = run_merge_job(
        make_plan(triple, inputs=inputs),
        out,
        workers=2,
        config=make_config(gpus_per_worker=0),
        device="cpu",
        overwrite=False,
    )
    assert summary.shards_written > 2 and not summary.cached
    assert Store(out).is_file("model.safetensors.index.json")
    assert_matches_reference(out, triple, ratio=RATIO)


def test_same_recipe_again_is_answered_from_the_store(ray_cluster, triple, tmp_path):
    out = str(tmp_path / "merged")
    config = make_config(gpus_per_worker=0)
    first = run_merge_job(make_plan(triple), out, workers=2, config=config, device="cpu", overwrite=False)
    assert not first.cached
    store = Store(out)
    before = {rel: store.mtime(rel) for rel in store.list()}

    again = WatchedMerge(make_plan(triple), out, workers=2, config=config, device="cpu")
    summary = again.run()
    assert summary.cached and summary.shards_written == 0
    assert again.actors == []  # no actor was started
    assert {rel: store.mtime(rel) for rel in store.list()} == before


def test_second_merge_into_the_same_output_is_refused(ray_cluster, triple, tmp_path):
    out = str(tmp_path / "merged")
    config = make_config(gpus_per_worker=0)
    first = WatchedMerge(make_plan(triple), out, workers=1, config=config, device="cpu")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", first.run()))
    thread.start()
    try:
        assert first.actors_ready.wait(120), "the first merge never started its actors"
        with pytest.raises(OutputLockedError, match="being written by another merge"):
            run_merge_job(make_plan(triple), out, workers=1, config=config, device="cpu", overwrite=False)
    finally:
        thread.join(180)
    assert outcome["summary"].shards_written == len(first.plan.shards)
    assert_matches_reference(out, triple, ratio=RATIO)


def test_more_gpus_per_actor_than_the_cluster_has_is_a_config_error(ray_cluster, triple, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        run_merge_job(
            make_plan(triple),
            str(out),
            workers=2,
            config=make_config(gpus_per_worker=4),
            device="auto",
            overwrite=False,
        )
    assert not (out / "model.safetensors.index.json").exists()
    assert not Store(str(out)).exists(".chatvec/lock.json")


def test_two_shards_on_two_actors_go_to_both(ray_cluster, triple, tmp_path):
    total = make_plan(triple, shard_size="100MB").total_bytes
    plan = make_plan(triple, shard_size=total * 6 // 10)
    assert len(plan.shards) == 2
    out = str(tmp_path / "merged")
    summary = run_merge_job(plan, out, workers=2, config=make_config(gpus_per_worker=0), device="cpu", overwrite=False)
    manifest = json.loads(Store(out).read_text("chatvec_manifest.json"))
    writers = [manifest["files"][s.filename]["written_by"] for s in plan.shards]
    assert all(w.startswith("merge actor ") for w in writers)
    assert len(set(writers)) == 2, writers
    assert sorted(summary.bytes_by_worker.values()) == sorted(s.nbytes for s in plan.shards)
    assert "bytes per worker: merge actor 0" in summary.line()
    assert_matches_reference(out, triple, ratio=RATIO)
