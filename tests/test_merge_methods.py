"""ties and dare on small hand-made tensors, against results worked out by hand."""

from __future__ import annotations

import filecmp
import hashlib
import json
from pathlib import Path

import pytest
import torch
from merge_ref import load_tensors

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}
TAU1 = [[3.0, -1.0, 0.5, -4.0], [2.0, 2.0, -2.0, 1.0]]
TAU2 = [[-1.0, -2.0, 1.0, 4.0], [-3.0, 1.0, 1.0, 0.5]]


def _ckpt(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture
def hand(tmp_path):
    z = torch.zeros(2, 4)
    norm = torch.tensor([0.5, -0.25])
    ids = torch.arange(5, dtype=torch.int64)  # an integer buffer: copied from the CP model
    return {
        "base": _ckpt(tmp_path / "base", {"w": z, "norm": norm, "ids": ids}),
        "chat1": _ckpt(tmp_path / "chat1", {"w": torch.tensor(TAU1), "norm": norm, "ids": ids + 1}),
        "chat2": _ckpt(tmp_path / "chat2", {"w": torch.tensor(TAU2), "norm": norm}),
        "cp": _ckpt(tmp_path / "cp", {"w": torch.ones(2, 4), "norm": torch.tensor([1.0, 2.0]), "ids": ids * 3}),
        "root": tmp_path,
    }


def _merge(hand, specs, name="out"):
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    vectors = [VectorSpec(base=str(hand["base"]), chat=str(hand[c]), **kw) for c, kw in specs]
    plan = build_plan(Recipe(cp=str(hand["cp"]), vectors=vectors))
    run_merge_job(plan, str(hand["root"] / name), progress=False)
    return load_tensors(hand["root"] / name)


def test_ties_trim_elect_disjoint_mean(hand):
    # density 0.5 keeps |tau| >= the 4th largest: tau1 keeps 3,-4,2,2,-2 (ties at 2 kept), tau2 all but 0.5
    # signs of the sum [[2,-2,1,0],[-1,3,-1,0]]; mean of the agreeing entries per element
    out = _merge(hand, [("chat1", dict(method="ties", density=0.5)), ("chat2", dict(method="ties", density=0.5))])
    expected = 1.0 + torch.tensor([[3.0, -2.0, 1.0, 0.0], [-3.0, 1.5, -2.0, 0.0]])
    assert torch.equal(out["w"], expected)
    assert torch.equal(out["norm"], torch.tensor([1.0, 2.0]))  # tau of norm is zero
    assert torch.equal(out["ids"], torch.arange(5, dtype=torch.int64) * 3)


def test_ties_weights_the_election_by_ratio(hand):
    out = _merge(
        hand, [("chat1", dict(method="ties", density=0.5)), ("chat2", dict(method="ties", density=0.5, ratio=0.5))]
    )
    expected = 1.0 + torch.tensor([[3.0, -1.0, 0.5, -4.0], [2.0, 1.25, -2.0, 0.0]])
    assert torch.equal(out["w"], expected)


def test_ties_with_one_vector_and_full_density_is_add(hand):
    out = _merge(hand, [("chat1", dict(method="ties", density=1.0, ratio=0.5))])
    assert torch.equal(out["w"], 1.0 + 0.5 * torch.tensor(TAU1))


def _splitmix_keep(seed: int, name: str, vector: int, n: int, density: float) -> list[bool]:
    """The documented drop rule, written out independently of chatvec's vectorised version."""
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}\0{vector}".encode()).digest()[:8], "little")
    mask = (1 << 64) - 1
    keep = []
    for j in range(n):
        z = (key + j + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        keep.append((z >> 40) < round(density * (1 << 24)))
    return keep


def test_dare_drops_and_rescales_as_documented(hand):
    out = _merge(hand, [("chat1", dict(method="dare", density=0.5, ratio=0.5, seed=4))])
    keep = _splitmix_keep(4, "w", 0, 8, 0.5)
    assert 0 < sum(keep) < 8
    tau = torch.tensor(TAU1).flatten()
    expected = 1.0 + torch.tensor([t * (0.5 / 0.5) if k else 0.0 for t, k in zip(tau.tolist(), keep)]).reshape(2, 4)
    assert torch.equal(out["w"], expected)


def test_dare_depends_on_seed_only(hand):
    a = _merge(hand, [("chat1", dict(method="dare", density=0.5, seed=1))], "a")
    b = _merge(hand, [("chat1", dict(method="dare", density=0.5, seed=1))], "b")
    c = _merge(hand, [("chat1", dict(method="dare", density=0.5, seed=2))], "c")
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_results_do_not_depend_on_chunking(tmp_path, monkeypatch):
    """Tiny jobs, tiny compute steps and several compute threads give the same bytes."""
    import chatvec.merge.jobs
    import chatvec.merge.kernels
    from chatvec.cluster.merge_driver import run_merge_job
    from chatvec.demo.tiny import build_triple
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    t = build_triple(tmp_path / "in", "llama", cp_extra_tokens=2, chat_extra_tokens=1, seed=21)
    recipe = Recipe(
        cp=str(t.cp),
        embeddings="by-token",
        chat_tokens_from_chat=True,
        vectors=[
            VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.7, method="dare", density=0.6, seed=9),
            VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.3),
        ],
    )
    run_merge_job(build_plan(recipe), str(tmp_path / "big"), progress=False)
    import chatvec.merge.shard_writer

    monkeypatch.setattr(chatvec.merge.jobs, "JOB_ELEMS", 77)
    monkeypatch.setattr(chatvec.merge.kernels.NumpyBackend.__init__, "__defaults__", (13,))
    monkeypatch.setattr(chatvec.merge.shard_writer, "compute_threads", lambda device: 3)  # jobs finish out of order
    run_merge_job(build_plan(recipe), str(tmp_path / "small"), progress=False)
    shards = sorted(p.name for p in (tmp_path / "big").glob("*.safetensors"))
    assert shards and all(filecmp.cmp(tmp_path / "big" / s, tmp_path / "small" / s, shallow=False) for s in shards)


def test_dare_ties_drops_rescales_then_elects(hand):
    # dare's documented drop on each vector (its own index), rescaled by 1/density, then the
    # ties election and disjoint mean, worked out here element by element
    out = _merge(
        hand,
        [
            ("chat1", dict(method="dare_ties", density=0.5, seed=4)),
            ("chat2", dict(method="dare_ties", density=0.5, ratio=0.5, seed=4)),
        ],
    )
    keep1, keep2 = _splitmix_keep(4, "w", 0, 8, 0.5), _splitmix_keep(4, "w", 1, 8, 0.5)
    assert keep1 != keep2 and 0 < sum(keep1) < 8 and 0 < sum(keep2) < 8
    w1 = [t * 2.0 if k else 0.0 for t, k in zip(torch.tensor(TAU1).flatten().tolist(), keep1)]
    w2 = [t * 0.5 * 2.0 if k else 0.0 for t, k in zip(torch.tensor(TAU2).flatten().tolist(), keep2)]
    expected = []
    for a, b in zip(w1, w2):
        sign = (a + b > 0) - (a + b < 0)
        agreeing = [w for w in (a, b) if w != 0 and (w > 0) - (w < 0) == sign]
        expected.append(sum(agreeing) / max(1, len(agreeing)))
    assert torch.equal(out["w"], 1.0 + torch.tensor(expected).reshape(2, 4))


def test_dare_ties_at_full_density_is_ties_at_full_density(hand):
    a = _merge(
        hand, [("chat1", dict(method="dare_ties", density=1.0)), ("chat2", dict(method="dare_ties", density=1.0))], "a"
    )
    b = _merge(hand, [("chat1", dict(method="ties", density=1.0)), ("chat2", dict(method="ties", density=1.0))], "b")
    assert torch.equal(a["w"], b["w"])
    # the election differs from adding: with signs that disagree the mean is not the sum
    assert not torch.equal(a["w"], 1.0 + torch.tensor(TAU1) + torch.tensor(TAU2))
