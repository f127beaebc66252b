"""One-pass CPU kernels for merge/resident.py: out = cast(cp + (tau * keep) * factor), one vector.

keep is DARE's seeded drop where ``drop`` (merge/fused_numba.py's ``_drop``, the rule of
merge/kernels.py:dare_keep) and factor = ratio / density there; for add, factor = ratio. The same
float32 operations in the same order as merge/compute.py (each multiply and add rounded, no fused
multiply-add: numba's default is no fast-math), then the round to nearest even of
merge/kernels.py:NumpyBackend.encode. Inputs are finite (resident.py checks), so no NaN
needs numpy's bit pattern. torch does the same in three calls per block; one pass here keeps the
swap near the speed of a plain read-and-write of memory, on one thread, with no thread pool to
wait for on a busy machine.
"""

from __future__ import annotations

import numba
import numpy as np

from chatvec.merge.fused_numba import _drop

BLOCK = 4096  # elements per work array: it stays in L1
_S16, _ONE, _HALF = np.uint32(16), np.uint32(1), np.uint32(0x7FFF)

# Each loop reads and writes whole arrays handed to it (slices), as in merge/fused_numba.py:
# indexing big arrays at an offset inside one loop kept LLVM from vectorizing (measured 3.3
# against 0.4 ns per entry). A ratio of 1 is multiplied too: x * 1.0 == x exactly in IEEE.


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _widen(src, bits):
    for i in range(src.shape[0]):
        bits[i] = np.uint32(src[i]) << _S16


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _axpy(acc, tau, ratio):
    for i in range(acc.shape[0]):
        acc[i] = acc[i] + tau[i] * ratio


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _round_widened(acc_bits, dst):
    for i in range(dst.shape[0]):
        bits = acc_bits[i]
        dst[i] = ((bits + _HALF + ((bits >> _S16) & _ONE)) >> _S16) << _S16


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _round_words(acc_bits, dst):
    for i in range(dst.shape[0]):
        bits = acc_bits[i]
        dst[i] = np.uint16((bits + _HALF + ((bits >> _S16) & _ONE)) >> _S16)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _acc(cp_bits, tau, factor, drop, key, cutoff, acc, acc_bits, t, lo, m):
    """acc[:m] = float32(cp) + (tau * keep) * factor over elements [lo, lo + m)."""
    _widen(cp_bits[lo : lo + m], acc_bits)
    if drop:
        work = t[:m]
        work[:] = tau[lo : lo + m]
        _drop(work, key, lo, cutoff, m)
        _axpy(acc[:m], work, factor)
    else:
        _axpy(acc[:m], tau[lo : lo + m], factor)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def add_bf16(cp_bits, tau, factor, drop, key, cutoff, out):
    """bf16 cp (uint16 words): the sum rounded to bf16, written as bf16 words into a uint16
    ``out``, or widened to float32 bits into a uint32 ``out`` (numba compiles one of each)."""
    acc, t = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    acc_bits = acc.view(np.uint32)
    n = tau.shape[0]
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        _acc(cp_bits, tau, factor, drop, key, cutoff, acc, acc_bits, t, lo, m)
        if out.itemsize == 4:
            _round_widened(acc_bits[:m], out[lo : lo + m])
        else:
            _round_words(acc_bits[:m], out[lo : lo + m])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def add_f32(cp, tau, factor, drop, key, cutoff, out):
    """float32 cp, float32 out."""
    t = np.empty(BLOCK, np.float32)
    n = tau.shape[0]
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        o = out[lo : lo + m]
        o[:] = cp[lo : lo + m]
        if drop:
            work = t[:m]
            work[:] = tau[lo : lo + m]
            _drop(work, key, lo, cutoff, m)
            _axpy(o, work, factor)
        else:
            _axpy(o, tau[lo : lo + m], factor)
