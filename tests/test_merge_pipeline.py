"""The one merge sequence (merge/pipeline.py): lock TTL, clean-up and who wrote what, in process."""

from __future__ import annotations

import json

import pytest

from chatvec.core.lock import LOCK_FILE
from chatvec.core.storage import Store


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("pipeline"), "llama", seed=31, shard_size="50KB")


def _plan(t, shard_size: int = 60_000):
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    return build_plan(
        Recipe(cp=str(t.cp), vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.5)]), shard_size=shard_size
    )


class _Watching:
    """The in-process executor, reading the output lock while it writes (what another merge sees)."""

    def __init__(self, inner, store: Store) -> None:
        self.inner, self.store, self.locks = inner, store, []

    def write_shards(self, pending, on_bytes):
        for item in self.inner.write_shards(pending, on_bytes):
            self.locks.append(json.loads(self.store.read_text(LOCK_FILE)))
            yield item

    def devices(self):
        return self.inner.devices()

    def close(self):
        self.inner.close()


def test_workers_0_uses_the_configured_lock_ttl_and_names_the_writer(triple, tmp_path):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core.config import ChatvecConfig
    from chatvec.merge.pipeline import LocalShardExecutor, run_merge

    cfg = ChatvecConfig()
    cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"lock_ttl_s": 123.0})})
    plan = _plan(triple)
    out = Store(str(tmp_path / "out"))
    watching = _Watching(LocalShardExecutor(plan, out), out)
    summary = run_merge(plan, out, lambda: watching, lock_ttl_s=cfg.merge.lock_ttl_s, progress=False)
    assert watching.locks and {lock["ttl_s"] for lock in watching.locks} == {123.0}
    assert not out.exists(LOCK_FILE)
    manifest = json.loads(out.read_text("chatvec_manifest.json"))
    writers = {manifest["files"][s.filename]["written_by"] for s in plan.shards}
    assert len(writers) == 1 and writers.pop().startswith("in-process pid ")
    assert summary.shards_written == len(plan.shards) > 1
    # the CLI's entry point reads the same setting for --workers 0
    again = run_merge_job(plan, str(tmp_path / "out"), workers=0, device="cpu", overwrite=False, config=cfg)
    assert again.cached


def test_leftover_temporary_files_are_removed_in_process_too(triple, tmp_path):
    from chatvec.cluster.merge_driver import run_merge_job

    plan = _plan(triple)
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / f"{plan.shards[0].filename}.tmp-0123abcd"
    leftover.write_bytes(b"half a shard")
    run_merge_job(plan, str(out), progress=False)
    assert not leftover.exists()
    assert (out / "chatvec_manifest.json").is_file()


def test_overwrite_replaces_another_commit_under_the_lock(triple, tmp_path):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core.errors import OutputExistsError

    out = str(tmp_path / "out")
    run_merge_job(_plan(triple), out, progress=False)
    other = _plan(triple, shard_size=90_000)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_merge_job(other, out, progress=False)
    summary = run_merge_job(other, out, overwrite=True, progress=False)
    assert not summary.cached and summary.shards_written == len(other.shards)
    manifest = json.loads(Store(out).read_text("chatvec_manifest.json"))
    assert manifest["fingerprint"] == other.fingerprint()
    stale = [p.name for p in (tmp_path / "out").glob("*.safetensors") if p.name not in manifest["files"]]
    assert not stale
