"""The numba code of merge/fused.py (imported only when those kernels are used: numba takes
about 0.2 s to import).

Every kernel does, per element, the float32 operations of the numpy path (merge/compute.py,
merge/kernels.py, merge/ties_threshold.py) in the same order, with float32 constants only (a
float64 constant would promote the arithmetic) and no fast-math, so the bytes are the same.
Work arrays are allocated inside each call, one per role: arrays that are views of one buffer
keep LLVM from vectorizing the loops (measured: 4.5x slower, 2.7 against 0.6 ns per entry).
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 4096  # elements per work array: a few of them stay in L1/L2
_S16, _ONE, _HALF, _QNAN = np.uint32(16), np.uint32(1), np.uint32(0x7FFF), np.uint16(0x7FC0)
_ABS, _LOW = np.uint32(0x7FFFFFFF), np.uint32(0xFFFF)
_ZERO, _UNIT = np.float32(0.0), np.float32(1.0)
# DARE's keep rule (merge/kernels.py:dare_keep): splitmix64 of key + element index, top 24 bits
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _widen(src, bits):
    for i in range(src.shape[0]):
        bits[i] = np.uint32(src[i]) << _S16


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _round_out(acc, acc_bits, dst):
    for i in range(dst.shape[0]):
        bits = acc_bits[i]
        rounded = np.uint16((bits + _HALF + ((bits >> _S16) & _ONE)) >> _S16)
        dst[i] = _QNAN if acc[i] != acc[i] else rounded  # NaN: the quiet NaN numpy writes


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _tau(words, chat_at, base_at, lo, m, tau, tau_bits, base, base_bits):
    """tau[:m] = float32(chat) - float32(base) (or float32(chat) where base_at < 0)."""
    _widen(words[chat_at + lo : chat_at + lo + m], tau_bits)
    if base_at >= 0:
        _widen(words[base_at + lo : base_at + lo + m], base_bits)
        for i in range(m):
            tau[i] = tau[i] - base[i]


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _drop(x, key, first, cutoff, m):
    """x[i] *= DARE's keep (1 or 0) of source element first + i, as NumpyBackend.mask does."""
    for i in range(m):
        z = np.uint64(first + i) + key + _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z = z ^ (z >> _S31)
        x[i] = x[i] * (_UNIT if (z >> _S40) < cutoff else _ZERO)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def fused_bf16(words, cp_at, chat_at, base_at, factors, drops, keys, firsts, cutoffs, n, out16):
    """bf16 CP + sum_t factor_t * keep_t * (chat_t - base_t), bf16 out (keep_t: DARE's drop where
    drops[t], from source element firsts[t] on)."""
    acc, tau, base = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    acc_bits, tau_bits, base_bits = acc.view(np.uint32), tau.view(np.uint32), base.view(np.uint32)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        _widen(words[cp_at + lo : cp_at + lo + m], acc_bits)
        for t in range(chat_at.shape[0]):
            _tau(words, chat_at[t], base_at[t], lo, m, tau, tau_bits, base, base_bits)
            if drops[t]:
                _drop(tau, keys[t], firsts[t] + lo, cutoffs[t], m)
            factor = factors[t]
            for i in range(m):
                tau[i] = tau[i] * factor
            for i in range(m):
                acc[i] = acc[i] + tau[i]
        _round_out(acc, acc_bits, out16[lo : lo + m])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def fused_ties_bf16(
    words, cp_at, chat_at, base_at, thresholds, trims, factors, scales, drops, keys, firsts, cutoffs, n, out16
):
    """TIES (and dare_ties: DARE's drop where drops[t]) over bf16 vectors onto bf16 CP, bf16 out,
    as merge/compute.py:_ties with NumpyBackend.mask, trim and ties_merge computes it."""
    vectors = chat_at.shape[0]
    acc, base = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    acc_bits, base_bits = acc.view(np.uint32), base.view(np.uint32)
    w = np.empty((vectors, BLOCK), np.float32)
    w_bits = w.view(np.uint32)
    total, mass, count = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        _widen(words[cp_at + lo : cp_at + lo + m], acc_bits)
        for t in range(vectors):
            wt, wt_bits = w[t], w_bits[t]
            _tau(words, chat_at[t], base_at[t], lo, m, wt, wt_bits, base, base_bits)
            if drops[t]:
                _drop(wt, keys[t], firsts[t] + lo, cutoffs[t], m)
            if trims[t]:
                threshold = thresholds[t]
                for i in range(m):  # the multiply by (|w| >= threshold) of NumpyBackend.trim
                    wt[i] = wt[i] * (_UNIT if abs(wt[i]) >= threshold else _ZERO)
            if scales[t]:
                factor = factors[t]
                for i in range(m):
                    wt[i] = wt[i] * factor
        if vectors == 1:
            w0 = w[0]
            for i in range(m):  # NaN -> +0, and + 0 turns -0 into +0, as ties_merge does
                x = w0[i]
                acc[i] = acc[i] + (_ZERO if x != x else x + _ZERO)
        else:
            for i in range(m):
                total[i] = w[0, i]
            for t in range(1, vectors):
                wt = w[t]
                for i in range(m):
                    total[i] = total[i] + wt[i]
            for i in range(m):
                mass[i] = _ZERO
                count[i] = _ZERO
            for t in range(vectors):
                wt = w[t]
                for i in range(m):  # sign(w) == sign(total) and w != 0
                    x = wt[i]
                    agree = ((x > _ZERO) & (total[i] > _ZERO)) | ((x < _ZERO) & (total[i] < _ZERO))
                    mass[i] = mass[i] + (x if agree else _ZERO)
                    count[i] = count[i] + (_UNIT if agree else _ZERO)
            for i in range(m):
                acc[i] = acc[i] + mass[i] / max(count[i], _UNIT)
        _round_out(acc, acc_bits, out16[lo : lo + m])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def abs_tau_histogram(words, chat_at, base_at, n, top, hist):
    """Count the float32 bits of |chat - base| (bf16 inputs; base_at < 0: |chat|) into `hist`:
    by their high 16 bits when top < 0, else by their low 16 bits where the high ones are `top`
    (merge/ties_threshold.py's two passes)."""
    tau, base = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    tau_bits, base_bits = tau.view(np.uint32), base.view(np.uint32)
    key = np.empty(BLOCK, np.uint32)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        _tau(words, chat_at, base_at, lo, m, tau, tau_bits, base, base_bits)
        if top < 0:
            for i in range(m):
                key[i] = (tau_bits[i] & _ABS) >> _S16
            for i in range(m):
                hist[key[i]] += 1
        else:
            want = np.uint32(top)
            for i in range(m):
                bits = tau_bits[i] & _ABS
                if (bits >> _S16) == want:
                    hist[bits & _LOW] += 1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def abs_tau_collect(words, chat_at, base_at, n, first_bin, last_bin, hist, found, stored):
    """The high-16-bit counts of abs_tau_histogram, and besides the float32 bits of every |tau|
    whose high 16 bits lie in [first_bin, last_bin], appended to `found` from stored[0] on
    (stored[1] counts those that did not fit)."""
    tau, base = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    tau_bits, base_bits = tau.view(np.uint32), base.view(np.uint32)
    key = np.empty(BLOCK, np.uint32)
    first, last = np.uint32(first_bin), np.uint32(last_bin)
    room = found.shape[0]
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        _tau(words, chat_at, base_at, lo, m, tau, tau_bits, base, base_bits)
        for i in range(m):
            tau_bits[i] = tau_bits[i] & _ABS
            key[i] = tau_bits[i] >> _S16
        for i in range(m):
            hist[key[i]] += 1
        for i in range(m):
            if key[i] >= first and key[i] <= last:
                if stored[0] < room:
                    found[stored[0]] = tau_bits[i]
                    stored[0] += 1
                else:
                    stored[1] += 1
