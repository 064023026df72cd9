"""Blockwise PyTorch path of the streaming distillation term (the ``reference`` backend: CPU, fp64, any
device); same contract and math as ``_distill_triton.py`` (see there and ``contrastive.py``).

Rows are processed ``block_rows`` at a time: each block's (rows × K) student and teacher logits are
built, reduced to the per-row statistics (lse_S, lse_T, μ = Σ_j P_ij S_ij) and dropped, so the live
memory is O(block_rows · K + (M + K)·d), never (M × K). The logits' matmuls run in fp64 for fp32 and
fp64 inputs (fp32 for 16-bit ones), the elementwise math in fp64, the gradient GEMMs in fp32 (fp64
for fp64 inputs); the backward rebuilds each block and accumulates ``db``/``de`` over blocks.
"""
from __future__ import annotations

import torch

# Elements of one (rows × K) logit block: 2**15 keeps each fp64 block at 256 KiB.
BLOCK_ELEMENTS = 1 << 15


def block_rows(M: int, K: int) -> int:
    return max(1, min(M, max(8, BLOCK_ELEMENTS // max(K, 1))))


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The logits' matmul dtype: fp64 for fp32 (and fp64) inputs, as the Triton kernels do (see the
    precision note there); fp32 for 16-bit inputs (exact products, fp32 sums)."""
    return torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32


def _grad_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalars come back in fp32 (the contract), in fp64 for fp64 inputs."""
    return x if like.dtype == torch.float64 else x.float()


def _blocks(M: int, K: int):
    br = block_rows(M, K)
    for i0 in range(0, M, br):
        yield i0, min(M, i0 + br)


def _raw(x_blk, y_mm):
    """x_blk yᵀ as fp64 (``y_mm`` already in the matmul dtype)."""
    return (x_blk.to(y_mm.dtype) @ y_mm.t()).double()


def _logits(x_blk, y_mm, scale):
    return _raw(x_blk, y_mm).mul_(scale.double())


def distill_fwd(a, b, scale, c, e, tscale):
    M = a.shape[0]
    lse_s = torch.empty(M, dtype=torch.float64, device=a.device)
    lse_t = torch.empty_like(lse_s)
    mu = torch.empty_like(lse_s)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    b_mm, e_mm = b.to(_mm_dtype(a)), e.to(_mm_dtype(c))
    for i0, i1 in _blocks(M, b.shape[0]):
        zs = _logits(a[i0:i1], b_mm, scale)
        p = _logits(c[i0:i1], e_mm, tscale)
        ls, lt, m = torch.logsumexp(zs, dim=1), torch.logsumexp(p, dim=1), zs.amax(dim=1)
        p.sub_(lt[:, None]).exp_()  # the teacher's row softmax
        rel = zs.sub_(m[:, None]).mul_(p).sum(dim=1)  # Σ_j P_ij (S_ij − max_j S_ij)
        lse_s[i0:i1], lse_t[i0:i1], mu[i0:i1] = ls, lt, m + rel
        total += ((ls - m) - rel).sum()
    return total, lse_s, lse_t, mu


def distill_bwd(a, b, scale, c, e, tscale, lse_s, lse_t, mu, grad, teacher):
    M = a.shape[0]
    g = grad.double()
    s64, t64 = scale.double(), tscale.double()
    acc_s, acc_t = _grad_dtype(a), _grad_dtype(c)
    da = torch.empty(a.shape, dtype=acc_s, device=a.device)
    db = torch.zeros(b.shape, dtype=acc_s, device=a.device)
    dscale = torch.zeros((), dtype=torch.float64, device=a.device)
    b_mm, e_mm = b.to(_mm_dtype(a)), e.to(_mm_dtype(c))
    b_g = b_mm if b_mm.dtype == acc_s else b.to(acc_s)
    if teacher:
        dc = torch.empty(c.shape, dtype=acc_t, device=a.device)
        de = torch.zeros(e.shape, dtype=acc_t, device=a.device)
        dt = torch.zeros((), dtype=torch.float64, device=a.device)
        e_g = e_mm if e_mm.dtype == acc_t else e.to(acc_t)
    for i0, i1 in _blocks(M, b.shape[0]):
        raw = _raw(a[i0:i1], b_mm)
        zs = raw * s64
        zt = _raw(c[i0:i1], e_mm)  # raw teacher products; T = t · zt
        p = (zt * t64).sub_(lse_t[i0:i1, None]).exp_()
        G = (zs - lse_s[i0:i1, None]).exp_().sub_(p)  # ∂r/∂S = Q − P
        dscale += g * (G * raw).sum()  # Σ G ⊙ (a bᵀ)
        del raw
        G.mul_(g * s64)
        Gs = G.to(acc_s)
        da[i0:i1] = Gs @ b_g
        db += Gs.t() @ a[i0:i1].to(acc_s)
        del G, Gs
        if teacher:
            H = zs.sub_(mu[i0:i1, None]).mul_(p).neg_()  # ∂r/∂T = −P ⊙ (S − μ)
            dt += g * (H * zt).sum()
            Ht = H.mul_(g * t64).to(acc_t)
            dc[i0:i1] = Ht @ e_g
            de += Ht.t() @ c[i0:i1].to(acc_t)
    out = (da.to(a.dtype), db.to(b.dtype), _out_dtype(dscale, a))
    if not teacher:
        return (*out, None, None, None)
    return (*out, dc.to(c.dtype), de.to(e.dtype), _out_dtype(dt, c))
