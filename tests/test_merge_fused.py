"""The fused kernel (merge/fused.py) gives the numpy path's bytes, special values included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}


def _ckpt(folder: Path, bits: dict[str, np.ndarray]) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {k: torch.from_numpy(v.astype(np.int16)).view(torch.bfloat16) for k, v in bits.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bf16 models of random 16-bit patterns: NaNs, infinities, subnormals, signed zeros and all."""
    root = tmp_path_factory.mktemp("fused")
    rng = np.random.default_rng(7)
    shapes = {"a": (300, 257), "b": (5000,), "c": (1 << 21) + 3}  # c spans two jobs
    out = {}
    for role in ("base", "chat1", "chat2", "cp"):
        bits = {k: rng.integers(0, 1 << 16, size=s, dtype=np.uint16) for k, s in shapes.items()}
        # a run of every pattern, so each one meets the rounding at least once
        bits["b"][: 1 << 12] = np.arange(1 << 16, dtype=np.uint16)[::16]
        out[role] = _ckpt(root / role, bits)
    return out


def _jobs(models, vectors, **recipe):
    from chatvec.merge.jobs import task_jobs
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    specs = [VectorSpec(base=str(models["base"]), chat=str(models[c]), **kw) for c, kw in vectors]
    plan = build_plan(Recipe(cp=str(models["cp"]), vectors=specs, **recipe))
    return plan, [j for i in range(len(plan.shards)) for t in plan.shard_tasks(i) for j in task_jobs(t)]


@pytest.mark.parametrize(
    "vectors",
    [
        [("chat1", dict(ratio=0.5))],
        [("chat1", dict(ratio=0.7)), ("chat2", dict(ratio=-1.3))],
        [("chat1", dict(ratio=1.0, method="dare", density=1.0, seed=3))],
        [("chat1", dict(ratio=0.8, method="dare", density=0.3, seed=3))],
        [("chat1", dict(ratio=0.7, method="dare", density=0.6, seed=5)), ("chat2", dict(ratio=-1.3))],
    ],
    ids=["one", "two", "dare-density-1", "dare", "dare-and-add"],
)
def test_fused_kernel_gives_the_numpy_bytes(models, vectors):
    pytest.importorskip("numba")
    from chatvec.merge.shard_writer import Readers

    plan, jobs = _jobs(models, vectors)
    readers = Readers(plan)
    assert _fused_jobs_match_numpy(jobs, readers) == len(jobs) == 4
    readers.close()


def _fused_jobs_match_numpy(jobs, readers) -> int:
    """How many of the jobs a fused kernel computed; each one's bytes equal the numpy path's."""
    from chatvec.merge.compute import Scratch, compute_job
    from chatvec.merge.fused import try_fused
    from chatvec.merge.kernels import NumpyBackend

    backend = NumpyBackend()
    numpy_only = Scratch(backend, backend.step)
    numpy_only.fused = False
    fused = 0
    with np.errstate(all="ignore"):
        for job in jobs:
            buf = np.empty(job.in_bytes, np.uint8)
            readers.read_inputs(job, buf)
            want = np.empty(job.out_bytes, np.uint8)
            compute_job(backend, job, buf, want, numpy_only)
            got = np.full(job.out_bytes, 0xAB, np.uint8)
            if try_fused(job, buf, got, wait=True):
                fused += 1
                assert np.array_equal(got, want), job.task.name
    return fused


@pytest.mark.parametrize(
    "vectors",
    [
        [("chat1", dict(ratio=0.5, method="ties", density=0.5))],
        [("chat1", dict(ratio=1.0, method="ties", density=1.0))],
        [
            ("chat1", dict(ratio=0.7, method="ties", density=0.3)),
            ("chat2", dict(ratio=-1.3, method="ties", density=0.6)),
        ],
        [("chat1", dict(ratio=0.7, method="ties", density=0.3)), ("chat2", dict(ratio=0.4, method="dare_ties"))],
        [("chat1", dict(ratio=0.9, method="dare_ties", density=0.4, seed=2))],
        [
            ("chat1", dict(ratio=0.7, method="ties", density=0.3)),
            ("chat2", dict(ratio=0.4, method="dare_ties", density=0.5, seed=9)),
        ],
    ],
    ids=["one", "one-keep-all", "two", "with-dare_ties-density-1", "dare_ties", "ties-and-dare_ties"],
)
def test_ties_kernels_give_the_numpy_thresholds_and_bytes(models, monkeypatch, vectors):
    """Both TIES counting passes and the TIES merge, against numpy, on every bf16 pattern."""
    pytest.importorskip("numba")
    import chatvec.merge.ties_threshold as ties_threshold
    from chatvec.merge.fused import kernel
    from chatvec.merge.shard_writer import Readers

    assert kernel(wait=True) is not None
    plan, jobs = _jobs(models, vectors)
    readers = Readers(plan)
    tasks = {id(job.task): job.task for job in jobs}.values()
    with np.errstate(all="ignore"):
        fused_thresholds = {t.name: ties_threshold.tensor_thresholds(t, readers.read_inputs) for t in tasks}
        monkeypatch.setattr(ties_threshold, "histogram_kernel", lambda wait: None)
        monkeypatch.setattr(ties_threshold, "collect_kernel", lambda wait: None)
        numpy_thresholds = {t.name: ties_threshold.tensor_thresholds(t, readers.read_inputs) for t in tasks}
        assert fused_thresholds == numpy_thresholds
        trimming = any(kw["method"] == "ties" and kw.get("density", 1.0) < 1 for _, kw in vectors)
        assert any(v is not None for th in numpy_thresholds.values() for v in th.values()) == trimming
    for job in jobs:
        job.thresholds = numpy_thresholds[job.task.name]
    assert _fused_jobs_match_numpy(jobs, readers) == len(jobs) == 4
    readers.close()


def test_jobs_it_does_not_cover_take_the_numpy_path(models):
    pytest.importorskip("numba")
    from chatvec.merge.fused import try_fused

    _, jobs = _jobs(models, [("chat1", dict(ratio=0.5, method="ties", density=0.5)), ("chat2", dict(ratio=0.5))])
    _, wide = _jobs(models, [("chat1", dict(ratio=0.5, method="dare", density=0.5))], dtype="float32")
    jobs += wide
    for job in jobs:
        assert not try_fused(job, np.empty(job.in_bytes, np.uint8), np.empty(job.out_bytes, np.uint8), wait=True)
