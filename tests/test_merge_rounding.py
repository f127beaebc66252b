"""The numpy kernels round float32 to each output dtype exactly as torch does, special values
included, so CPU (numpy) and CUDA (torch) merges write the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatvec.merge.kernels import NumpyBackend


def _specials() -> np.ndarray:
    f32 = np.float32
    values = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        np.inf,
        -np.inf,
        np.nan,
        -np.nan,
        np.finfo(f32).max,
        -np.finfo(f32).max,
        np.finfo(f32).tiny,
        -np.finfo(f32).tiny,
        1e-40,
        -1e-40,
        3.4e38,
        65504.0,
        65520.0,
        1e5,
        6e-8,
        1e-8,
    ]
    bits = np.array(
        [
            0x7FC00001,
            0xFFC12345,
            0x7F800001,  # NaNs with payloads, a signalling NaN
            0x3F808000,
            0x3F818000,
            0x3F80C000,
            0x3F817FFF,  # bf16 ties to even and just below
            0x00008000,
            0x80018000,
            0x7F7F8000,
            0x7F7FFFFF,
        ],
        dtype=np.uint32,
    )
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(values, f32), bits.view(f32), random_bits.view(f32)])


@pytest.mark.parametrize(
    "dtype, torch_dtype, width",
    [
        ("BF16", torch.bfloat16, 2),
        ("F16", torch.float16, 2),
        ("F32", torch.float32, 4),
    ],
)
def test_encode_matches_torch_cast(dtype, torch_dtype, width):
    x = _specials()
    out = np.empty(x.size * width, np.uint8)
    with np.errstate(all="ignore"):
        NumpyBackend(step=1 << 10).encode(x, dtype, out)
    expected = torch.from_numpy(x.copy()).to(torch_dtype).view(torch.uint8).numpy()
    got, want = out.view(np.uint16 if width == 2 else np.uint32), expected.view(np.uint16 if width == 2 else np.uint32)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    # A NaN stays a NaN; its bit pattern differs between torch builds and devices (0x7FC0,
    # 0x7FFF, 0xFFFF for bf16), and no healthy checkpoint holds one.
    if dtype == "BF16":
        back = (got[nan].astype(np.uint32) << 16).view(np.float32)
    else:
        back = got.view(np.float16 if width == 2 else np.float32)[nan]
    assert nan.any() and np.isnan(back).all()


@pytest.mark.parametrize("dtype, torch_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_decode_matches_torch(dtype, torch_dtype):
    raw = np.arange(2**16, dtype=np.uint16)  # every 16-bit pattern
    out = np.empty(raw.size, np.float32)
    NumpyBackend().decode(raw.view(np.uint8), dtype, out)
    want = torch.from_numpy(raw.view(np.int16).copy()).view(torch_dtype).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))
