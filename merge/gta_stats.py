"""mergekit's L1 rescale of a sparsified vector (`rescale: true`), a whole-tensor statistic.

mergekit (0.1.5) rescales each sparsified tau_i of a tensor to the tensor's L1 norm:
masked = tau_i * mask_i; before = sum |tau_i|, after = sum |masked| over the tensor, both in the
sparsification's work dtype; where before or after is under 1e-7 masked stays as it is, else it
is multiplied by before / after. The factor is found here, in a pass over the tensor's inputs a
job at a time (memory bounded, as for TIES' threshold in merge/ties_threshold.py), and handed to
the tensor's jobs with the thresholds; merge/gta.py multiplies by it.

tau_i is computed as merge/gta.py computes it (in the compute dtype D); the mask is chatvec's
(dare: its seeded keep rule; ties: |tau_i| >= the threshold rounded to D). The sums are added in
float64 and rounded to the work dtype (through float32), as torch returns its float32-accumulated
sum in the tensor's dtype; before / after is a float32 division rounded to the work dtype. The
work dtype: ties (mergekit's magnitude) works in D; the dare methods (its bernoulli, on the CPU) in
D for bfloat16 and float32, in float32 for float16. float64 is computed in float32 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from chatvec.merge.gta import mergekit_tau_into, round_scalar
from chatvec.merge.jobs import Job, task_jobs
from chatvec.merge.kernels import NumpyBackend, dare_keep
from chatvec.merge.methods import METHODS
from chatvec.merge.plan import TensorTask

EPS = 1e-7  # mergekit's: no rescale where either norm is below it

Read = Callable[[Job, np.ndarray], None]


def work_dtype(method: str, dtype: str) -> str:
    """The dtype mergekit's sparsification of a tensor of compute dtype `dtype` works in (CPU)."""
    if METHODS[method].random_drop:
        return "BF16" if dtype == "BF16" else "F32"
    return "F32" if dtype == "F64" else dtype


def rescaled(term, threshold: float | None) -> bool:
    """Whether mergekit sparsifies (and so may rescale) the term: density in (0, 1)."""
    if not 0.0 < term.density < 1.0:
        return False
    method = METHODS[term.method]
    return method.random_drop or (method.whole_tensor and threshold is not None)


def rescale_factors(task: TensorTask, thresholds: dict[int, float | None], read: Read) -> dict[int, float | None]:
    """term index -> mergekit's L1 rescale factor (None: no rescale), for the sparsified terms."""
    out = {}
    for i, term in enumerate(task.terms):
        threshold = thresholds.get(i)
        if rescaled(term, threshold):
            out[i] = rescale_factor(task, i, threshold, read)
    return out


def rescale_factor(task: TensorTask, term_index: int, threshold: float | None, read: Read) -> float | None:
    """before / after of term `term_index` in its work dtype, or None where either is under 1e-7."""
    term = task.terms[term_index]
    dtype = task.dtype
    work = work_dtype(term.method, dtype)
    dropping = METHODS[term.method].random_drop
    cut = None if dropping else round_scalar(threshold, dtype)
    backend = NumpyBackend()
    before = after = 0.0
    buf = np.empty(0, np.uint8)
    for job in task_jobs(replace(task, cp=None, raw=[], terms=[term])):
        if buf.size < job.in_bytes:
            buf = np.empty(job.in_bytes, np.uint8)
        read(job, buf)
        for term_job in job.terms:
            for p in term_job.pieces:
                t, u = np.empty(p.n, np.float32), np.empty(p.n, np.float32)
                mergekit_tau_into(backend, buf, p, p.out, p.out + p.n, t, u, dtype)
                before += float(np.abs(t).sum(dtype=np.float64))
                if dropping:
                    t *= dare_keep(term_job.key, p.index, p.n, term.density)
                else:
                    backend.trim(t, cut)
                after += float(np.abs(t).sum(dtype=np.float64))
    before, after = round_scalar(before, work), round_scalar(after, work)
    if before < EPS or after < EPS:
        return None
    return round_scalar(float(np.float32(before) / np.float32(after)), work)
