"""Triton kernel of the fused linear cross-entropy's vocabulary-block pass (see :mod:`mmfast.ops._flce`).

Given a (T, Vb) block of logits for the vocabulary columns ``[v0, v0 + Vb)`` and each row's final
log-sum-exp (from the row pass), it overwrites the block with ``scale_row · d loss_row / d logits`` —
the same formula, in the same fp32 order, as the row pass ``_ce_rows_kernel`` writes over a full row:

    dz_j = p_j (1 + 2 z_loss lse) − ε/V − (1−ε) [j = t],   p_j = exp(z_j − lse)
    dx_j = dz_j · (1 − (z_j / cap)²) · scale                (the softcap chain rule; 0 on ignored rows)
"""
from __future__ import annotations

import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2


@triton.jit
def _grad_block_kernel(
    logits_ptr,  # (T, Vb), row stride stride_row; overwritten with the gradient
    stride_row,
    target_ptr,  # (T,) int64
    lse_ptr,  # (T,) fp32
    scale_ptr,  # (T,) or (1,) fp32
    v0, Vb, V,
    ignore_index, smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < Vb
    t = tl.load(target_ptr + row)
    valid = t != ignore_index
    lse = tl.load(lse_ptr + row)
    if SCALE_PER_ROW:
        scale = tl.load(scale_ptr + row)
    else:
        scale = tl.load(scale_ptr)
    scale = tl.where(valid, scale, 0.0)
    ptr = logits_ptr + row * stride_row + offs
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    g = tl.exp(z - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
    g = tl.where(offs + v0 == t, g - (1.0 - smoothing), g)
    if HAS_SOFTCAP:
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    tl.store(ptr, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def ce_grad_block(logits, target, lse, scale, per_row, v0, V, *, ignore_index, smoothing, z_loss, softcap):
    """Overwrite ``logits`` (T, Vb), the columns ``[v0, v0 + Vb)``, with their scaled gradient."""
    T, Vb = logits.shape
    if T == 0 or Vb == 0:
        return
    assert logits.stride(1) == 1
    block = min(2048, next_pow2(Vb))
    _grad_block_kernel[(T, cdiv(Vb, block))](
        logits, logits.stride(0), target, lse, scale, int(v0), Vb, V, int(ignore_index), float(smoothing),
        float(z_loss), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, SCALE_PER_ROW=bool(per_row), BLOCK_V=block,
        num_warps=max(1, min(8, block // 256)),
    )
