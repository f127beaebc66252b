"""Compute one job: CP + sum of each vector's contribution, float32, one cast at the end.

Per element, in this order (every step rounded to float32):
    acc  = float32(cp)                          (zero for rows the CP model lacks, and for vectors)
    tau  = float32(chat) - float32(base)        (or float32(vector))
    add:  acc += tau * ratio
    dare: acc += (tau * keep) * (ratio / density)     keep: see merge/kernels.py
    ties, dare_ties: these vectors of a tensor are combined first (see _ties), their result added
    rows copied from the chat model (chat-only tokens) replace acc
    out  = cast(acc) to the output dtype, rounding to nearest even
"""

from __future__ import annotations

import numpy as np

from chatvec.merge.fused import try_fused
from chatvec.merge.gta import gta_job
from chatvec.merge.job_buffer import piece_bytes, tau_into
from chatvec.merge.jobs import Job
from chatvec.merge.kernels import dare_keep
from chatvec.merge.methods import METHODS, drops
from chatvec.merge.safetensors_format import ITEMSIZE


class Scratch:
    """float32 work arrays reused across jobs (fresh allocations would page-fault every time)."""

    def __init__(self, backend, n: int) -> None:
        self.n = n
        self.backend = backend
        self.acc, self.t, self.u = backend.empty(n), backend.empty(n), backend.empty(n)
        self._weighted: list = []
        # the fused kernels (merge/fused.py) work on numpy's arrays only
        self.fused = isinstance(self.t, np.ndarray)

    def weighted(self, k: int):
        """Work array number k for a TIES vector's weighted tau."""
        while len(self._weighted) <= k:
            self._weighted.append(self.backend.empty(self.n))
        return self._weighted[k]


def _range(backend, job: Job, buf, lo: int, hi: int, acc, t, u, skip_electing: bool) -> None:
    """acc[0:hi-lo] = output elements [lo, hi) of the job, before the cast."""
    cp = job.cp
    if cp is not None and cp.n > lo:
        c = min(hi, cp.n)
        backend.decode(piece_bytes(buf, cp.at, cp.dtype, lo, c, 0), cp.dtype, acc[: c - lo])
        if c < hi:
            acc[c - lo : hi - lo] = 0
    else:
        acc[: hi - lo] = 0
    for term_job in job.terms:
        term = term_job.term
        method = METHODS[term.method]
        if skip_electing and method.sign_election:
            continue
        factor = term.ratio
        dropping = drops(term)
        if dropping:
            factor = term.ratio / term.density
        for p in term_job.pieces:
            a, b = max(lo, p.out), min(hi, p.out + p.n)
            if a >= b:
                continue
            tau_part, base_part = t[: b - a], u[: b - a]
            tau_into(backend, buf, p, a, b, tau_part, base_part)
            if dropping:
                backend.mask(tau_part, dare_keep(term_job.key, p.index + (a - p.out), b - a, term.density))
            if factor != 1.0:
                tau_part *= factor
            acc[a - lo : b - lo] += tau_part


def _raws(backend, job: Job, buf, lo: int, hi: int, acc) -> None:
    for p in job.raws:
        a, b = max(lo, p.out), min(hi, p.out + p.n)
        if a < b:
            backend.decode(piece_bytes(buf, p.at, p.dtype, a, b, p.out), p.dtype, acc[a - lo : b - lo])


def _ties(backend, job: Job, buf, lo: int, hi: int, scratch: Scratch):
    """TIES over the job's ties vectors (Yadav et al. 2023), exactly:

    1. trim: tau_t keeps the entries with |tau_t| >= the k-th largest |tau_t| of the tensor,
       k = ceil(density_t * entries the vector covers); the rest become 0
       (dare_ties instead: DARE's random drop, tau_t * keep, and ratio_t / density_t in step 2);
    2. weight: w_t = ratio_t * trimmed tau_t;
    3. elect: sign s = sign(sum_t w_t) per entry (the sign with the larger total mass);
    4. disjoint mean: delta = sum of the w_t with sign(w_t) == s (nonzero) / how many there are.

    The threshold of step 1 comes with the job (merge/ties_threshold.py); steps 2-4 are per
    entry, so a tensor is computed job by job.
    """
    weighted = []
    for term_job in job.terms:
        term = term_job.term
        method = METHODS[term.method]
        if not method.sign_election:
            continue
        dropping = drops(term)
        full = scratch.weighted(len(weighted))[: hi - lo]
        full[...] = 0
        for p in term_job.pieces:
            a, b = max(lo, p.out), min(hi, p.out + p.n)
            if a < b:
                part = full[a - lo : b - lo]
                tau_into(backend, buf, p, a, b, part, scratch.u[: b - a])
                if dropping:  # dare_ties: DARE's drop first, as dare does it
                    backend.mask(part, dare_keep(term_job.key, p.index + (a - p.out), b - a, term.density))
        if method.whole_tensor:
            threshold = job.thresholds[term_job.index]
            if threshold is not None:
                backend.trim(full, threshold)
        factor = term.ratio / term.density if dropping else term.ratio
        if factor != 1.0:
            full *= factor
        weighted.append(full)
    return backend.ties_merge(weighted) if weighted else None


def compute_job(backend, job: Job, buf, out: np.ndarray, scratch: Scratch) -> None:
    """Fill `out` (bytes of the output dtype) with the job's output elements."""
    dtype = job.task.dtype
    itemsize = ITEMSIZE[dtype]
    cp = job.cp
    if not job.terms and not job.raws and cp is not None and cp.dtype == dtype and cp.n == job.n:
        # nothing to add (integer buffers, skipped embeddings): the CP bytes as they are
        out[:] = buf[cp.at : cp.at + job.n * itemsize]
        return
    if job.task.mergekit is not None:
        gta_job(backend, job, buf, out, scratch, dtype, itemsize)
        return
    if job.elects:
        if scratch.fused and try_fused(job, buf, out):
            return
        # blocks of the scratch size, so the TIES arrays (a few per vector) stay in the CPU caches
        step = scratch.n
        for lo in range(0, job.n, step):
            hi = min(job.n, lo + step)
            acc = scratch.acc[: hi - lo]
            _range(backend, job, buf, lo, hi, acc, scratch.t, scratch.u, skip_electing=True)
            delta = _ties(backend, job, buf, lo, hi, scratch)
            if delta is not None:
                acc += delta
            _raws(backend, job, buf, lo, hi, acc)
            backend.encode(acc, dtype, out[lo * itemsize : hi * itemsize])
        return
    if scratch.fused and try_fused(job, buf, out):
        return
    step = scratch.n
    for lo in range(0, job.n, step):
        hi = min(job.n, lo + step)
        acc = scratch.acc[: hi - lo]
        _range(backend, job, buf, lo, hi, acc, scratch.t, scratch.u, skip_electing=False)
        _raws(backend, job, buf, lo, hi, acc)
        backend.encode(acc, dtype, out[lo * itemsize : hi * itemsize])
