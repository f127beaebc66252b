"""The numba code of merge/fused.py (imported only when that kernel is used: numba takes
about 0.2 s to import)."""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 4096  # elements; merge/fused.py passes a work array of 3 * BLOCK uint32
_S16, _ONE, _HALF, _QNAN = np.uint32(16), np.uint32(1), np.uint32(0x7FFF), np.uint16(0x7FC0)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def fused_bf16(words, cp_at, chat_at, base_at, factors, n, out16, work):
    acc_bits = work[:BLOCK]
    tau_bits = work[BLOCK : 2 * BLOCK]
    base_bits = work[2 * BLOCK : 3 * BLOCK]
    acc = acc_bits.view(np.float32)
    tau = tau_bits.view(np.float32)
    base = base_bits.view(np.float32)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        src = words[cp_at + lo : cp_at + lo + m]
        for i in range(m):
            acc_bits[i] = np.uint32(src[i]) << _S16
        for t in range(chat_at.shape[0]):
            chat = words[chat_at[t] + lo : chat_at[t] + lo + m]
            for i in range(m):
                tau_bits[i] = np.uint32(chat[i]) << _S16
            if base_at[t] >= 0:
                other = words[base_at[t] + lo : base_at[t] + lo + m]
                for i in range(m):
                    base_bits[i] = np.uint32(other[i]) << _S16
                for i in range(m):
                    tau[i] = tau[i] - base[i]
            factor = factors[t]
            for i in range(m):
                tau[i] = tau[i] * factor
            for i in range(m):
                acc[i] = acc[i] + tau[i]
        dst = out16[lo : lo + m]
        for i in range(m):
            bits = acc_bits[i]
            rounded = np.uint16((bits + _HALF + ((bits >> _S16) & _ONE)) >> _S16)
            dst[i] = _QNAN if acc[i] != acc[i] else rounded  # NaN: the quiet NaN numpy writes
