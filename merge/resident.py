"""Merge points computed from inputs held in memory: a sweep reads CP and its vectors once, then
each point costs one pass over memory instead of a read of every input from storage.

Held per tensor, on one device (the engine's):
    the CP tensor in its own dtype;
    each vector's tau = float32(chat) - float32(base), as float32: the very value merge/compute.py
    computes, so later steps see the same operands. Where a term pairs chat and base rows at
    different offsets (vocabularies matched by token), chat and base are held instead.

A point is then written into tensors the caller gives (an engine's parameters, or staging
buffers its weight loader copies from):
    add (and dare), whole tensors, finite inputs: acc = cp + tau * ratio per term (the multiply
    and the add rounded separately, no fused multiply-add; the multiply skipped only where the
    kernels skip it, ratio 1), then one cast to the output dtype: the operations and order of
    merge/compute.py, so the same bits. On the CPU, one vector and bf16 or float32 tensors, a
    one-pass numba kernel does it, dare's seeded drop included (merge/resident_numba.py);
    otherwise torch in cache-sized blocks (add only). Inputs are checked to be finite and small enough that no sum can overflow, so no NaN
    (whose bit pattern torch and numpy write differently) can arise;
    everything else (ties, dare, dare_ties, rows matched by token, non-finite inputs): the very
    ``compute_job`` of ``chatvec merge`` over a job buffer filled from memory instead of files,
    with the threshold search of merge/ties_threshold.py: exact by construction.

Ratios are read per tensor from the plan's terms (``Term.ratio``), never from the recipe.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from chatvec.core.storage import Store
from chatvec.merge.compute import Scratch, compute_job
from chatvec.merge.fused import warm_up
from chatvec.merge.jobs import task_jobs
from chatvec.merge.kernels import NumpyBackend, dare_cutoff, dare_key, make_backend
from chatvec.merge.methods import drops
from chatvec.merge.plan import MergePlan, RawCopy, Segment, Source, TensorTask, Term
from chatvec.merge.safetensors_format import FLOAT_DTYPES, ITEMSIZE
from chatvec.merge.ties_threshold import tensor_thresholds

logger = logging.getLogger(__name__)

TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
BLOCK = 1 << 20  # elements per step of the add path: a few MB of float32, inside the CPU caches
_SAFE = 1e37  # below float32's largest (3.4e38) with room for the rounding of each partial sum

Key = tuple  # ("raw", uri, rel, offset) or ("tau", chat key, base key or None)
Dest = Callable[[TensorTask], object]  # a task -> a torch tensor of task.numel elements, or None


def _raw_key(plan: MergePlan, src: Source) -> Key:
    uri, rel = plan.files[src.file]
    return ("raw", uri, rel, src.offset)


def _tau_held(term: Term) -> bool:
    """Whether tau can be held per chat element: base and chat pair element j with element j."""
    if term.base is None:
        return True
    return term.base.numel == term.chat.numel and all(s.base == s.chat for s in term.segments)


def _needs(plan: MergePlan) -> dict[Key, tuple[int, tuple]]:
    """Every entry the plan reads: key -> (bytes held, how to build it)."""
    out: dict[Key, tuple[int, tuple]] = {}

    def raw(src: Source) -> None:
        out.setdefault(_raw_key(plan, src), (src.numel * ITEMSIZE[src.dtype], ("raw", src)))

    for task in plan.tasks.values():
        if task.cp is not None:
            raw(task.cp)
        for term in task.terms:
            if _tau_held(term):
                base = _raw_key(plan, term.base) if term.base is not None else None
                key = ("tau", _raw_key(plan, term.chat), base)
                out.setdefault(key, (term.chat.numel * 4, ("tau", term.chat, term.base)))
            else:
                raw(term.chat)
                raw(term.base)
        for copy in task.raw:
            raw(copy.source)
    return out


def _term_key(plan: MergePlan, term: Term) -> tuple:
    """What a term's TIES threshold depends on: its inputs, method, density and rows (not its ratio)."""
    base = _raw_key(plan, term.base) if term.base is not None else None
    return (term.method, term.density, _raw_key(plan, term.chat), base, str(term.segments))


def why_not_resident(plan: MergePlan) -> str | None:
    """Why ``plan`` cannot be computed from memory (None: it can)."""
    if any(t.mergekit is not None for t in plan.tasks.values()):
        return "mergekit mode computes tau in the output dtype, not from float32 tau"
    return None


def memory_budget(device: str) -> int:
    """Bytes residency may take on ``device``: free device memory, or the host's available
    memory, less a margin for the engine's own work (10%, at least 1 GiB)."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return max(0, free - max(1 << 30, total // 10))
    available, total = _meminfo()
    return max(0, available - max(1 << 30, total // 10))


def _meminfo() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):  # not Linux: what the OS reports through sysconf
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, os.sysconf("SC_PHYS_PAGES") * size


def _amax(values: np.ndarray) -> float:
    """max |value| (NaN when any is NaN: np.max propagates it), 0 for an empty tensor."""
    return float(np.abs(values).max()) if values.size else 0.0


_NUMBA: list = []  # [] not loaded yet; [None] unavailable; [module] ready


def _numba_kernels():
    if not _NUMBA:
        module = None
        if os.environ.get("CHATVEC_KERNEL", "auto") != "numpy":
            try:
                from chatvec.merge import resident_numba as module
            except Exception as exc:  # no numba, or no cache folder: torch gives the same bytes
                logger.info("resident add kernel unavailable (%s): using torch", exc)
        _NUMBA.append(module)
    return _NUMBA[0]


class ResidentMerge:
    """CP tensors and vector taus held on ``device``; any plan over them computed from memory.
    ``kernel``: "auto" (numba's one-pass add where it applies) or "torch" (torch only)."""

    def __init__(self, device: str = "cpu", kernel: str = "auto") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.kernel = kernel
        self.entries: dict[Key, object] = {}  # key -> 1-D torch tensor
        # float entries: the largest |value|, NaN or inf when any value is not finite (numpy, on
        # the host: torch's thread pool stalls on a busy machine, and this runs once per tensor)
        self.amax: dict[Key, float] = {}
        self._blocks: dict[str, object] = {}
        self._backend = NumpyBackend()
        self._scratch: Scratch | None = None
        self._last: tuple[MergePlan | None, dict] = (None, {})  # the latest plan's needs
        # TIES' trim thresholds depend on tau and density, not on the ratio: found once per sweep
        self._thresholds: dict[tuple, object] = {}

    def _needs(self, plan: MergePlan) -> dict[Key, tuple[int, tuple]]:
        if self._last[0] is not plan:  # a swap asks for its plan's needs several times
            self._last = (plan, _needs(plan))
        return self._last[1]

    # -- what is held ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def missing_bytes(self, plan: MergePlan) -> int:
        """Bytes ``load(plan)`` would add."""
        return sum(n for key, (n, _) in self._needs(plan).items() if key not in self.entries)

    def load(self, plan: MergePlan) -> float:
        """Read what ``plan`` needs and is not held yet; returns the seconds it took."""
        start = time.perf_counter()
        readers: dict[tuple[str, str], object] = {}
        stores: dict[str, Store] = {}

        def read(src: Source) -> np.ndarray:
            uri, rel = plan.files[src.file]
            if (uri, rel) not in readers:
                store = stores.get(uri) or stores.setdefault(uri, Store(uri))
                readers[uri, rel] = store.open_reader(rel)
            buf = np.empty(src.numel * ITEMSIZE[src.dtype], np.uint8)
            readers[uri, rel].readinto_at(src.offset, memoryview(buf))
            return buf

        try:
            for key, (_, (kind, *srcs)) in self._needs(plan).items():
                if key in self.entries:
                    continue
                if kind == "raw":
                    (src,) = srcs
                    data = read(src)
                    if src.dtype in FLOAT_DTYPES:
                        values = np.empty(src.numel, np.float32)
                        self._backend.decode(data, src.dtype, values)
                        self.amax[key] = _amax(values)
                    self.entries[key] = self._torch_view(data, src.dtype).to(self.device)
                else:
                    chat, base = srcs
                    tau = np.empty(chat.numel, np.float32)
                    self._backend.decode(read(chat), chat.dtype, tau)
                    if base is not None:  # as merge/job_buffer.py:tau_into computes it
                        other = np.empty(chat.numel, np.float32)
                        self._backend.decode(read(base), base.dtype, other)
                        tau -= other
                    self.amax[key] = _amax(tau)
                    self.entries[key] = self.torch.from_numpy(tau).to(self.device)
        finally:
            for r in readers.values():
                r.close()
        return time.perf_counter() - start

    def _torch_view(self, data: np.ndarray, dtype: str):
        torch = self.torch
        return torch.from_numpy(data).view(getattr(torch, TORCH_DTYPES[dtype]))

    def release(self) -> None:
        self.entries.clear()
        self.amax.clear()
        self._blocks.clear()
        self._last = (None, {})
        self._thresholds.clear()

    # -- a point ----------------------------------------------------------------------------------
    def write(self, plan: MergePlan, dest: Dest) -> Iterator[tuple[TensorTask, object]]:
        """For every tensor of ``plan`` in checkpoint order: ``dest(task)`` (a tensor of
        task.numel elements, any dtype that holds the output dtype's values, or None to skip)
        gets the point's value, cast to the output dtype first; yields (task, that tensor)."""
        for index in range(len(plan.shards)):
            for task in plan.shard_tasks(index):
                target = dest(task)
                if target is None:
                    continue
                flat = target.view(-1)
                if flat.numel() != task.numel:
                    raise ValueError(f"{task.name}: {task.numel} elements to write, the target holds {flat.numel()}")
                terms = self._add_terms(plan, task)
                if terms is None or not self._add_into(flat, self.entries[_raw_key(plan, task.cp)], terms, task.dtype):
                    data = self._compute_job(plan, task)
                    flat.copy_(self._torch_view(data, task.dtype).to(flat.device))
                yield task, target

    def tensors(self, plan: MergePlan) -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray]]:
        """What chatvec.merge.in_memory.merged_tensors yields, computed from memory (for checks)."""
        torch = self.torch

        def fresh(task: TensorTask):
            return torch.empty(task.numel, dtype=getattr(torch, TORCH_DTYPES[task.dtype]), device=self.device)

        for task, tensor in self.write(plan, fresh):
            data = tensor.cpu().view(torch.uint8).numpy() if task.numel else np.empty(0, np.uint8)
            yield task.name, task.dtype, tuple(task.shape), data

    def _add_terms(self, plan: MergePlan, task: TensorTask) -> list[tuple] | None:
        """[(tau, factor, drop)] when the add path gives the kernels' bits for ``task``, else None;
        drop: DARE's (key, cutoff) where the term drops entries (factor is then ratio / density)."""
        if task.mergekit is not None or task.raw or task.cp is None or task.cp.numel != task.numel:
            return None
        if task.dtype not in FLOAT_DTYPES or task.cp.dtype not in FLOAT_DTYPES:
            return [] if not task.terms and task.cp.dtype == task.dtype else None
        if task.terms and "F64" in (task.dtype, task.cp.dtype):
            return None  # torch would add in float64; the kernels decode to float32 first
        cp_key = _raw_key(plan, task.cp)
        bound = self.amax[cp_key]
        terms = []
        for term in task.terms:
            whole = term.segments == [Segment(0, 0, 0 if term.base is not None else -1, task.numel)]
            if term.method not in ("add", "dare") or not whole or term.chat.numel != task.numel or not _tau_held(term):
                return None
            base = _raw_key(plan, term.base) if term.base is not None else None
            key = ("tau", _raw_key(plan, term.chat), base)
            dropping = drops(term)
            factor = term.ratio / term.density if dropping else term.ratio
            drop = (dare_key(term.seed, task.name, term.vector), dare_cutoff(term.density)) if dropping else None
            bound += self.amax[key] * abs(factor)
            terms.append((self.entries[key], float(factor), drop))
        return terms if bound < _SAFE else None

    def _block(self, name: str, dtype, n: int):
        buf = self._blocks.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._blocks[name] = self.torch.empty(max(n, 1), dtype=dtype, device=self.device)
        return buf[:n]

    def _add_into(self, flat, cp, terms: list[tuple], dtype: str) -> bool:
        """The point's value of one tensor into ``flat``; False where only the kernels can."""
        torch = self.torch
        out_dtype = getattr(torch, TORCH_DTYPES[dtype])
        if not terms:  # integer buffers, tensors this point leaves alone: the CP values
            flat.copy_(cp if cp.dtype == out_dtype else cp.to(torch.float32).to(out_dtype))
            return True
        if self._one_pass(flat, cp, terms, dtype):
            return True
        if any(drop is not None for _, _, drop in terms):
            return False  # DARE's drop is numpy's or numba's
        direct = flat.dtype == out_dtype and flat.device == self.device
        n = flat.numel()
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            m = hi - lo
            acc = self._block("acc", torch.float32, m)
            for i, (tau, ratio, _) in enumerate(terms):
                part = tau[lo:hi]
                if ratio != 1.0:
                    part = torch.mul(part, ratio, out=self._block("t", torch.float32, m))
                # the first sum reads cp in its own dtype (exact in float32); the last one is
                # rounded once, into the output dtype
                left = cp[lo:hi] if i == 0 else acc
                if i < len(terms) - 1:
                    torch.add(left, part, out=acc)
                elif direct:
                    torch.add(left, part, out=flat[lo:hi])
                else:
                    final = acc if out_dtype == torch.float32 else self._block("out", out_dtype, m)
                    torch.add(left, part, out=final)
                    flat[lo:hi].copy_(final)
        return True

    def _one_pass(self, flat, cp, terms: list[tuple], dtype: str) -> bool:
        """The numba kernel, where it applies; False: the caller computes otherwise."""
        torch = self.torch
        if len(terms) != 1 or self.kernel != "auto" or self.device.type != "cpu" or flat.device.type != "cpu":
            return False
        if not flat.is_contiguous() or flat.requires_grad:
            return False
        tau, factor, drop = terms[0]
        if drop is None and flat.numel() < BLOCK // 64:
            return False  # small tensors: torch's call costs less than a kernel's dispatch
        kernels = _numba_kernels()
        if kernels is None:
            return False
        key, cutoff = drop if drop is not None else (0, 0)
        args = (tau.numpy(), np.float32(factor), drop is not None, np.uint64(key), np.uint64(cutoff))
        if dtype == "BF16" and cp.dtype == torch.bfloat16:
            words = cp.view(torch.int16).numpy().view(np.uint16)
            if flat.dtype == torch.float32:  # the sum, rounded to bf16, widened to float32 bits
                kernels.add_bf16(words, *args, flat.view(torch.int32).numpy().view(np.uint32))
                return True
            if flat.dtype == torch.bfloat16:
                kernels.add_bf16(words, *args, flat.view(torch.int16).numpy().view(np.uint16))
                return True
        if dtype == "F32" and cp.dtype == torch.float32 and flat.dtype == torch.float32:
            kernels.add_f32(cp.numpy(), *args, flat.numpy())
            return True
        return False

    def _compute_job(self, plan: MergePlan, task: TensorTask) -> np.ndarray:
        """``task``'s output bytes by merge/compute.py over job buffers filled from memory."""
        files: list[np.ndarray] = []
        ids: dict[Key, int] = {}

        def source(key: Key, dtype: str, numel: int) -> Source:
            if key not in ids:
                ids[key] = len(files)
                files.append(self.entries[key].contiguous().cpu().view(self.torch.uint8).numpy())
            return Source(ids[key], 0, dtype, numel)

        terms = []
        for term in task.terms:
            if _tau_held(term):
                base = _raw_key(plan, term.base) if term.base is not None else None
                chat = source(("tau", _raw_key(plan, term.chat), base), "F32", term.chat.numel)
                segments = [Segment(s.out, s.chat, -1, s.n) for s in term.segments]
                terms.append(replace(term, chat=chat, base=None, segments=segments))
            else:
                chat = source(_raw_key(plan, term.chat), term.chat.dtype, term.chat.numel)
                base = source(_raw_key(plan, term.base), term.base.dtype, term.base.numel)
                terms.append(replace(term, chat=chat, base=base))
        cp = source(_raw_key(plan, task.cp), task.cp.dtype, task.cp.numel) if task.cp is not None else None
        raws = [RawCopy(source(_raw_key(plan, c.source), c.source.dtype, c.source.numel), c.segments) for c in task.raw]
        local = replace(task, cp=cp, terms=terms, raw=raws)

        def read(job, buf: np.ndarray) -> None:
            for r in job.reads:
                buf[r.at : r.at + r.nbytes] = files[r.file][r.offset : r.offset + r.nbytes]

        if self._scratch is None:
            backend = make_backend("cpu")
            self._scratch = Scratch(backend, backend.step)
            if self._scratch.fused:
                warm_up()
        scratch = self._scratch
        isz = ITEMSIZE[task.dtype]
        out = np.empty(task.nbytes, np.uint8)
        buf = np.empty(0, np.uint8)
        jobs = task_jobs(local)
        if any(job.whole for job in jobs):
            key = (task.name, tuple(_term_key(plan, t) for t in task.terms))
            if key not in self._thresholds:
                self._thresholds[key] = tensor_thresholds(local, read)
            for job in jobs:
                job.thresholds = self._thresholds[key] if job.whole else None
        for job in jobs:
            if buf.size < job.in_bytes:
                buf = np.empty(job.in_bytes, np.uint8)
            read(job, buf)
            compute_job(scratch.backend, job, buf, out[job.start * isz : job.start * isz + job.out_bytes], scratch)
        return out
