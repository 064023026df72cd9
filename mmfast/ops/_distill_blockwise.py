"""Blockwise PyTorch path of the streaming distillation term (the ``reference`` backend: CPU, fp64, any
device); same contract and math as ``_distill_triton.py`` (see there and ``contrastive.py``).

Rows are processed ``block_rows`` at a time: each block's (rows × K) student and teacher logits are
built, reduced to the per-row statistics (lse_S, lse_T, μ = Σ_j P_ij S_ij) and dropped, so the live
memory is O(block_rows · K + (M + K)·d), never (M × K). Matmuls run in fp32 (fp64 for fp64 inputs),
the elementwise math in fp64. The backward rebuilds each block and accumulates ``db``/``de`` over
blocks in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

# Elements of one (rows × K) logit block: 2**16 keeps each fp64 block at 512 KiB.
BLOCK_ELEMENTS = 1 << 16


def block_rows(M: int, K: int) -> int:
    return max(1, min(M, max(16, BLOCK_ELEMENTS // max(K, 1))))


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalars come back in fp32 (the contract), in fp64 for fp64 inputs."""
    return x if like.dtype == torch.float64 else x.float()


def _blocks(M: int, K: int):
    br = block_rows(M, K)
    for i0 in range(0, M, br):
        yield i0, min(M, i0 + br)


def _logits(x_blk, y, scale):
    """(scale · x_blk yᵀ) in fp64, plus the raw products (fp64) for the scale gradient."""
    dt = _mm_dtype(x_blk)
    raw = (x_blk.to(dt) @ y.to(dt).t()).double()
    return scale.double() * raw, raw


def distill_fwd(a, b, scale, c, e, tscale):
    M = a.shape[0]
    lse_s = torch.empty(M, dtype=torch.float64, device=a.device)
    lse_t = torch.empty_like(lse_s)
    mu = torch.empty_like(lse_s)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0, i1 in _blocks(M, b.shape[0]):
        zs, _ = _logits(a[i0:i1], b, scale)
        zt, _ = _logits(c[i0:i1], e, tscale)
        ls = torch.logsumexp(zs, dim=1)
        lt = torch.logsumexp(zt, dim=1)
        p = torch.exp(zt - lt[:, None])
        m = zs.amax(dim=1)
        rel = (p * (zs - m[:, None])).sum(dim=1)  # Σ_j P_ij (S_ij − max_j S_ij)
        lse_s[i0:i1], lse_t[i0:i1], mu[i0:i1] = ls, lt, m + rel
        total += ((ls - m) - rel).sum()
    return total, lse_s, lse_t, mu


def distill_bwd(a, b, scale, c, e, tscale, lse_s, lse_t, mu, grad, teacher):
    M = a.shape[0]
    g = grad.double()
    acc_s, acc_t = _mm_dtype(a), _mm_dtype(c)
    da = torch.empty(a.shape, dtype=acc_s, device=a.device)
    db = torch.zeros(b.shape, dtype=acc_s, device=a.device)
    dscale = torch.zeros((), dtype=torch.float64, device=a.device)
    b_mm, e_mm = b.to(acc_s), e.to(acc_t)
    if teacher:
        dc = torch.empty(c.shape, dtype=acc_t, device=a.device)
        de = torch.zeros(e.shape, dtype=acc_t, device=a.device)
        dt = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0, i1 in _blocks(M, b.shape[0]):
        zs, raw_s = _logits(a[i0:i1], b, scale)
        zt, raw_t = _logits(c[i0:i1], e, tscale)
        p = torch.exp(zt - lse_t[i0:i1, None])
        G = torch.exp(zs - lse_s[i0:i1, None]) - p  # ∂r/∂S
        dscale += g * (G * raw_s).sum()
        Gs = (g * scale.double() * G).to(acc_s)
        da[i0:i1] = Gs @ b_mm
        db += Gs.t() @ a[i0:i1].to(acc_s)
        if teacher:
            H = -p * (zs - mu[i0:i1, None])  # ∂r/∂T
            dt += g * (H * raw_t).sum()
            Ht = (g * tscale.double() * H).to(acc_t)
            dc[i0:i1] = Ht @ e_mm
            de += Ht.t() @ c[i0:i1].to(acc_t)
    out = (da.to(a.dtype), db.to(b.dtype), _out_dtype(dscale, a))
    if not teacher:
        return (*out, None, None, None)
    return (*out, dc.to(c.dtype), de.to(e.dtype), _out_dtype(dt, c))
