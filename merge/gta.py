"""mergekit's general form ("generalized task arithmetic"), for `chatvec merge --mergekit-config`.

mergekit computes with torch in one dtype D: the config's `dtype`, or where that is unset the
base model's stored dtype (mergekit 0.1 promotes over all the inputs' dtypes instead: the same
when they are stored alike). In mergekit mode the tensor's output dtype is that D
(merge/plan.py), and every step below is computed in D, per entry, in this order (mergekit's
formulas, not chatvec's):

    x_i, b     = model_i, base converted to D
    tau_i      = x_i - b
    sparsify:  (density_i < 1 only; at density 1 tau_i stays as it is)
               ties: masked_i = tau_i where |tau_i| >= t_i, else 0, with t_i the k-th largest
                 |tau_i| of the tensor, k = max(1, int(density_i * entries))
               dare_ties, dare_linear: masked_i = tau_i * keep_i
               rescale (`rescale`; the dare methods' default, allowed with ties): mergekit's L1
                 rescale over the whole tensor: before = sum |tau_i|, after = sum |masked_i|,
                 both in the work dtype; tau_i = masked_i where before < 1e-7 or after < 1e-7,
                 else masked_i * (before / after) (merge/gta_stats.py finds the factor)
               without rescale: tau_i = masked_i
    w_i        = tau_i * W_i,  W_i = weight_i in D (mergekit's torch.tensor(weights, dtype=D))
    combine:   with sign consensus (ties, dare_ties): s = +1 where sum_i w_i >= 0, else -1;
                 m_i = (sign(w_i) == s); mixed = sum_i w_i * m_i; divisor = sum_i W_i * m_i
                 (1 where that is 0)
               without (task_arithmetic, dare_linear): mixed = sum_i w_i; divisor = sum_i W_i
                 (1 where |divisor| < 1e-8, compared in D: in float16 1e-8 is 0, so never)
    normalize: mixed = mixed / divisor            (when `normalize`)
    lambda:    mixed = mixed * lambda             (when lambda != 1)
    out        = b + mixed

These are mergekit 0.1.5's formulas (merge_methods/generalized_task_arithmetic.py, sparsify.py)
with its defaults: normalize for ties, rescale for dare_ties and dare_linear. (mergekit up to
0.0.6 trimmed to int(density_i * entries) and divided dare's kept entries by density_i.)

Rounding, as torch does it on the CPU (each rule checked against torch): in bfloat16 and float16
the result of every step is rounded to D (to nearest, ties to even). Before that rounding a step
is one float32 operation: an operation on D values is computed in float32; a Python number (lambda)
enters as float32, unrounded; W_i is rounded to D (through float32); a sum over the
models adds in float32, in the models' order from +0, and is rounded once. The rescale works in
mergekit's work dtype on the CPU: D for ties; for the dare methods D in bfloat16 and float32, and
float32 in float16 (mergekit's bernoulli moves float16 to float32 on the CPU; on CUDA it would
stay in float16); before and after are sums of the tensor rounded to it (torch accumulates them
in float32 and returns D; here they are added in float64, so their last bit can differ), the
factor before / after is a float32 division rounded to it, and masked_i * factor one float32
multiply rounded to D. Conversions to D round to nearest even (float64 through float32, as torch
converts it). Masks, signs and the trim are exact. In float32 nothing more is rounded; float64
tensors are computed in float32 (mergekit: in float64).

Where mergekit's numbers come from torch's sort (which of the entries equal to t_i it keeps) and
random generator (dare's keep_i), chatvec keeps every entry at the threshold and uses its own
seeded rule (merge/kernels.py), so those entries can differ (and with them after, so the
rescale factor). t_i comes with the job as the k-th largest |tau_i| computed as above, in D
(merge/ties_threshold.py, whose passes use mergekit_tau_into in mergekit mode), whatever dtype the
inputs are stored in. torch adds up to 4 models in exactly the order above;
with more, its CPU kernel groups the terms of some entries differently (which ones depends on
the tensor's width, the CPU's vector width and the thread count), so those entries can differ
in their last bit.

Two backends: numpy (device cpu) works on float32 arrays and rounds each result in place; the
torch backend (torch-cpu, cuda) runs the same steps on torch tensors of dtype D, so that torch
does the rounding. Its sums are written out as float32 additions in the models' order (what
torch's sum does for up to 4 models) and dare's division as a float32 division by a tensor (on
CUDA, dividing by a Python number multiplies by its reciprocal), so it gives the numpy
backend's bytes (NaN payloads aside): checked on the CPU; on CUDA this rests on its bfloat16 and
float16 operations computing in float32 and rounding to nearest even, as the CPU's do. Both take
the trim threshold and the rescale factor from the job (computed on the CPU, with numpy).
"""

from __future__ import annotations

import numpy as np

from chatvec.merge.job_buffer import piece_bytes
from chatvec.merge.jobs import Job, Piece
from chatvec.merge.kernels import NumpyBackend, dare_keep
from chatvec.merge.methods import METHODS, drops

# compute dtypes whose every step is rounded (float32 and float64 are computed in float32)
ROUNDED = ("BF16", "F16")


def round_to(x: np.ndarray, dtype: str, tmp: np.ndarray | None = None) -> None:
    """Round the float32 array `x` in place to the nearest `dtype` value, ties to even, as torch
    stores an operation's result; NaN stays NaN. Nothing to do for F32 and F64. `tmp`: a uint32
    work array of x's size (allocated when not given)."""
    if dtype == "BF16":
        nan = np.isnan(x)
        u = x.view(np.uint32)
        t = np.empty(len(x), np.uint32) if tmp is None else tmp
        np.right_shift(u, 16, out=t)
        t &= 1
        t += 0x7FFF
        t += u  # a carry out of the low half rounds up (to infinity past the largest value)
        t &= 0xFFFF0000
        u[...] = t
        if nan.any():
            x[nan] = np.nan  # the carry can turn a NaN into infinity or a zero
    elif dtype == "F16":
        with np.errstate(over="ignore"):
            np.copyto(x, x.astype(np.float16))


def round_scalar(value: float, dtype: str) -> float:
    """`value` as float32, rounded to `dtype` (what torch.tensor([value], dtype=...) holds)."""
    a = np.array([value], np.float32)
    round_to(a, dtype)
    return float(a[0])


def _load(backend, raw: np.ndarray, src: str, dtype: str, out: np.ndarray, tmp) -> None:
    """Input bytes of dtype `src` -> their values in the compute dtype `dtype`, as float32."""
    backend.decode(raw, src, out)  # (float64 through float32, as torch converts it to a half type)
    if src != dtype:
        round_to(out, dtype, tmp)


def mergekit_tau_into(backend, buf, p: Piece, a: int, b: int, t, u, dtype: str, tmp=None) -> None:
    """t = tau of output elements [a, b) of piece `p` in the compute dtype `dtype` (numpy backend):
    model and base converted to `dtype`, subtracted, rounded. `u`: a float32 work array of t's
    size; `tmp`: uint32 of t's size. With inputs stored in `dtype` this is tau rounded once."""
    n = b - a
    _load(backend, piece_bytes(buf, p.at, p.dtype, a, b, p.out), p.dtype, dtype, t, tmp)
    if p.base_at >= 0:
        _load(backend, piece_bytes(buf, p.base_at, p.base_dtype, a, b, p.out), p.base_dtype, dtype, u[:n], tmp)
        t -= u[:n]
        round_to(t, dtype, tmp)


def gta_job(backend, job: Job, buf, out: np.ndarray, scratch, encode_dtype: str, itemsize: int) -> None:
    """Fill `out` with the job's output elements in mergekit's form (see the module docstring).
    `encode_dtype` (the tensor's output dtype) is the compute dtype D."""
    if isinstance(backend, NumpyBackend):
        _numpy_job(backend, job, buf, out, scratch, encode_dtype, itemsize)
    else:
        _torch_job(backend, job, buf, out, scratch.n, encode_dtype, itemsize)


def _zeroed(term) -> bool:
    """mergekit's ties at density <= 0 (which its configs reject) zeroes the vector."""
    return METHODS[term.method].whole_tensor and term.density <= 0.0


def _threshold(job: Job, term_job, dtype: str) -> float | None:
    """The trim threshold of a TIES term in the compute dtype (None: keep every entry)."""
    if not METHODS[term_job.term.method].whole_tensor:
        return None
    threshold = job.thresholds[term_job.index]
    return None if threshold is None else round_scalar(threshold, dtype)


def _numpy_job(backend, job: Job, buf, out: np.ndarray, scratch, dtype: str, itemsize: int) -> None:
    mode = job.task.mergekit
    cp = job.cp
    step = scratch.n
    tmp_all = scratch.t.view(np.uint32)  # scratch.t is free here: the rounding's work array
    weights = [np.float32(round_scalar(tj.term.ratio, dtype)) for tj in job.terms]
    thresholds = [_threshold(job, tj, dtype) for tj in job.terms]
    scales = [job.scales.get(tj.index) for tj in job.terms]
    rounded = dtype in ROUNDED

    def rnd(x: np.ndarray) -> None:
        if rounded:
            round_to(x, dtype, tmp_all[: len(x)])

    for lo in range(0, job.n, step):
        hi = min(job.n, lo + step)
        m = hi - lo
        tmp = tmp_all[:m]
        base = scratch.acc[:m]
        _load(backend, piece_bytes(buf, cp.at, cp.dtype, lo, hi, 0), cp.dtype, dtype, base, tmp)
        weighted = []
        for k, term_job in enumerate(job.terms):
            term = term_job.term
            dropping = drops(term)  # (mergekit leaves a density-1 vector as it is)
            w = scratch.weighted(k)[:m]
            w[...] = 0
            for p in term_job.pieces:
                a, b = max(lo, p.out), min(hi, p.out + p.n)
                if a < b:
                    part = w[a - lo : b - lo]
                    mergekit_tau_into(backend, buf, p, a, b, part, scratch.u, dtype, tmp[: b - a])
                    if dropping:
                        part *= dare_keep(term_job.key, p.index + (a - p.out), b - a, term.density)
            if thresholds[k] is not None:
                backend.trim(w, thresholds[k])
            if _zeroed(term):
                w[...] = 0
            if scales[k] is not None:
                w *= np.float32(scales[k])
                rnd(w)
            w *= weights[k]
            rnd(w)
            weighted.append(w)
        mixed = np.zeros(m, np.float32)
        if mode.consensus:
            total = np.zeros(m, np.float32)
            for w in weighted:
                total += w
            # (rounding the total to D could not change its sign: a float32 sum of D values is
            # exact near 0, so it never rounds to a zero)
            majority = np.where(total >= 0, np.float32(1), np.float32(-1))
            divisor = np.zeros(m, np.float32)
            for w, weight in zip(weighted, weights):
                mask = (np.sign(w) == majority).astype(np.float32)
                mixed += w * mask
                divisor += weight * mask
            rnd(mixed)
            rnd(divisor)
            divisor[divisor == 0] = 1
        else:
            for w in weighted:
                mixed += w
            rnd(mixed)
            divisor = np.float32(0)
            for weight in weights:
                divisor = np.float32(divisor + weight)
            if rounded:
                divisor = np.float32(round_scalar(divisor, dtype))
                small = abs(divisor) < round_scalar(1e-8, dtype)  # torch compares in D
            else:
                small = abs(divisor) < 1e-8
            if small:
                divisor = np.float32(1)
        with np.errstate(divide="ignore", invalid="ignore"):  # float16 can divide by 0, as torch does
            if mode.normalize:
                mixed /= divisor
                rnd(mixed)
        if mode.lambda_ != 1.0:
            mixed *= np.float32(mode.lambda_)
            rnd(mixed)
        base += mixed
        backend.encode(base, dtype, out[lo * itemsize : hi * itemsize])  # rounds it to D


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _torch_job(backend, job: Job, buf, out: np.ndarray, step: int, dtype: str, itemsize: int) -> None:
    """The same steps with torch tensors of the compute dtype on the backend's device."""
    torch = backend.torch
    dev = backend.device
    mode = job.task.mergekit
    cp = job.cp
    cdt = getattr(torch, _TORCH_DTYPES[dtype]) if dtype in ROUNDED else torch.float32
    f32 = torch.float32

    def load(raw: np.ndarray, src: str):
        # a view of `buf` where no conversion is needed: never written to
        x = torch.from_numpy(raw).to(dev, non_blocking=True).view(getattr(torch, _TORCH_DTYPES[src]))
        return x.to(cdt)

    def in_order_sum(rows):
        # sum over the models in float32, in their order from +0, rounded once: torch's
        # sum(dim=0) for up to 4 models; written out so that more models and CUDA add alike
        acc = torch.zeros(rows[0].shape, dtype=f32, device=dev)
        for r in rows:
            acc += r.to(f32)
        return acc.to(cdt)

    weights = torch.tensor([tj.term.ratio for tj in job.terms], dtype=cdt, device=dev)
    thresholds = [_threshold(job, tj, dtype) for tj in job.terms]
    scales = [job.scales.get(tj.index) for tj in job.terms]
    for lo in range(0, job.n, step):
        hi = min(job.n, lo + step)
        m = hi - lo
        base = load(piece_bytes(buf, cp.at, cp.dtype, lo, hi, 0), cp.dtype)
        weighted = []
        for k, term_job in enumerate(job.terms):
            term = term_job.term
            dropping = drops(term)  # (mergekit leaves a density-1 vector as it is)
            d = torch.zeros(m, dtype=cdt, device=dev)
            keep = np.zeros(m, bool) if dropping else None
            for p in term_job.pieces:
                a, b = max(lo, p.out), min(hi, p.out + p.n)
                if a < b:
                    x = load(piece_bytes(buf, p.at, p.dtype, a, b, p.out), p.dtype)
                    if p.base_at >= 0:
                        x = x - load(piece_bytes(buf, p.base_at, p.base_dtype, a, b, p.out), p.base_dtype)
                    d[a - lo : b - lo] = x
                    if dropping:
                        keep[a - lo : b - lo] = dare_keep(term_job.key, p.index + (a - p.out), b - a, term.density)
            if dropping:
                d = d * torch.from_numpy(keep).to(dev)  # exact
            threshold = thresholds[k]
            if threshold is not None and threshold == threshold:  # a NaN threshold trims nothing
                d = d * (d.abs() >= threshold)
            if _zeroed(term):
                d = torch.zeros_like(d)
            if scales[k] is not None:  # one float32 multiply by the factor, rounded to D
                d = (d.to(f32) * torch.tensor(scales[k], dtype=f32, device=dev)).to(cdt)
            weighted.append(d * weights[k])
        if mode.consensus:
            majority = (in_order_sum(weighted) >= 0).to(cdt) * 2 - 1
            masks = [w.sign() == majority for w in weighted]
            mixed = in_order_sum([w * mask for w, mask in zip(weighted, masks)])
            divisor = in_order_sum([weights[k] * mask for k, mask in enumerate(masks)])
            divisor[divisor == 0] = 1
        else:
            mixed = in_order_sum(weighted)
            divisor = in_order_sum([weights[k] for k in range(len(weighted))])
            if dtype in ROUNDED:
                small = divisor.abs() < 1e-8  # in D, as mergekit's
            else:
                small = abs(float(divisor)) < 1e-8  # as the numpy backend
            if bool(small):
                divisor = torch.ones((), dtype=cdt, device=dev)
        if mode.normalize:
            mixed = mixed / divisor
        if mode.lambda_ != 1.0:
            mixed = mixed * mode.lambda_
        backend.encode(base + mixed, dtype, out[lo * itemsize : hi * itemsize])
