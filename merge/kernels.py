"""The arithmetic: decode input bytes to float32, combine, encode once to the output dtype.

Two backends compute the same IEEE float32 operations in the same order, so they give the
same bits: ``numpy`` on the CPU (no torch import: that alone costs more than a whole merge's
I/O on small models) and ``torch`` for CUDA (or ``torch-cpu``, which tests use to compare the
two). No fused multiply-add: ``tau * ratio`` and ``acc + tau`` are rounded separately.

DARE's random drop is a pure function of (seed, tensor name, vector index, element index), so
it does not depend on how the tensor is chunked, on the device or on the worker:
element j is kept when the top 24 bits of splitmix64(key + j) are below density * 2**24.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading

import numpy as np

from chatvec.core.errors import ChatvecError

logger = logging.getLogger(__name__)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NP_RAW = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def dare_key(seed: int, tensor: str, vector: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{vector}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def dare_cutoff(density: float) -> int:
    """An element is kept when the top 24 bits of its hash are below this."""
    return round(density * (1 << 24))


def dare_keep(key: int, start: int, n: int, density: float) -> np.ndarray:
    """Boolean keep-mask of elements [start, start + n) (see the module docstring)."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + n, dtype=np.uint64)
        z += np.uint64(key)
        z += _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)) < np.uint64(dare_cutoff(density))


def ties_threshold_k(density: float, count: int) -> int:
    """How many entries TIES keeps out of `count`: ceil(density * count), at least 1."""
    return max(1, math.ceil(density * count - 1e-9)) if count else 0


class NumpyBackend:
    """float32 arithmetic with numpy, in cache-sized steps (the operations are memory-bound)."""

    name = "cpu"

    def __init__(self, step: int = 1 << 16) -> None:
        self.step = step
        self._local = threading.local()  # compute threads each get their own temporary

    def _tmp(self, n: int) -> np.ndarray:
        tmp = getattr(self._local, "tmp", None)
        if tmp is None or tmp.size < n:
            tmp = self._local.tmp = np.empty(max(n, self.step), np.uint32)
        return tmp[:n]

    def empty(self, n: int) -> np.ndarray:
        return np.empty(n, np.float32)

    def zeros(self, n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    def decode(self, raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
        """Bytes of `dtype` -> float32 into `out` (same element count)."""
        if dtype == "BF16":
            np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        elif dtype == "F32":
            out[...] = raw.view(np.float32)
        else:
            np.copyto(out, raw.view(_NP_RAW[dtype]), casting="same_kind")

    def encode(self, x: np.ndarray, dtype: str, out: np.ndarray) -> None:
        """float32 `x` -> bytes of `dtype` in `out`, rounding to nearest even once."""
        if dtype == "F32":
            out.view(np.float32)[...] = x
        elif dtype == "BF16":
            u = x.view(np.uint32)
            tmp = self._tmp(len(x)) if len(x) <= self.step else np.empty(len(x), np.uint32)
            np.right_shift(u, 16, out=tmp)
            np.bitwise_and(tmp, 1, out=tmp)
            tmp += 0x7FFF
            tmp += u
            tmp >>= 16
            o16 = out.view(np.uint16)
            np.copyto(o16, tmp, casting="unsafe")
            nan = np.isnan(x)
            if nan.any():
                o16[nan] = 0x7FC0  # a quiet NaN (torch's bit pattern for NaN varies by build and device)
        else:
            np.copyto(out.view(_NP_RAW[dtype]), x, casting="same_kind")

    def mask(self, t: np.ndarray, keep: np.ndarray) -> None:
        t *= keep

    # -- TIES (the trim threshold comes from merge/ties_threshold.py) ----------------------------
    def trim(self, t: np.ndarray, threshold: float) -> None:
        """Zero the entries with |t| < threshold: t[np.abs(t) < threshold] = 0, 10x faster as a
        multiply. It differs only in the sign of the zeros (-0 for negative entries), which no
        later step can see: TIES never elects or counts a zero, and adds +0 in its place."""
        if threshold != threshold:  # a NaN threshold trims nothing (every comparison is false)
            return
        np.multiply(t, np.abs(t) >= threshold, out=t)

    def ties_merge(self, weighted: list[np.ndarray]) -> np.ndarray:
        if len(weighted) == 1:
            # one vector (the chat vector): every nonzero, non-NaN entry agrees with itself and is
            # its own mean; the rest give +0, as below (the + 0 turns -0 into +0)
            w = weighted[0]
            delta = np.where(np.isnan(w), np.float32(0), w)
            delta += np.float32(0)
            return delta
        # (measured: numpy's where= masked ufuncs are several times slower than these temporaries)
        total = weighted[0].copy()
        for w in weighted[1:]:
            total += w
        sign = np.sign(total)
        acc = np.zeros_like(total)
        count = np.zeros_like(total)
        for w in weighted:
            agree = (np.sign(w) == sign) & (w != 0)
            acc += np.where(agree, w, np.float32(0))
            count += agree
        np.maximum(count, 1, out=count)
        acc /= count
        return acc


class TorchBackend:
    """The same operations with torch on `device` (CUDA, or CPU to compare with numpy)."""

    def __init__(self, device: str, step: int = 1 << 22) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = "torch-cpu" if self.device.type == "cpu" else str(self.device)
        self.step = step
        self._dt = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def empty(self, n: int):
        return self.torch.empty(n, dtype=self.torch.float32, device=self.device)

    def zeros(self, n: int):
        return self.torch.zeros(n, dtype=self.torch.float32, device=self.device)

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """Job buffers in page-locked memory, so copies to and from the GPU run at full speed."""
        pin = self.device.type == "cuda"
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=pin).numpy()

    def decode(self, raw: np.ndarray, dtype: str, out) -> None:
        # the upload may run ahead: the buffer is reused only after the job's download, which waits
        src = self.torch.from_numpy(raw).to(self.device, non_blocking=True).view(self._dt[dtype])
        out.copy_(src)

    def encode(self, x, dtype: str, out: np.ndarray) -> None:
        # straight from the device into the output buffer, no host-side temporary
        self.torch.from_numpy(out).copy_(x.to(self._dt[dtype]).view(self.torch.uint8))

    def mask(self, t, keep: np.ndarray) -> None:
        t.mul_(self.torch.from_numpy(keep).to(self.device))

    def trim(self, t, threshold: float) -> None:
        t[t.abs() < threshold] = 0.0

    def ties_merge(self, weighted: list):
        torch = self.torch
        total = weighted[0].clone()
        for w in weighted[1:]:
            total += w
        sign = torch.sign(total)
        acc = torch.zeros_like(total)
        count = torch.zeros_like(total)
        for w in weighted:
            agree = (torch.sign(w) == sign) & (w != 0)
            acc += torch.where(agree, w, torch.zeros((), dtype=w.dtype, device=w.device))
            count += agree
        count.clamp_(min=1)
        acc /= count
        return acc


def resolve_compute_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu', without importing torch for CPU boxes."""
    if device != "auto":
        return device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def make_backend(device: str):
    """'cpu' -> numpy; 'cuda', 'cuda:N' -> torch on that GPU; 'torch-cpu' -> torch on the CPU."""
    device = resolve_compute_device(device)
    if device == "cpu":
        return NumpyBackend()
    if device == "torch-cpu":
        return TorchBackend("cpu", step=1 << 16)
    if device.startswith("cuda"):
        try:
            import torch
        except ImportError:
            raise ChatvecError("--device cuda needs torch with CUDA: install it, or use --device cpu") from None
        if not torch.cuda.is_available():
            raise ChatvecError("--device cuda was asked for but torch sees no CUDA device: use --device cpu")
        return TorchBackend(device)
    raise ChatvecError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
