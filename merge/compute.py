"""Compute one job: CP + sum of each vector's contribution, float32, one cast at the end.

Per element, in this order (every step rounded to float32):
    acc  = float32(cp)                          (zero for rows the CP model lacks, and for vectors)
    tau  = float32(chat) - float32(base)        (or float32(vector))
    add:  acc += tau * ratio
    dare: acc += (tau * keep) * (ratio / density)     keep: see merge/kernels.py
    ties: the TIES vectors of a tensor are combined first (see _ties) and their result added
    rows copied from the chat model (chat-only tokens) replace acc
    out  = cast(acc) to the output dtype, rounding to nearest even
"""
from __future__ import annotations

import numpy as np

from merge.jobs import Job, Piece
from merge.kernels import dare_keep, ties_threshold_k
from merge.safetensors_format import ITEMSIZE


def _src(buf: np.ndarray, at: int, dtype: str, a: int, b: int, p_out: int) -> np.ndarray:
    isz = ITEMSIZE[dtype]
    off = at + (a - p_out) * isz
    return buf[off: off + (b - a) * isz]


class Scratch:
    """float32 work arrays reused across jobs (fresh allocations would page-fault every time)."""

    def __init__(self, backend, n: int) -> None:
        self.n = n
        self.acc, self.t, self.u = backend.empty(n), backend.empty(n), backend.empty(n)


def _tau_into(be, buf, p: Piece, a: int, b: int, t, u) -> None:
    be.decode(_src(buf, p.at, p.dtype, a, b, p.out), p.dtype, t)
    if p.base_at >= 0:
        be.decode(_src(buf, p.base_at, p.base_dtype, a, b, p.out), p.base_dtype, u)
        t -= u


def _range(be, job: Job, buf, lo: int, hi: int, acc, t, u, skip_ties: bool) -> None:
    """acc[0:hi-lo] = output elements [lo, hi) of the job, before the cast."""
    cp = job.cp
    if cp is not None and cp.n > lo:
        c = min(hi, cp.n)
        be.decode(_src(buf, cp.at, cp.dtype, lo, c, 0), cp.dtype, acc[: c - lo])
        if c < hi:
            acc[c - lo: hi - lo] = 0
    else:
        acc[: hi - lo] = 0
    for tj in job.terms:
        term = tj.term
        if skip_ties and term.method == "ties":
            continue
        factor = term.ratio
        dropping = term.method == "dare" and term.density < 1.0
        if dropping:
            factor = term.ratio / term.density
        for p in tj.pieces:
            a, b = max(lo, p.out), min(hi, p.out + p.n)
            if a >= b:
                continue
            tt, uu = t[: b - a], u[: b - a]
            _tau_into(be, buf, p, a, b, tt, uu)
            if dropping:
                be.mask(tt, dare_keep(tj.key, p.index + (a - p.out), b - a, term.density))
            if factor != 1.0:
                tt *= factor
            acc[a - lo: b - lo] += tt


def _raws(be, job: Job, buf, lo: int, hi: int, acc) -> None:
    for p in job.raws:
        a, b = max(lo, p.out), min(hi, p.out + p.n)
        if a < b:
            be.decode(_src(buf, p.at, p.dtype, a, b, p.out), p.dtype, acc[a - lo: b - lo])


def _ties(be, job: Job, buf):
    """TIES over the job's ties vectors (Yadav et al. 2023), exactly:

    1. trim: tau_t keeps the entries with |tau_t| >= the k-th largest |tau_t| of the tensor,
       k = ceil(density_t * entries the vector covers); the rest become 0;
    2. weight: w_t = ratio_t * trimmed tau_t;
    3. elect: sign s = sign(sum_t w_t) per entry (the sign with the larger total mass);
    4. disjoint mean: delta = sum of the w_t with sign(w_t) == s (nonzero) / how many there are.
    """
    weighted = []
    for tj in job.terms:
        if tj.term.method != "ties":
            continue
        full = be.zeros(job.n)
        covered = 0
        for p in tj.pieces:
            tmp = be.empty(p.n)
            _tau_into(be, buf, p, p.out, p.out + p.n, full[p.out: p.out + p.n], tmp)
            covered += p.n
        k = ties_threshold_k(tj.term.density, covered)
        if k and k < job.n:
            be.trim(full, be.kth_largest_abs(full, k))
        if tj.term.ratio != 1.0:
            full *= tj.term.ratio
        weighted.append(full)
    return be.ties_merge(weighted) if weighted else None


def compute_job(be, job: Job, buf, out: np.ndarray, scratch: Scratch) -> None:
    """Fill `out` (bytes of the output dtype) with the job's output elements."""
    dtype = job.task.dtype
    isz = ITEMSIZE[dtype]
    cp = job.cp
    if not job.terms and not job.raws and cp is not None and cp.dtype == dtype and cp.n == job.n:
        # nothing to add (integer buffers, skipped embeddings): the CP bytes as they are
        out[:] = buf[cp.at: cp.at + job.n * isz]
        return
    if job.whole:
        acc, t, u = be.empty(max(job.n, 1)), be.empty(max(job.n, 1)), be.empty(max(job.n, 1))
        _range(be, job, buf, 0, job.n, acc, t, u, skip_ties=True)
        delta = _ties(be, job, buf)
        if delta is not None:
            acc[: job.n] += delta
        _raws(be, job, buf, 0, job.n, acc)
        be.encode(acc[: job.n], dtype, out[: job.n * isz])
        return
    step = scratch.n
    for lo in range(0, job.n, step):
        hi = min(job.n, lo + step)
        acc = scratch.acc[: hi - lo]
        _range(be, job, buf, lo, hi, acc, scratch.t, scratch.u, skip_ties=False)
        _raws(be, job, buf, lo, hi, acc)
        be.encode(acc, dtype, out[lo * isz: hi * isz])
