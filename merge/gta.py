"""mergekit's general form ("generalized task arithmetic"), for `chatvec merge --mergekit-config`.

Per entry, in float32, in this order (following mergekit's formulas, not chatvec's):

    tau_i      = model_i - base
    sparsify:  ties: keep |tau_i| >= the k-th largest |tau_i|, k = int(density_i * entries)
               dare_ties, dare_linear: tau_i * keep_i, then / density_i when `rescale`
    w_i        = tau_i * weight_i
    combine:   with sign consensus (ties, dare_ties): s = +1 where sum_i w_i >= 0, else -1;
                 m_i = (sign(w_i) == s); mixed = sum_i w_i * m_i; divisor = sum_i weight_i * m_i
                 (1 where that is 0)
               without (task_arithmetic, dare_linear): mixed = sum_i w_i; divisor = sum_i weight_i
                 (1 where |divisor| < 1e-8)
    normalize: mixed /= divisor            (when `normalize`)
    lambda:    mixed *= lambda             (when lambda != 1)
    out        = base + mixed, cast once to the output dtype

Sums run in the models' order starting from +0. Where mergekit takes its numbers from torch's
sort (which of several entries equal to the threshold it keeps) and random generator (dare's
masks), chatvec keeps every entry at the threshold and uses its own seeded drop rule
(merge/kernels.py), so those entries can differ.
"""

from __future__ import annotations

import numpy as np

from merge.errors import ChatvecError
from merge.job_buffer import piece_bytes, tau_into
from merge.jobs import Job
from merge.kernels import NumpyBackend, dare_keep
from merge.methods import METHODS


def gta_job(backend, job: Job, buf, out: np.ndarray, scratch, encode_dtype: str, itemsize: int) -> None:
    """Fill `out` with the job's output elements in mergekit's form (see the module docstring)."""
    if not isinstance(backend, NumpyBackend):
        raise ChatvecError("--mergekit-config merges compute on the CPU: use --device cpu")
    mode = job.task.mergekit
    cp = job.cp
    step = scratch.n
    weights = [np.float32(tj.term.ratio) for tj in job.terms]
    for lo in range(0, job.n, step):
        hi = min(job.n, lo + step)
        m = hi - lo
        base = scratch.acc[:m]
        backend.decode(piece_bytes(buf, cp.at, cp.dtype, lo, hi, 0), cp.dtype, base)
        weighted = []
        for k, term_job in enumerate(job.terms):
            term = term_job.term
            method = METHODS[term.method]
            w = scratch.weighted(k)[:m]
            w[...] = 0
            for p in term_job.pieces:
                a, b = max(lo, p.out), min(hi, p.out + p.n)
                if a < b:
                    part = w[a - lo : b - lo]
                    tau_into(backend, buf, p, a, b, part, scratch.u[: b - a])
                    if method.random_drop and term.density < 1.0:
                        part *= dare_keep(term_job.key, p.index + (a - p.out), b - a, term.density)
            if method.random_drop and term.density < 1.0 and mode.rescale:
                w /= np.float32(term.density)
            if method.whole_tensor:
                threshold = job.thresholds[term_job.index]
                if threshold is not None:
                    backend.trim(w, threshold)
            w *= weights[k]
            weighted.append(w)
        mixed = np.zeros(m, np.float32)
        if mode.consensus:
            total = np.zeros(m, np.float32)
            for w in weighted:
                total += w
            majority = np.where(total >= 0, np.float32(1), np.float32(-1))
            divisor = np.zeros(m, np.float32)
            for w, weight in zip(weighted, weights):
                mask = (np.sign(w) == majority).astype(np.float32)
                mixed += w * mask
                divisor += weight * mask
            divisor[divisor == 0] = 1
        else:
            for w in weighted:
                mixed += w
            divisor = np.float32(0)
            for weight in weights:
                divisor = np.float32(divisor + weight)
            if abs(divisor) < 1e-8:
                divisor = np.float32(1)
        if mode.normalize:
            mixed /= divisor
        if mode.lambda_ != 1.0:
            mixed *= np.float32(mode.lambda_)
        base += mixed
        backend.encode(base, encode_dtype, out[lo * itemsize : hi * itemsize])
