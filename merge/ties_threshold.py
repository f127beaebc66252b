"""TIES' trim threshold of a tensor, exactly, in a streaming pass of bounded memory.

TIES keeps the entries of a vector whose |tau| is at least the k-th largest |tau| of the tensor
(merge/compute.py). That one number is all that needs the whole tensor; it is found here by
radix selection over float32 bit patterns, reading the tensor's inputs a job at a time:

    |tau| >= 0, so its float32 bits order as unsigned integers the way the values do (NaNs,
    whose bits are above infinity's, come last, as in numpy's sort). Pass 1 counts the top 16
    bits of every |tau| (65536 bins) and finds the bin holding the k-th largest; pass 2 counts
    the low 16 bits of the entries in that bin. The two halves are the threshold's bits.

Entries the vector does not cover (rows of tokens it lacks) count as |tau| = 0, as they do
when the tensor is trimmed whole. The result is the same float the whole-tensor selection
(np.partition) gives, so the merged bytes do not change.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from merge.job_buffer import tau_into
from merge.jobs import Job, task_jobs
from merge.kernels import NumpyBackend, ties_threshold_k
from merge.methods import METHODS
from merge.plan import TensorTask

_BINS = 1 << 16


def _abs_bits_blocks(task: TensorTask, term_index: int, read: Callable[[Job, np.ndarray], None]):
    """The float32 bits of |tau| of one term, block by block (a job's worth at a time)."""
    backend = NumpyBackend()
    only = replace(task, cp=None, raw=[], terms=[task.terms[term_index]])
    buf = np.empty(0, np.uint8)
    for job in task_jobs(only):
        if buf.size < job.in_bytes:
            buf = np.empty(job.in_bytes, np.uint8)
        read(job, buf)
        for piece in job.terms[0].pieces if job.terms else []:
            tau, tmp = np.empty(piece.n, np.float32), np.empty(piece.n, np.float32)
            tau_into(backend, buf, piece, piece.out, piece.out + piece.n, tau, tmp)
            np.abs(tau, out=tau)
            yield tau.view(np.uint32)


def _halves(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low 16 bits, high 16 bits) of each uint32, as views where the byte order allows."""
    if sys.byteorder == "little":
        halves = bits.view(np.uint16)
        return halves[0::2], halves[1::2]
    return (bits & 0xFFFF).astype(np.uint16), (bits >> 16).astype(np.uint16)


def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest count from the top, rank of it within that bin)."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))  # first index where the running count reaches k
    above = int(from_top[i - 1]) if i else 0
    return _BINS - 1 - i, k - above


def term_threshold(task: TensorTask, term_index: int, read: Callable[[Job, np.ndarray], None]) -> float | None:
    """The k-th largest |tau| of term `term_index` over the tensor, or None when TIES keeps
    every entry (k reaches the tensor's size)."""
    term = task.terms[term_index]
    covered = sum(s.n for s in term.segments)
    numel = math.prod(task.shape)
    if task.mergekit is not None:
        # mergekit's count: int(density * entries), none trimmed at density 1
        if term.density >= 1.0:
            return None
        k = int(term.density * numel)
        if k == 0:
            return math.inf  # keeps nothing but infinities
    else:
        k = ties_threshold_k(term.density, covered)
    if not k or k >= numel:
        return None
    high = np.zeros(_BINS, np.int64)
    for bits in _abs_bits_blocks(task, term_index, read):
        high += np.bincount(_halves(bits)[1], minlength=_BINS)
    high[0] += numel - covered
    top, rank = _select(high, k)
    low = np.zeros(_BINS, np.int64)
    for bits in _abs_bits_blocks(task, term_index, read):
        low_half, high_half = _halves(bits)
        inside = low_half[high_half == top]
        if inside.size:
            low += np.bincount(inside, minlength=_BINS)
    if top == 0:
        low[0] += numel - covered
    bottom, _ = _select(low, rank)
    return float(np.array([(top << 16) | bottom], np.uint32).view(np.float32)[0])


def tensor_thresholds(task: TensorTask, read: Callable[[Job, np.ndarray], None]) -> dict[int, float | None]:
    """term index -> threshold, for every whole-tensor (TIES) term of the tensor."""
    return {i: term_threshold(task, i, read) for i, t in enumerate(task.terms) if METHODS[t.method].whole_tensor}


def attach_thresholds(jobs: list[Job], read: Callable[[Job, np.ndarray], None]) -> Iterator[Job]:
    """`jobs` in order, each TIES job carrying its tensor's thresholds (found when the tensor's
    first job comes up, so one tensor's thresholds are held at a time)."""
    current: tuple[TensorTask | None, dict | None] = (None, None)
    for job in jobs:
        if job.whole:
            if current[0] is not job.task:
                current = (job.task, tensor_thresholds(job.task, read))
            job.thresholds = current[1]
        yield job
