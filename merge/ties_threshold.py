"""TIES' trim threshold of a tensor, exactly, in a streaming pass of bounded memory.

TIES keeps the entries of a vector whose |tau| is at least the k-th largest |tau| of the tensor
(merge/compute.py). That one number is all that needs the whole tensor; it is found here by
radix selection over float32 bit patterns, reading the tensor's inputs a job at a time:

    |tau| >= 0, so its float32 bits order as unsigned integers the way the values do (NaNs,
    whose bits are above infinity's, come last, as in numpy's sort). A pass counts the top 16
    bits of every |tau| (65536 bins), which finds the bin holding the k-th largest and its rank
    there; the low 16 bits of the entries in that bin then give the threshold's other half.

Those low bits usually come from the same pass: the tensor's first job is counted first, as a
sample, to guess a few bins around the k-th largest, and the pass keeps every |tau| that falls
in them (a bounded buffer, at most _ROOM entries). When the counted bin is among the guessed
ones the k-th largest is selected from what was kept; otherwise (a sample unlike the rest, or
too many entries in the guessed bins) a second pass counts the low 16 bits of that bin. Either
way the result is exact. bf16 inputs are counted by a fused numba kernel where numba is
installed (merge/fused.py), others with numpy; the counts are the same.

Entries the vector does not cover (rows of tokens it lacks) count as |tau| = 0, as they do
when the tensor is trimmed whole. The result is the same float the whole-tensor selection
(np.partition) gives, so the merged bytes do not change.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from chatvec.merge.fused import collect_kernel, histogram_kernel
from chatvec.merge.gta import mergekit_tau_into
from chatvec.merge.gta_stats import rescale_factors
from chatvec.merge.job_buffer import tau_into
from chatvec.merge.jobs import Job, task_jobs
from chatvec.merge.kernels import NumpyBackend, ties_threshold_k
from chatvec.merge.methods import METHODS
from chatvec.merge.plan import TensorTask

_BINS = 1 << 16
# tensors this large wait for the fused kernels to load (about 0.4 s) rather than count with numpy
_WAIT_FOR_KERNEL = 1 << 24
# at most this many |tau| are kept from the guessed bins (32 MB); the guess aims at a third of it
_ROOM = 1 << 23
_AIM = 3

Read = Callable[[Job, np.ndarray], None]


class _Found:
    """The |tau| bits kept from the bins [first, last] during a pass."""

    def __init__(self, first: int, last: int, room: int) -> None:
        self.first, self.last = first, last
        self.bits = np.empty(room, np.uint32)
        self.stored = np.zeros(2, np.int64)  # [kept, did not fit]

    def add(self, bits: np.ndarray, high: np.ndarray) -> None:
        chosen = bits[(high >= self.first) & (high <= self.last)]
        kept = int(self.stored[0])
        fit = min(chosen.size, self.bits.size - kept)
        self.bits[kept : kept + fit] = chosen[:fit]
        self.stored += (fit, chosen.size - fit)

    def select(self, top: int, rank: int) -> int | None:
        """The bits of the rank-th largest in bin `top`, or None when that bin was not kept whole."""
        if self.stored[1] or not self.first <= top <= self.last:
            return None
        kept = self.bits[: int(self.stored[0])]
        inside = kept[(kept >> 16) == top]
        return int(np.partition(inside, inside.size - rank)[inside.size - rank])


def _scan(
    jobs: list[Job], read: Read, top: int, found: _Found | None, wait: bool, mergekit_dtype: str | None = None
) -> np.ndarray:
    """One pass over |tau| of the jobs' one term: counts of its float32 bits by their high 16
    bits (top < 0; `found` keeps those in its bins), or by their low 16 bits among those whose
    high bits are `top`. In mergekit mode tau is mergekit's, in its compute dtype
    (merge/gta.py:mergekit_tau_into: inputs converted to it, subtracted, rounded)."""
    backend = NumpyBackend()
    hist = np.zeros(_BINS, np.int64)
    if mergekit_dtype is not None:
        kernel = None
    else:
        kernel = (collect_kernel if found is not None else histogram_kernel)(wait=wait)
    buf = np.empty(0, np.uint8)
    for job in jobs:
        if buf.size < job.in_bytes:
            buf = np.empty(job.in_bytes, np.uint8)
        read(job, buf)
        for piece in job.terms[0].pieces if job.terms else []:
            if kernel is not None and piece.dtype == "BF16" and (piece.base_at < 0 or piece.base_dtype == "BF16"):
                # job buffers place every read at a multiple of 64 bytes, so byte offsets halve exactly
                words = buf[: job.in_bytes].view(np.uint16)
                base_at = piece.base_at // 2 if piece.base_at >= 0 else -1
                if found is not None:
                    kernel(
                        words, piece.at // 2, base_at, piece.n, found.first, found.last, hist, found.bits, found.stored
                    )
                else:
                    kernel(words, piece.at // 2, base_at, piece.n, top, hist)
                continue
            tau, tmp = np.empty(piece.n, np.float32), np.empty(piece.n, np.float32)
            if mergekit_dtype is not None:
                mergekit_tau_into(backend, buf, piece, piece.out, piece.out + piece.n, tau, tmp, mergekit_dtype)
            else:
                tau_into(backend, buf, piece, piece.out, piece.out + piece.n, tau, tmp)
            np.abs(tau, out=tau)
            low, high = _halves(tau.view(np.uint32))
            if top < 0:
                hist += np.bincount(high, minlength=_BINS)
                if found is not None:
                    found.add(tau.view(np.uint32), high)
            else:
                inside = low[high == top]
                if inside.size:
                    hist += np.bincount(inside, minlength=_BINS)
    return hist


def _guess(jobs: list[Job], read: Read, k: int, covered: int, wait: bool, mergekit_dtype: str | None) -> _Found | None:
    """Bins around the k-th largest |tau| as the first job's entries place it (None for tensors
    of one or two jobs, where a second pass costs little, or when k reaches the zeros)."""
    if len(jobs) <= 2 or k > covered:
        return None
    sample = _scan(jobs[:1], read, -1, None, wait, mergekit_dtype)
    n = int(sample.sum())
    if not n:
        return None
    room = min(_ROOM, covered)
    half = max(1.0, n * room / covered / _AIM / 2)  # sample ranks on either side
    middle = k * n / covered
    from_top = np.cumsum(sample[::-1])
    lo_rank, hi_rank = max(1, int(middle - half)), min(n, int(math.ceil(middle + half)))
    last = _BINS - 1 - int(np.searchsorted(from_top, lo_rank))
    first = _BINS - 1 - int(np.searchsorted(from_top, hi_rank))
    return _Found(first, last, room)


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


def term_threshold(task: TensorTask, term_index: int, read: Read) -> float | None:
    """The k-th largest |tau| of term `term_index` over the tensor, or None when TIES keeps
    every entry (k reaches the tensor's size)."""
    term = task.terms[term_index]
    covered = sum(s.n for s in term.segments)
    numel = math.prod(task.shape)
    if task.mergekit is not None:
        # mergekit's count (0.1.5): max(1, int(density * entries)); none trimmed at density 1;
        # at density <= 0 (which its configs reject) merge/gta.py zeroes the vector
        if term.density >= 1.0:
            return None
        if term.density <= 0.0:
            return math.inf
        k = max(1, int(term.density * numel))
    else:
        k = ties_threshold_k(term.density, covered)
    if not k or k >= numel:
        return None
    wait = task.numel >= _WAIT_FOR_KERNEL
    mergekit_dtype = task.dtype if task.mergekit is not None else None
    jobs = task_jobs(replace(task, cp=None, raw=[], terms=[term]))
    found = _guess(jobs, read, k, covered, wait, mergekit_dtype)
    high = _scan(jobs, read, -1, found, wait, mergekit_dtype)
    high[0] += numel - covered
    top, rank = _select(high, k)
    bits = found.select(top, rank) if found is not None and top > 0 else None
    if bits is None:
        low = _scan(jobs, read, top, None, wait, mergekit_dtype)
        if top == 0:
            low[0] += numel - covered
        bottom, _ = _select(low, rank)
        bits = (top << 16) | bottom
    return float(np.array([bits], np.uint32).view(np.float32)[0])


class Thresholds(dict):
    """term index -> threshold (dict[int, float | None]); `scales`: term index -> mergekit's L1
    rescale factor of the term's sparsified vector (None: not rescaled; merge/gta_stats.py)."""

    def __init__(self, thresholds: dict[int, float | None], scales: dict[int, float | None] | None = None) -> None:
        super().__init__(thresholds)
        self.scales = {} if scales is None else scales


def tensor_thresholds(task: TensorTask, read: Read) -> Thresholds:
    """term index -> threshold, for every whole-tensor (TIES) term of the tensor; in mergekit
    mode with `rescale`, the rescale factors too (after the thresholds: they depend on them)."""
    found = Thresholds(
        {i: term_threshold(task, i, read) for i, t in enumerate(task.terms) if METHODS[t.method].whole_tensor}
    )
    if task.mergekit is not None and task.mergekit.rescale:
        found.scales = rescale_factors(task, found, read)
    return found


class _Cancelled(Exception):
    pass


def attach_thresholds(jobs: list[Job], read: Read) -> Iterator[Job]:
    """`jobs` in order, each TIES job carrying its tensor's thresholds.

    The thresholds are found on a thread of their own, one tensor ahead: while the caller takes
    the jobs of one TIES tensor, the next one's counting passes run (numba and file reads release
    the GIL), so at most two tensors' thresholds are held at a time. `read` is used only by that
    thread (give it file handles of its own)."""
    order: list[TensorTask] = []
    position: dict[int, int] = {}
    for job in jobs:
        if job.whole and id(job.task) not in position:
            position[id(job.task)] = len(order)
            order.append(job.task)
    if not order:
        yield from jobs
        return
    stop = threading.Event()

    def guarded(job: Job, buf: np.ndarray) -> None:
        if stop.is_set():
            raise _Cancelled()
        read(job, buf)

    pool = ThreadPoolExecutor(1, thread_name_prefix="chatvec-ties")
    pending: dict[int, Future] = {}

    def start(i: int) -> None:
        if i < len(order) and i not in pending:
            pending[i] = pool.submit(tensor_thresholds, order[i], guarded)

    try:
        start(0)
        current, thresholds = -1, None
        for job in jobs:
            if job.whole:
                i = position[id(job.task)]
                if i != current:
                    start(i)
                    current, thresholds = i, pending.pop(i).result()
                    start(i + 1)
                job.thresholds = thresholds
            yield job
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
