"""Triton kernels of the LLaMA fused set: rotary embedding (q and k in one launch) and the SwiGLU
activation. (The residual add + RMSNorm is :mod:`mmfast.ops._norm_triton`'s kernel with a residual.)

Rotary, HF's ``rotate_half`` convention, head dim D = 2·HALF, per (batch b, position s, head h):

    o[:HALF] = x[:HALF] · cos[:HALF] − x[HALF:] · sin[:HALF]
    o[HALF:] = x[HALF:] · cos[HALF:] + x[:HALF] · sin[HALF:]

The backward is the transposed map, the same kernel with the sine halves swapped and negated
(``BACKWARD``): dx[:HALF] = d[:HALF] cos[:HALF] + d[HALF:] sin[HALF:], dx[HALF:] = d[HALF:] cos[HALF:]
− d[:HALF] sin[:HALF]. One program per (s, b) reads cos/sin once and rotates every q head and every
k head at that position; inputs and outputs are strided (B, H, S, D) views with unit stride in D,
and an output may be its input (in place).

SwiGLU: a = silu(g) · u = g σ(g) u. Backward from da:  du = da · g σ(g),
dg = da · u · σ(g) (1 + g (1 − σ(g))); with ``STORE_A`` the backward also re-emits a (for the down
projection's weight gradient), so the forward never has to keep it. fp32 inside, one rounding out.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, b, s, n_heads,
    sx_b, sx_h, sx_s, so_b, so_h, so_s,
    c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < n_heads)[:, None] & (d < HALF)[None, :]
    xo = b * sx_b + s * sx_s + h[:, None].to(tl.int64) * sx_h + d[None, :]
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    oo = b * so_b + s * so_s + h[:, None].to(tl.int64) * so_h + d[None, :]
    tl.store(o_ptr + oo, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + oo + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    HQ, HK,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
    sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
    sc_b, sc_s, ss_b, ss_s,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    co = cos_ptr + b * sc_b + s * sc_s + d
    so = sin_ptr + b * ss_b + s * ss_s + d
    c1 = tl.load(co, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(co + HALF, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(so, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(so + HALF, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(q_ptr, qo_ptr, b, s, HQ, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s, c1, c2, s1, s2,
                  HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, b, s, HK, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s, c1, c2, s1, s2,
                  HALF, BLOCK_HK, BLOCK_D)


def _rope_warps(block_h: int, block_d: int) -> int:
    return max(1, min(8, (block_h * block_d) // 256))


def rope(q, k, q_out, k_out, cos, sin, backward: bool) -> None:
    """q (B, HQ, S, D), k (B, HK, S, D) and the outputs (may be the inputs): strided, unit stride in D;
    cos/sin (B, S, D) strided (stride 0 where broadcast), unit stride in D."""
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if B == 0 or S == 0:
        return
    half = D // 2
    block_d = next_pow2(half)
    bq, bk = next_pow2(HQ), next_pow2(HK)
    _rope_kernel[(S, B)](
        q, k, q_out, k_out, cos, sin, HQ, HK,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_D=block_d, BACKWARD=backward,
        num_warps=_rope_warps(max(bq, bk), block_d),
    )


# --------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, a_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, da_ptr, dg_ptr, du_ptr, a_ptr, n, STORE_A: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    sg = g * sig
    du = da * sg
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
    if STORE_A:
        tl.store(a_ptr + offs, (sg * u).to(a_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024
_SWIGLU_WARPS = 4


def swiglu_fwd(g, u, a) -> None:
    """a = silu(g) · u over contiguous tensors of one shape."""
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _SWIGLU_BLOCK),)](g, u, a, n, BLOCK=_SWIGLU_BLOCK, num_warps=_SWIGLU_WARPS)


def swiglu_bwd(g, u, da, dg, du, a) -> None:
    """dg, du (and a = silu(g) · u when ``a`` is not None); ``dg`` may be ``da`` (in place)."""
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _SWIGLU_BLOCK),)](
            g, u, da, dg, du, a if a is not None else du, n, STORE_A=a is not None, BLOCK=_SWIGLU_BLOCK,
            num_warps=_SWIGLU_WARPS,
        )
