"""An independent float64 reference for merge tests: loads checkpoints with safetensors + torch
(not chatvec's reader) and computes CP + sum(ratio * (chat - base)) in float64."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def load_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values around |x| (float64)."""
    p = MANTISSA_BITS[dtype]
    _m, e = torch.frexp(x.abs().to(torch.float64))
    tiny = torch.finfo(dtype).tiny
    return torch.clamp(torch.pow(2.0, (e - 1 - p).to(torch.float64)), min=tiny * 2.0**-p)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, name: str = "") -> None:
    """`out` equals float64 `ref` up to float32 arithmetic error plus one rounding of out's dtype.

    `magnitude` bounds the operands (|cp| + sum |ratio| (|chat| + |base|)); a few float32 steps
    each add at most 2**-24 of it.
    """
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    o = out.to(torch.float64)
    err = 4 * 2.0**-24 * magnitude + ulp(ref.abs() + 4 * 2.0**-24 * magnitude, out.dtype)
    bad = (o - ref).abs() > err
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {o.numel()} elements off, worst {float(((o - ref).abs() - err).max())}"
    )


def reference_merge(cp: dict, vectors: list[tuple[float, dict, dict]], dtype: torch.dtype | None = None):
    """{name: (ref64, magnitude, out_dtype)} for every float tensor of `cp` (same shapes)."""
    out = {}
    for name, c in cp.items():
        ref = c.to(torch.float64).clone()
        mag = c.to(torch.float64).abs()
        for ratio, base, chat in vectors:
            b, h = base[name].to(torch.float64), chat[name].to(torch.float64)
            ref += ratio * (h - b)
            mag += abs(ratio) * (h.abs() + b.abs())
        out[name] = (ref, mag, dtype or c.dtype)
    return out
