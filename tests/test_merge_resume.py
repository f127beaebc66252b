"""Resume after a crash, cache hits, and object storage (a real S3 API on loopback)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("r") / "t", "mistral", seed=51)


def _plan(t, ratio=0.5):
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    return build_plan(
        Recipe(cp=str(t.cp), vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), ratio=ratio)]), shard_size=40_000
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _identical(a: Path, b: Path, names: list[str]) -> bool:
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_resume_keeps_verified_shards_and_is_byte_identical(triple, tmp_path):
    from chatvec.cluster.merge_driver import run_merge_job

    plan = _plan(triple)
    assert len(plan.shards) >= 4
    clean = run_merge_job(plan, str(tmp_path / "clean"), progress=False)
    assert clean.shards_written == len(plan.shards)
    out = tmp_path / "crashed"
    run_merge_job(plan, str(out), progress=False)
    # a crash before the commit: no index or manifest; one shard never written, one half-garbage
    (out / "chatvec_manifest.json").unlink()
    (out / "model.safetensors.index.json").unlink()
    (out / plan.shards[1].filename).unlink()
    damaged = out / plan.shards[2].filename
    data = bytearray(damaged.read_bytes())
    data[-10:] = b"\xff" * 10
    damaged.write_bytes(bytes(data))
    kept = out / plan.shards[0].filename
    kept_mtime = kept.stat().st_mtime_ns
    summary = run_merge_job(_plan(triple), str(out), progress=False)
    assert (summary.shards_written, summary.shards_resumed) == (2, len(plan.shards) - 2)
    assert kept.stat().st_mtime_ns == kept_mtime
    names = [s.filename for s in plan.shards] + ["model.safetensors.index.json", "config.json", "tokenizer.json"]
    assert _identical(tmp_path / "clean", out, names)


def test_same_recipe_is_a_cache_hit(triple, tmp_path, capsys):
    from chatvec.cli.main import main

    args = [
        "merge",
        "--cp",
        str(triple.cp),
        "--base",
        str(triple.base),
        "--chat",
        str(triple.chat),
        "--ratio",
        "0.5",
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "0",
    ]
    main(args)
    mtimes = {n: os.stat(tmp_path / "o" / n).st_mtime_ns for n in _files(tmp_path / "o")}
    main(args)
    assert "already merged" in capsys.readouterr().out
    assert mtimes == {n: os.stat(tmp_path / "o" / n).st_mtime_ns for n in _files(tmp_path / "o")}


def test_changed_input_is_not_a_cache_hit(triple, tmp_path):
    import shutil

    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.output import check_output

    cp = shutil.copytree(triple.cp, tmp_path / "cp")
    t = type(triple)(base=triple.base, chat=triple.chat, cp=cp)
    run_merge_job(_plan(t), str(tmp_path / "o"), progress=False)
    assert check_output(_plan(t), str(tmp_path / "o"), overwrite=False) is not None
    shard = sorted(cp.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    from chatvec.core.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        check_output(_plan(t), str(tmp_path / "o"), overwrite=False)


def test_inputs_and_output_on_s3(triple, tmp_path, s3_server):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.core.storage import Store

    bucket = s3_server.make_bucket()
    remote = {r: s3_server.upload_dir(getattr(triple, r), f"{bucket}/models/{r}") for r in ("base", "chat", "cp")}
    local = run_merge_job(_plan(triple), str(tmp_path / "local"), progress=False)
    t = type(triple)(**remote)
    plan = _plan(t)
    summary = run_merge_job(plan, f"{bucket}/merged", progress=False)
    assert summary.shards_written == len(plan.shards) and local.total_bytes == summary.total_bytes
    store = Store(f"{bucket}/merged")
    assert store.is_file("chatvec_manifest.json")
    for shard in plan.shards:
        assert store.read_bytes(shard.filename) == (tmp_path / "local" / shard.filename).read_bytes()
    again = run_merge_job(_plan(t), f"{bucket}/merged", progress=False)
    assert again.cached
