"""Triton kernels of the projection ops: the cross-entropy row pass of the fused linear cross-entropy,
the bias + GELU epilogue of the MLP projector, and the bias + L2-normalise epilogue of CLIP's heads.

The GEMMs around them stay with cuBLAS (``torch.mm``); these kernels are the memory-bound passes
that would otherwise each read and write the (rows × columns) activations several times.
Every kernel upcasts to fp32 on load and rounds once on store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_C = tl.constexpr(0.044715)


# --------------------------------------------------------------------------- cross-entropy rows
@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # cap · tanh(x / cap), with tanh(a) = 2σ(2a) − 1 (no libdevice needed, same on the interpreter)
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    return x


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (C, V) in the GEMM's dtype; overwritten with d(loss)/d(logits) when WRITE_GRAD
    stride_row,
    target_ptr,  # (C,) int64
    loss_ptr,  # (C,) fp32 out
    lse_ptr,  # (C,) fp32 out
    scale_ptr,  # (C,) or (1,) fp32: d(total)/d(loss_row)
    V,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row. With z = softcap(x), lse = log Σ_j e^{z_j} and ε = smoothing:

        loss = lse − (1−ε) z_t − (ε/V) Σ_j z_j + z_loss · lse²          (0 when t == ignore_index)
        dz_j = p_j (1 + 2 z_loss lse) − ε/V − (1−ε) [j = t],   p = softmax(z)
        dx_j = dz_j · (1 − (z_j / cap)²) · scale                         (the softcap chain rule)
    """
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)

    m = tl.zeros([], tl.float32) - float("inf")
    s = tl.zeros([], tl.float32)
    zsum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _softcapped(x, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        zsum += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    zt = _softcapped(tl.load(ptr + t_safe).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - smoothing) * zt - (smoothing / V) * zsum + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        scale = tl.where(valid, scale, 0.0)
        pscale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = _softcapped(x, softcap, HAS_SOFTCAP)
            g = tl.exp(z - lse) * pscale - smoothing / V
            g = tl.where(offs == t_safe, g - (1.0 - smoothing), g)
            if HAS_SOFTCAP:
                zc = z / softcap
                g = g * (1.0 - zc * zc)
            tl.store(ptr + offs, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def ce_rows(logits, target, loss, lse, scale, per_row, *, ignore_index, smoothing, z_loss, softcap, write_grad):
    """Launch the row pass over one chunk: fills ``loss``/``lse`` (C,) and, with ``write_grad``,
    overwrites ``logits`` (C, V) with ``scale_row · d loss_row / d logits``; ``scale`` is (C,)
    fp32 when ``per_row`` else (1,)."""
    C, V = logits.shape
    if C == 0:
        return
    assert logits.stride(1) == 1
    block = min(4096, next_pow2(V))
    _ce_rows_kernel[(C,)](
        logits,
        logits.stride(0),
        target,
        loss,
        lse,
        scale,
        V,
        int(ignore_index),
        float(smoothing),
        float(z_loss),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        SCALE_PER_ROW=bool(per_row),
        WRITE_GRAD=write_grad,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )


# --------------------------------------------------------------------------- bias + GELU
@triton.jit
def _gelu_and_grad(u, APPROX: tl.constexpr):
    """GELU(u) and its derivative. Exact: u Φ(u). Tanh form: u σ(2a), a = √(2/π)(u + 0.044715 u³),
    which equals 0.5 u (1 + tanh a)."""
    if APPROX:
        a = _SQRT_2_OVER_PI * (u + _GELU_C * u * u * u)
        sg = tl.sigmoid(2.0 * a)
        da = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * u * u)
        return u * sg, sg + u * sg * (1.0 - sg) * 2.0 * da
    cdf = 0.5 * (1.0 + tl.erf(u * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * tl.exp(-0.5 * u * u)
    return u * cdf, cdf + u * pdf


@triton.jit
def _tile_2d(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of a contiguous (M, N) matrix: its columns, mask and offsets."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm[:, None].to(tl.int64) * N + rn[None, :]
    return rn, mask, off


@triton.jit
def _bias_gelu_fwd_kernel(
    y_ptr,  # (M, N) GEMM output without bias; overwritten with u = y + b when STORE_U
    b_ptr,  # (N,) or unused
    h_ptr,  # (M, N) out: gelu(u)
    M,
    N,
    HAS_BIAS: tl.constexpr,
    APPROX: tl.constexpr,
    STORE_U: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """h = gelu(y + b); optionally u = y + b written back in place (the backward needs u)."""
    rn, mask, off = _tile_2d(M, N, BLOCK_M, BLOCK_N)
    u = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    h, _ = _gelu_and_grad(u, APPROX)
    if STORE_U:
        tl.store(y_ptr + off, u.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    u_ptr,  # (M, N) pre-activation
    dh_ptr,  # (M, N) d/dh; overwritten with d/du
    h_ptr,  # (M, N) out: gelu(u), recomputed (only when STORE_H)
    M,
    N,
    APPROX: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """du = dh · gelu'(u), in place over dh; with STORE_H also re-emits h = gelu(u)."""
    _, mask, off = _tile_2d(M, N, BLOCK_M, BLOCK_N)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
    h, dgelu = _gelu_and_grad(u, APPROX)
    tl.store(dh_ptr + off, (dh * dgelu).to(dh_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)


def _grid2d(M, N, bm, bn):
    return (cdiv(M, bm), cdiv(N, bn))


def bias_gelu_fwd(y, bias, approximate: bool, store_u: bool):
    """h = gelu(y + bias) for contiguous (M, N) ``y``; with ``store_u`` y becomes y + bias in place."""
    M, N = y.shape
    h = torch.empty_like(y)
    bm, bn = 32, 128
    _bias_gelu_fwd_kernel[_grid2d(M, N, bm, bn)](
        y, bias if bias is not None else y, h, M, N,
        HAS_BIAS=bias is not None, APPROX=approximate, STORE_U=store_u, BLOCK_M=bm, BLOCK_N=bn,
    )
    return h


def gelu_bwd(u, dh, approximate: bool, recompute_h: bool):
    """Overwrite ``dh`` with dh · gelu'(u); returns gelu(u) when ``recompute_h`` (else None)."""
    M, N = u.shape
    h = torch.empty_like(u) if recompute_h else None
    bm, bn = 32, 128
    _gelu_bwd_kernel[_grid2d(M, N, bm, bn)](
        u, dh, h if h is not None else u, M, N,
        APPROX=approximate, STORE_H=recompute_h, BLOCK_M=bm, BLOCK_N=bn,
    )
    return h


# --------------------------------------------------------------------------- bias + L2 normalise
@triton.jit
def _bias_l2_fwd_kernel(
    y_ptr,  # (M, N) GEMM output without bias
    b_ptr,
    out_ptr,  # (M, N) out: (y + b) / max(‖y + b‖, eps)
    rnorm_ptr,  # (M,) fp32 out: 1 / max(‖y + b‖, eps)
    N,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    y = tl.load(y_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(y * y, 0)), eps)
    tl.store(out_ptr + row * N + cols, (y * r).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rnorm_ptr + row, r)


@triton.jit
def _l2_bwd_kernel(
    out_ptr,  # (M, N) forward output o
    dout_ptr,  # (M, N) d/do; overwritten with d/dy
    rnorm_ptr,  # (M,) fp32
    N,
    eps,
    BLOCK_N: tl.constexpr,
):
    """dy = r (g − o (g·o)) when ‖y‖ > eps (r = 1/‖y‖), else dy = g / eps (the clamp is constant)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    o = tl.load(out_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(rnorm_ptr + row)
    dot = tl.sum(g * o, 0)
    clamped = r >= 1.0 / eps
    dy = tl.where(clamped, g * r, r * (g - o * dot))
    tl.store(dout_ptr + row * N + cols, dy.to(dout_ptr.dtype.element_ty), mask=mask)


def bias_l2_fwd(y, bias, eps):
    M, N = y.shape
    out = torch.empty_like(y)
    rnorm = torch.empty(M, device=y.device, dtype=torch.float32)
    if M:
        _bias_l2_fwd_kernel[(M,)](
            y, bias if bias is not None else y, out, rnorm, N, float(eps),
            HAS_BIAS=bias is not None, BLOCK_N=next_pow2(N),
        )
    return out, rnorm


def l2_bwd(out, dout, rnorm, eps):
    """Overwrite the contiguous ``dout`` with the gradient w.r.t. the pre-normalisation rows."""
    M, N = out.shape
    if M:
        _l2_bwd_kernel[(M,)](out, dout, rnorm, N, float(eps), BLOCK_N=next_pow2(N))
    return dout
