"""chatvec.merge.in_memory.merged_tensors gives exactly the bytes `chatvec merge` writes, tensor by tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    root = tmp_path_factory.mktemp("in_memory")
    return {
        "same": build_triple(root / "same", "llama", seed=21),
        "vocab": build_triple(root / "vocab", "llama", seed=22, cp_extra_tokens=2, chat_extra_tokens=2),
    }


def _written(folder: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Every tensor of the written shards, in file order, read straight from the safetensors bytes."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = []
    for name in sorted(set(index["weight_map"].values())):
        data = (folder / name).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        for tensor, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = e["data_offsets"]
            out.append((tensor, e["dtype"], tuple(e["shape"]), data[8 + n + a : 8 + n + b]))
    return out


CASES = {
    "add": ("same", dict(ratio=0.5), {}),
    "ties": ("same", dict(ratio=0.7, method="ties", density=0.4), {}),
    "dare": ("same", dict(ratio=0.5, method="dare", density=0.6, seed=5), {}),
    "by-token": ("vocab", dict(ratio=0.5), dict(embeddings="by-token", chat_tokens_from_chat=True)),
    "f32-out": ("same", dict(ratio=1.0), dict(dtype="float32")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_bytes_equal_the_written_shards(triples, tmp_path, case):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.in_memory import merged_tensors
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    which, spec, extra = CASES[case]
    t = triples[which]
    recipe = Recipe(cp=str(t.cp), vectors=[VectorSpec(base=str(t.base), chat=str(t.chat), **spec)], **extra)
    plan = build_plan(recipe, shard_size=60_000)
    assert len(plan.shards) > 1  # the order runs over shards too
    run_merge_job(plan, str(tmp_path / "out"), progress=False)
    written = _written(tmp_path / "out")
    got = list(merged_tensors(plan))
    assert [(n, d, s) for n, d, s, _ in got] == [(n, d, s) for n, d, s, _ in written]
    for (name, _, _, arr), (_, _, _, data) in zip(got, written):
        assert arr.dtype.name == "uint8" and arr.ndim == 1
        assert arr.tobytes() == data, name
