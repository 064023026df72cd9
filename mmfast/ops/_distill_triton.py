"""Triton kernels for the streaming CLIP distillation term; the contract is in ``contrastive.py``.

Problem (one side, "rows"): student ``a`` (M, d), ``b`` (K, d), scale ``s``; teacher ``c`` (M, d'),
``e`` (K, d'), scale ``t``. Student logits ``S = s·a bᵀ``, teacher logits ``T = t·c eᵀ``, both (M, K),
never stored. With ``P = softmax_row(T)`` and ``Q = softmax_row(S)`` the row term is the
cross-entropy of the teacher's row distribution against the student's:

    r_i = −Σ_j P_ij log Q_ij = lse_j(S_ij) − Σ_j P_ij S_ij        (Σ_j P_ij = 1)

Forward. One program per block of BM rows walks every column block once and builds the S and T
tiles in registers (d and d' in chunks of BD). It keeps the online log-sum-exp of S (m_s, l_s) and
of T (m_t, l_t), and ``w = Σ_j exp(T_ij − m_t)·(S_ij − m_s)``, measured from the current student max
so that ``r_i = log l_s − w / l_t`` never subtracts two large numbers (when m_s grows by Δ, every
term already in w shrinks by Δ: ``w −= Δ·l_t``). Stored per row: lse_S, lse_T and the teacher-weighted
mean ``μ_i = Σ_j P_ij S_ij`` and r_i (fp64). Extra memory: O(M) vectors.

Backward. Same grid; each program recomputes its S and T tiles and

    ∂r/∂S = Q − P,    ∂r/∂T = −P ⊙ (S − μ)   (the softmax Jacobian; only when the teacher needs grads)

then adds ``g·s·G_S b`` to its own rows of an fp32 ``da`` buffer, atomically adds ``g·s·G_Sᵀ a`` into
an fp32 ``db`` (K, d) buffer, and the same with t, c, e for the teacher. ``ds = g·Σ G_S ⊙ (a bᵀ)``,
``dt = g·Σ G_T ⊙ (c eᵀ)`` are per-program partials summed by torch. Extra memory: (M + K)·(d [+ d'])·4
bytes of fp32 accumulators. FLOPs, one side: forward 2·M·K·(d + d'), backward 2·M·K·(3d [+ 3d']).
The symmetric loss (image→text and text→image) is two one-sided calls, the second on the transposed
problem (b, a, e, c): each call's backward recomputes its tiles in the orientation its forward used.

Precision. fp32 inputs: the logit tiles are fp64 dots (DMMA on sm_80+, as fast there as ieee fp32
FMA) and the elementwise math fp64. Why: at open_clip's clamp (scale 100) the teacher's gradient
``−P ⊙ (S − μ)`` amplifies the rounding of T — an fp32 dot's error there is as large as PyTorch's own
fp32 error, so two fp32 computations land anywhere within 4x of each other; fp64 tiles remove that
term. 16-bit inputs: native dots with fp32 accumulation (exact products) and fp32 elementwise math.
The gradient GEMMs take G rounded to the input dtype (fp32 accumulation). Under the interpreter bf16
operands are upcast before ``tl.dot`` (it multiplies raw bf16 bits).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2
from mmfast.ops._triton_util import block as _block
from mmfast.ops._triton_util import dot_tile as _tile
from mmfast.ops._triton_util import lowp, lse_split
from mmfast.utils.debug import poison_

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill every kernel output with NaN before launch (an unwritten element then shows).
POISON_OUTPUTS = False

_NEG = tl.constexpr(-1.0e30)


@triton.jit(do_not_specialize=["M", "K"])
def _fwd_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, s_ptr, t_ptr,
    row_ptr, lse_s_ptr, lse_t_ptr, mu_ptr,  # (M,) fp64
    M, K, D, DT,
    sam, sad, sbk, sbd, scm, scd, sek, sed,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    UPS: tl.constexpr, UPT: tl.constexpr, PRECS: tl.constexpr, PRECT: tl.constexpr, EXACT: tl.constexpr,
    F64S: tl.constexpr, F64T: tl.constexpr,
):
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    pid = tl.program_id(0)
    rows, rmask, rows64 = _block(pid * BM, M, BM)
    s = tl.load(s_ptr).to(ET)
    t = tl.load(t_ptr).to(ET)
    m_s = tl.full((BM,), _NEG, dtype=ET)
    l_s = tl.zeros((BM,), dtype=ET)
    m_t = tl.full((BM,), _NEG, dtype=ET)
    l_t = tl.zeros((BM,), dtype=ET)
    w = tl.zeros((BM,), dtype=ET)
    for n0 in range(0, K, BN):
        _, cmask, cols64 = _block(n0, K, BN)
        acc_s = _tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, sam, sad, sbk, sbd, BM, BN, BD, UPS, PRECS, F64S)
        acc_t = _tile(c_ptr, e_ptr, rows64, rmask, cols64, cmask, DT, scm, scd, sek, sed, BM, BN, BDT, UPT, PRECT, F64T)
        zs = tl.where(cmask[None, :], s * acc_s.to(ET), _NEG)
        zt = tl.where(cmask[None, :], t * acc_t.to(ET), _NEG)
        ms_new = tl.maximum(m_s, tl.max(zs, axis=1))
        l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(zs - ms_new[:, None]), axis=1)
        mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
        alpha = tl.exp(m_t - mt_new)
        l_t = l_t * alpha
        w = w * alpha - (ms_new - m_s) * l_t  # re-measure the old terms from the new student max
        pt = tl.exp(zt - mt_new[:, None])
        w += tl.sum(tl.where(cmask[None, :], pt * (zs - ms_new[:, None]), 0.0), axis=1)
        l_t += tl.sum(pt, axis=1)
        m_s = ms_new
        m_t = mt_new
    log_ls = tl.log(l_s.to(tl.float64))
    rel = w.to(tl.float64) / l_t.to(tl.float64)  # Σ_j P_ij (S_ij − m_s) <= 0
    tl.store(lse_s_ptr + rows, m_s.to(tl.float64) + log_ls, mask=rmask)
    tl.store(lse_t_ptr + rows, m_t.to(tl.float64) + tl.log(l_t.to(tl.float64)), mask=rmask)
    tl.store(mu_ptr + rows, m_s.to(tl.float64) + rel, mask=rmask)
    tl.store(row_ptr + rows, log_ls - rel, mask=rmask)


@triton.jit
def _grad_rows(g_tile, x_ptr, y_ptr, dx_ptr, dy_ptr, rows64, rmask, cols64, cmask, D, sxm, sxd, syk, syd, gsc, n0,
               BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dx[rows] += gsc·G y[cols] (this program owns those rows); dy[cols] += gsc·Gᵀ x[rows] (atomics)."""
    tl.debug_barrier()
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        yt = tl.load(y_ptr + cols64[:, None] * syk + ds[None, :] * syd, mask=cmask[:, None] & dm[None, :], other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * sxm + ds[None, :] * sxd, mask=rmask[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            yt = yt.to(tl.float32)
            xt = xt.to(tl.float32)
        dx_ptrs = dx_ptr + rows64[:, None] * D + ds[None, :]
        dx_mask = rmask[:, None] & dm[None, :]
        tl.debug_barrier()
        old = tl.load(dx_ptrs, mask=dx_mask & (n0 > 0), other=0.0)
        tl.store(dx_ptrs, old + gsc * tl.dot(g_tile, yt, input_precision=PRECISION), mask=dx_mask)
        part = gsc * tl.dot(tl.trans(g_tile), xt, input_precision=PRECISION)
        tl.atomic_add(dy_ptr + cols64[:, None] * D + ds[None, :], part, mask=cmask[:, None] & dm[None, :],
                      sem="relaxed")


@triton.jit(do_not_specialize=["M", "K"])
def _bwd_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, s_ptr, t_ptr, grad_ptr, lse_s_ptr, lse_t_ptr, mu_ptr,
    da_ptr, db_ptr, dc_ptr, de_ptr, ds_ptr, dt_ptr,  # fp32 (M,d) / (K,d) zeroed / (M,d') / (K,d') zeroed / (R,) / (R,)
    M, K, D, DT,
    sam, sad, sbk, sbd, scm, scd, sek, sed,
    TEACHER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    UPS: tl.constexpr, UPT: tl.constexpr, PRECS: tl.constexpr, PRECT: tl.constexpr, EXACT: tl.constexpr,
    F64S: tl.constexpr, F64T: tl.constexpr,
):
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    pid = tl.program_id(0)
    rows, rmask, rows64 = _block(pid * BM, M, BM)
    s = tl.load(s_ptr).to(ET)
    t = tl.load(t_ptr).to(ET)
    g = tl.load(grad_ptr).to(tl.float32)
    gs = g * tl.load(s_ptr).to(tl.float32)
    gt = g * tl.load(t_ptr).to(tl.float32)
    hs, ls = lse_split(tl.load(lse_s_ptr + rows, mask=rmask, other=0.0), ET)
    ht, lt = lse_split(tl.load(lse_t_ptr + rows, mask=rmask, other=0.0), ET)
    hm, lm = lse_split(tl.load(mu_ptr + rows, mask=rmask, other=0.0), ET)
    dsc = tl.zeros((BM,), dtype=ET)
    dtc = tl.zeros((BM,), dtype=ET)
    for n0 in range(0, K, BN):
        _, cmask, cols64 = _block(n0, K, BN)
        valid = rmask[:, None] & cmask[None, :]
        acc_s = _tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, sam, sad, sbk, sbd, BM, BN, BD, UPS, PRECS, F64S)
        acc_t = _tile(c_ptr, e_ptr, rows64, rmask, cols64, cmask, DT, scm, scd, sek, sed, BM, BN, BDT, UPT, PRECT, F64T)
        zs = s * acc_s.to(ET)
        zt = t * acc_t.to(ET)
        q = tl.exp((zs - hs[:, None]) - ls[:, None])
        p = tl.exp((zt - ht[:, None]) - lt[:, None])
        G = tl.where(valid, q - p, 0.0)
        dsc += tl.sum(G * acc_s.to(ET), axis=1)
        Gd = lowp(G.to(tl.float32), a_ptr.dtype.element_ty, UPS)  # under UPS rounded on the bits (see lowp)
        _grad_rows(Gd, a_ptr, b_ptr, da_ptr, db_ptr, rows64, rmask, cols64, cmask, D, sam, sad, sbk, sbd, gs, n0,
                   BD, UPS, PRECS)
        if TEACHER:
            H = tl.where(valid, -p * ((zs - hm[:, None]) - lm[:, None]), 0.0)
            dtc += tl.sum(H * acc_t.to(ET), axis=1)
            Hd = lowp(H.to(tl.float32), c_ptr.dtype.element_ty, UPT)
            _grad_rows(Hd, c_ptr, e_ptr, dc_ptr, de_ptr, rows64, rmask, cols64, cmask, DT, scm, scd, sek, sed, gt,
                       n0, BDT, UPT, PRECT)
    tl.store(ds_ptr + pid, g * tl.sum(dsc, axis=0).to(tl.float32))
    if TEACHER:
        tl.store(dt_ptr + pid, g * tl.sum(dtc, axis=0).to(tl.float32))


# --------------------------------------------------------------------------- host side
def _cfg(a: torch.Tensor, c: torch.Tensor, M: int, K: int, phase: str) -> dict:
    """Block sizes. Two S-sized tiles live at once (student and teacher), so the GPU tiles are the
    contrastive kernels' backward ones; the interpreter gets few, numpy-sized tiles."""
    if _INTERPRET:
        bm = bn = 32 if max(M, K) <= 128 else 64
        bd, warps, stages = 128, 4, 1
    elif torch.float32 in (a.dtype, c.dtype):
        bm, bn, bd, warps, stages = 64, 64, 16, 8, 2
    else:
        bm, bn, bd, warps, stages = (128, 64, 64, 8, 3) if phase == "fwd" else (128, 64, 32, 8, 2)
    D, DT = a.shape[1], c.shape[1]
    return {
        "BM": min(bm, max(16, next_pow2(M))), "BN": min(bn, max(16, next_pow2(K))),
        "BD": min(bd, max(16, next_pow2(D))), "BDT": min(bd, max(16, next_pow2(DT))),
        "num_warps": warps, "num_stages": stages,
    }


def _flags(a, c) -> dict:
    return {
        "UPS": _INTERPRET and a.dtype == torch.bfloat16, "UPT": _INTERPRET and c.dtype == torch.bfloat16,
        "PRECS": "ieee", "PRECT": "ieee", "EXACT": torch.float32 in (a.dtype, c.dtype),
        "F64S": a.dtype == torch.float32, "F64T": c.dtype == torch.float32,
    }


def _out(shape, device, dtype=torch.float32, zero=False):
    if zero:
        return torch.zeros(shape, device=device, dtype=dtype)
    t = torch.empty(shape, device=device, dtype=dtype)
    return poison_(t) if POISON_OUTPUTS else t


def _strides(a, b, c, e):
    return (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), e.stride(0), e.stride(1))


def distill_fwd(a, b, scale, c, e, tscale):
    """-> (row-term sum fp64 0-d, lse_s fp64 (M,), lse_t fp64 (M,), mu fp64 (M,))."""
    M, K = a.shape[0], b.shape[0]
    cfg = _cfg(a, c, M, K, "fwd")
    dev = a.device
    row = _out((M,), dev, torch.float64)
    lse_s, lse_t, mu = (_out((M,), dev, torch.float64) for _ in range(3))
    _fwd_kernel[(cdiv(M, cfg["BM"]),)](
        a, b, c, e, scale, tscale, row, lse_s, lse_t, mu, M, K, a.shape[1], c.shape[1], *_strides(a, b, c, e),
        **_flags(a, c), **cfg,
    )
    return row.sum(), lse_s, lse_t, mu


def distill_bwd(a, b, scale, c, e, tscale, lse_s, lse_t, mu, grad, teacher):
    """-> (da, db, dscale, dc, de, dtscale); the last three None unless ``teacher``."""
    M, K = a.shape[0], b.shape[0]
    D, DT = a.shape[1], c.shape[1]
    cfg = _cfg(a, c, M, K, "bwd")
    R = cdiv(M, cfg["BM"])
    dev = a.device
    grad = grad.detach().float().reshape(()).contiguous()
    da, db = _out((M, D), dev), _out((K, D), dev, zero=True)
    ds = _out((R,), dev)
    if teacher:
        dc, de, dt = _out((M, DT), dev), _out((K, DT), dev, zero=True), _out((R,), dev)
    else:
        dc, de, dt = da, db, ds  # never touched
    _bwd_kernel[(R,)](
        a, b, c, e, scale, tscale, grad, lse_s, lse_t, mu, da, db, dc, de, ds, dt,
        M, K, D, DT, *_strides(a, b, c, e), TEACHER=bool(teacher), **_flags(a, c), **cfg,
    )
    out_s = (da.to(a.dtype), db.to(b.dtype), ds.sum(dtype=torch.float64).float())
    if not teacher:
        return (*out_s, None, None, None)
    return (*out_s, dc.to(c.dtype), de.to(e.dtype), dt.sum(dtype=torch.float64).float())
