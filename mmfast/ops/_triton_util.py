"""Triton device helpers shared by the op families' kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowp(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Round fp32 ``x`` to ``dtype``. The interpreter converts fp32 to bf16 by truncation (GPUs round to
    nearest even), so under UPCAST (the interpreter with bf16 data) the rounding is done on the bits and
    the result stays fp32, holding a bf16 value exactly."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def block(start, n, B: tl.constexpr):
    """The B indices ``start, start + 1, ...`` of a dimension of size ``n``: (indices, in-bounds mask,
    the indices as int64 for addressing)."""
    idx = start + tl.arange(0, B)
    return idx, idx < n, idx.to(tl.int64)


@triton.jit
def lse_split(lse, ET: tl.constexpr):
    """An fp64 log-sum-exp as hi + lo in ET: ``z − hi`` is exact for the logits near the max, so
    ``exp((z − hi) − lo)`` keeps log-softmax accuracy however large |lse| is."""
    hi = lse.to(ET)
    return hi, (lse - hi.to(tl.float64)).to(ET)


@triton.jit
def softplus(x):
    """log(1 + eˣ) without overflow; log1p by series where e^-|x| is below 1e-3."""
    t = tl.exp(-tl.abs(x))
    log1p_t = tl.where(t < 1e-3, t * (1.0 - t * (0.5 - t / 3.0)), tl.log(1.0 + t))
    return tl.maximum(x, 0.0) + log1p_t


@triton.jit
def sigmoid(x):
    """σ(x) without overflow for either sign."""
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + t), t / (1.0 + t))


@triton.jit
def dot_tile(x_ptr, y_ptr, rows, rmask, cols, cmask, D, sxm, sxd, syk, syd,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
             F64: tl.constexpr):
    """x_rows · y_colsᵀ as a (BM, BN) tile, d walked in masked chunks of BD: fp64 products and sums
    when F64 (fp32 inputs), else the input dtype's MMA (fp32 operands under UPCAST) with fp32 accumulation."""
    if F64:
        acc = tl.zeros((BM, BN), dtype=tl.float64)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        xt = tl.load(x_ptr + rows[:, None] * sxm + ds[None, :] * sxd, mask=rmask[:, None] & dm[None, :], other=0.0)
        yt = tl.load(y_ptr + cols[None, :] * syk + ds[:, None] * syd, mask=dm[:, None] & cmask[None, :], other=0.0)
        if F64:
            xt = xt.to(tl.float64)
            yt = yt.to(tl.float64)
        elif UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, yt, acc, input_precision=PRECISION)
    return acc
