"""Reading a job's inputs out of its buffer (merge/jobs.py lays the buffer out)."""

from __future__ import annotations

import numpy as np

from chatvec.merge.jobs import Piece
from chatvec.merge.safetensors_format import ITEMSIZE


def piece_bytes(buf: np.ndarray, at: int, dtype: str, a: int, b: int, p_out: int) -> np.ndarray:
    itemsize = ITEMSIZE[dtype]
    off = at + (a - p_out) * itemsize
    return buf[off : off + (b - a) * itemsize]


def tau_into(backend, buf, p: Piece, a: int, b: int, t, u) -> None:
    backend.decode(piece_bytes(buf, p.at, p.dtype, a, b, p.out), p.dtype, t)
    if p.base_at >= 0:
        backend.decode(piece_bytes(buf, p.base_at, p.base_dtype, a, b, p.out), p.base_dtype, u)
        t -= u
