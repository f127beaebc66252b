"""TIES' threshold found in a streaming pass (merge/ties_threshold.py) is np.partition's, exactly,
whatever the job size, and the merged bytes do not depend on how a tensor is cut into jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from chatvec.demo.tiny import build_triple

    return build_triple(tmp_path_factory.mktemp("ties"), "llama", seed=41, cp_extra_tokens=2, chat_extra_tokens=3)


def _plan(t, density: float, **extra):
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec

    vectors = [
        VectorSpec(base=str(t.base), chat=str(t.chat), ratio=0.8, method="ties", density=density),
        VectorSpec(base=str(t.base), chat=str(t.cp), ratio=0.3, method="ties", density=density / 2),
    ]
    return build_plan(Recipe(cp=str(t.cp), vectors=vectors, **extra))


def _full_abs_tau(plan, task, term_index: int) -> np.ndarray:
    """|tau| of the whole tensor the plain way (zeros where the vector has no row)."""
    from chatvec.merge.job_buffer import tau_into
    from chatvec.merge.jobs import task_jobs
    from chatvec.merge.kernels import NumpyBackend
    from chatvec.merge.shard_writer import Readers

    readers = Readers(plan)
    full = np.zeros(task.numel, np.float32)
    for job in task_jobs(task):
        buf = np.empty(job.in_bytes, np.uint8)
        readers.read_inputs(job, buf)
        for p in job.terms[term_index].pieces:
            tau_into(
                NumpyBackend(),
                buf,
                p,
                p.out,
                p.out + p.n,
                full[job.start + p.out : job.start + p.out + p.n],
                np.empty(p.n, np.float32),
            )
    readers.close()
    return np.abs(full)


@pytest.mark.parametrize(("job_elems", "density"), [(37, 0.3), (1000, 0.9), (1 << 21, 0.3)])
def test_streaming_threshold_is_the_kth_largest(triple, monkeypatch, job_elems, density):
    import chatvec.merge.jobs
    from chatvec.merge.kernels import ties_threshold_k
    from chatvec.merge.shard_writer import Readers
    from chatvec.merge.ties_threshold import term_threshold

    plan = _plan(triple, density, embeddings="by-token")
    monkeypatch.setattr(chatvec.merge.jobs, "JOB_ELEMS", job_elems)
    readers = Readers(plan)
    checked = 0
    for task in plan.tasks.values():
        for i, term in enumerate(task.terms):
            a = _full_abs_tau(plan, task, i)
            k = ties_threshold_k(term.density, sum(s.n for s in term.segments))
            want = None if k >= a.size else float(np.partition(a, a.size - k)[a.size - k])
            assert term_threshold(task, i, readers.read_inputs) == want, task.name
            checked += 1
    readers.close()
    assert checked > 10


def test_merged_bytes_do_not_depend_on_the_job_size(triple, tmp_path, monkeypatch):
    import chatvec.merge.jobs
    from chatvec.cluster.merge_driver import run_merge_job

    run_merge_job(_plan(triple, 0.4, embeddings="by-token"), str(tmp_path / "one"), progress=False)
    monkeypatch.setattr(chatvec.merge.jobs, "JOB_ELEMS", 777)
    run_merge_job(_plan(triple, 0.4, embeddings="by-token"), str(tmp_path / "many"), progress=False)
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def test_threshold_with_ties_zeros_and_specials(tmp_path):
    """Many equal magnitudes, zeros, infinities and NaNs: the same pick as np.partition."""
    import torch
    from safetensors.torch import save_file

    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec
    from chatvec.merge.shard_writer import Readers
    from chatvec.merge.ties_threshold import term_threshold

    rng = np.random.default_rng(5)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}
    n = 20_000
    values = {
        "base": np.zeros(n, np.float32),
        "chat": rng.choice(np.array([0.0, -0.0, 1.5, -1.5, 2.0, np.inf, -np.inf, np.nan], np.float32), size=n),
        "cp": np.ones(n, np.float32),
    }
    for role, v in values.items():
        (tmp_path / role).mkdir()
        save_file({"w": torch.from_numpy(v)}, str(tmp_path / role / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / role / "config.json").write_text(json.dumps(config))
    a = np.abs(values["chat"])
    for density in (0.05, 0.2, 0.5, 0.7, 0.99):
        recipe = Recipe(
            cp=str(tmp_path / "cp"),
            vectors=[
                VectorSpec(base=str(tmp_path / "base"), chat=str(tmp_path / "chat"), method="ties", density=density)
            ],
        )
        plan = build_plan(recipe)
        readers = Readers(plan)
        got = term_threshold(plan.tasks["w"], 0, readers.read_inputs)
        readers.close()
        k = int(np.ceil(density * n - 1e-9))
        want = np.partition(a, n - k)[n - k]
        assert (np.isnan(want) and got is not None and np.isnan(got)) or got == float(want), density


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    ("case", "passes"),
    [("like", 1), ("first-job-unlike-the-rest", 2), ("too-many-in-the-guessed-bins", 2)],
)
def test_one_pass_when_the_first_job_guesses_the_bin_and_exact_either_way(tmp_path, monkeypatch, dtype, case, passes):
    """The first job's sample guesses bins around the k-th largest; a right guess needs one
    pass over the tensor, a wrong one (or an overflowing buffer) a second: the same threshold."""
    import torch
    from safetensors.torch import save_file

    import chatvec.merge.jobs
    import chatvec.merge.ties_threshold as ties_threshold
    from chatvec.merge.fused import kernel
    from chatvec.merge.plan import build_plan
    from chatvec.merge.recipe import Recipe, VectorSpec
    from chatvec.merge.shard_writer import Readers

    kernel(wait=True)  # bf16 then goes through the fused kernels where numba is installed
    monkeypatch.setattr(chatvec.merge.jobs, "JOB_ELEMS", 5000)
    if case == "too-many-in-the-guessed-bins":
        monkeypatch.setattr(ties_threshold, "_ROOM", 50)
    rng = np.random.default_rng(11)
    n = 50_000
    base = rng.standard_normal(n).astype(np.float32)
    tau = rng.standard_normal(n).astype(np.float32) * np.float32(0.01)
    if case == "first-job-unlike-the-rest":
        tau[:5000] *= np.float32(1000)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8}
    tensors = {"base": base, "chat": base + tau, "cp": base}
    for role, v in tensors.items():
        (tmp_path / role).mkdir()
        t = torch.from_numpy(v).to(getattr(torch, dtype))
        save_file({"w": t}, str(tmp_path / role / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / role / "config.json").write_text(json.dumps(config))
    decoded = {r: torch.from_numpy(v).to(getattr(torch, dtype)).to(torch.float32).numpy() for r, v in tensors.items()}
    a = np.abs(decoded["chat"] - decoded["base"])
    spec = VectorSpec(base=str(tmp_path / "base"), chat=str(tmp_path / "chat"), method="ties", density=0.3)
    plan = build_plan(Recipe(cp=str(tmp_path / "cp"), vectors=[spec]))
    readers = Readers(plan)
    reads = []

    def read(job, buf):
        reads.append(job.start)
        readers.read_inputs(job, buf)

    got = ties_threshold.term_threshold(plan.tasks["w"], 0, read)
    readers.close()
    k = int(np.ceil(0.3 * n - 1e-9))
    assert got == float(np.partition(a, n - k)[n - k])
    assert len(reads) == 1 + passes * 10  # the sample (the first job), then the passes
