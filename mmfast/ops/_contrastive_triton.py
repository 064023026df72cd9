"""Triton kernels for the fused contrastive losses; the backend contract is in ``contrastive.py``.

Problem: ``a`` (M, d), ``b`` (K, d), ``z_ij = s · a_i·b_j + β``, positives at (i, i+offset). No
kernel stores the (M, K) logits: every S tile ``a_blk @ b_blkᵀ`` is built in registers, with ``d``
walked in chunks of ``BD`` (masked, so any d works) and fp32 accumulation.

Forward (CLIP). Grid: one program per block of ``BM`` rows; it walks all column blocks once,
keeping the online row log-sum-exp, the positive logit and the row sum of z (label smoothing).
For the symmetric loss it also writes, per (row block, column), the column max and Σexp over its
rows (and the column sum of z when ε > 0); ``_col_kernel`` folds those partials into the exact
column lse. One pass over S. Extra memory: ``(2 + [ε>0]) · ⌈M/BM⌉ · K`` partials (fp32, or fp64
for fp32 inputs) plus O(M + K) vectors: N = 65536, BM = 128, bf16 → 256 MiB (fp32 logits: 16 GiB).
SigLIP needs no column pass: each program writes its rows' Σ softplus.

Backward. Same grid; each program recomputes its S tiles and the logit gradient
``G = ∂loss/∂z`` (CLIP rows: softmax − (1−ε)·onehot − ε/K, plus the column counterpart when
symmetric; SigLIP: −y·σ(−y z)), then per d chunk adds ``g·s·G @ b_blk`` to its own rows of an
fp32 ``da`` buffer (read-modify-write, no other program touches them) and atomically adds
``g·s·Gᵀ @ a_blk`` into an fp32 ``db`` buffer (M + K)·d·4 bytes. ``dscale = g·Σ G⊙(a bᵀ)`` and
(SigLIP) ``dbias = g·Σ G`` are per-program partials summed by torch (no host sync). CLIP's
``dbias`` is exactly 0: every CE row (and column) is invariant to a shared shift.

FLOPs: forward 2·M·K·d, backward 6·M·K·d (S recompute, da, db): 8·N²·d for fwd+bwd, the minimum
for a scheme that never stores S. The fp32 atomics make ``db`` non-deterministic in the last bits;
``MMFAST_CONTRASTIVE_BWD=split`` (or ``torch.use_deterministic_algorithms(True)``) instead runs the
kernel a second time on the transposed problem for db (no atomics, 8·M·K·d backward, 10·N²·d in all).

Precision.
* GEMMs: fp32 inputs use ``input_precision="ieee"`` (no tf32) unless
  ``MMFAST_CONTRASTIVE_FP32_PRECISION=tf32``; bf16/fp16 inputs use the native MMA with fp32
  accumulation, and G is rounded to the input dtype before its two GEMMs (as flash attention does
  with P). Under ``TRITON_INTERPRET=1`` bf16 operands are upcast to fp32 before ``tl.dot``
  (the interpreter multiplies raw bf16 bits).
* Elementwise math (z, exp, softplus, the running sums) runs in ``ET``: fp64 for fp32 inputs
  (``EXACT``), fp32 otherwise. In fp32, rounding z = s·S + β, the few-ulp hardware/numpy exp and
  per-row sums put biased errors into reductions such as dscale that PyTorch's fp32 path does not
  have; fp64 costs a few % next to the ieee fp32 dot's 2·d FMAs per logit.
* lse is stored in fp64 (m + log l); the backward splits it into hi + lo in ET so ``z − hi`` is
  exact near the max, and the per-row loss is ``(1−ε)(m − z⁺) + ε(m − z̄) + log l`` (the large max
  cancels before the small log-sum is added, as in PyTorch's log-softmax; exactly 0 for K = 1).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2
from mmfast.ops._triton_util import block as _block
from mmfast.ops._triton_util import dot_tile as _s_tile
from mmfast.ops._triton_util import lowp, lse_split
from mmfast.ops._triton_util import sigmoid as _sigmoid
from mmfast.ops._triton_util import softplus as _softplus
from mmfast.utils.debug import poison_

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill every kernel output with NaN before launch: an element a kernel fails to
# write then shows up as a non-finite loss or gradient.
POISON_OUTPUTS = False

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for masked logits: keeps exp(m_old - m_new) free of NaN


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _logits(acc, s, beta, EXACT: tl.constexpr):
    """z = s·S + β in the elementwise dtype: fp64 when EXACT (fp32 inputs), else fp32."""
    if EXACT:
        z = s * acc.to(tl.float64) + beta
    else:
        z = s * acc + beta
    return z


@triton.jit
def _z_tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, stride_am, stride_ad, stride_bk, stride_bd, s, beta,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
            EXACT: tl.constexpr, SWAP: tl.constexpr):
    """One (BM, BN) tile: S = a_rows · b_colsᵀ and z = s·S + β (:func:`_logits`), returned as (S, z). SWAP
    (the split backward's launch on the transposed problem): S is computed as (b_cols · a_rowsᵀ)ᵀ, in the
    orientation the forward used for those logits (see :func:`_bwd_kernel`)."""
    if SWAP:
        acc = tl.trans(_s_tile(b_ptr, a_ptr, cols64, cmask, rows64, rmask, D, stride_bk, stride_bd,
                               stride_am, stride_ad, BN, BM, BD, UPCAST, PRECISION, False))
    else:
        acc = _s_tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, stride_am, stride_ad,
                      stride_bk, stride_bd, BM, BN, BD, UPCAST, PRECISION, False)
    return acc, _logits(acc, s, beta, EXACT)


@triton.jit
def ce_logit_grad(z, hit, hi, lo, smooth, n):
    """∂CE/∂z of one side (softmax over ``n`` logits, hi/lo from :func:`lse_split`, broadcast to z):
    softmax − (1−ε)·onehot − ε/n, grouped as (1−ε)(p − onehot) + ε(p − 1/n) so that a softmax that is
    exactly one-hot gives an exactly zero gradient."""
    p = tl.exp((z - hi) - lo)
    return (1.0 - smooth) * (p - hit) + smooth * (p - 1.0 / n)


# --------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["M", "K", "offset", "smooth"])  # one compile per dtype/flags
def _fwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr,
    row_out_ptr, lse_row_ptr, zpos_ptr,  # (M,) fp32, fp64, fp64
    pm_ptr, pl_ptr, pc_ptr,  # (R, K) partial column max / Σexp / Σz in ET; SYMMETRIC only
    M, K, D, offset, smooth,
    stride_am, stride_ad, stride_bk, stride_bd,
    HAS_BIAS: tl.constexpr, SIGLIP: tl.constexpr, SYMMETRIC: tl.constexpr, SMOOTH: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, EXACT: tl.constexpr,
):
    """Per row i: CLIP  row_out = lse_j z_ij − (1−ε) z_i,i+off − (ε/K) Σ_j z_ij;
                  SigLIP row_out = Σ_j softplus(−y_ij z_ij).   z_ij = s·a_i·b_j + β."""
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    pid = tl.program_id(0)
    rows, rmask, rows64 = _block(pid * BM, M, BM)
    s = tl.load(scale_ptr).to(ET)
    beta = tl.load(bias_ptr).to(ET) if HAS_BIAS else 0.0  # a literal takes the dtype of what it is added to
    m_i = tl.full((BM,), _NEG, dtype=ET)
    l_i = tl.zeros((BM,), dtype=ET)
    zpos = tl.zeros((BM,), dtype=ET)
    zsum = tl.zeros((BM,), dtype=ET)
    sp = tl.zeros((BM,), dtype=ET)
    for n0 in range(0, K, BN):
        cols, cmask, cols64 = _block(n0, K, BN)
        _, z = _z_tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, stride_am, stride_ad, stride_bk, stride_bd,
                       s, beta, BM, BN, BD, UPCAST, PRECISION, EXACT, False)  # (BM, BN)
        valid = rmask[:, None] & cmask[None, :]
        pos = cols[None, :] == rows[:, None] + offset
        if SIGLIP:
            sp += tl.sum(tl.where(valid, _softplus(tl.where(pos, -z, z)), 0.0), axis=1)
        else:
            zr = tl.where(cmask[None, :], z, _NEG)
            m_new = tl.maximum(m_i, tl.max(zr, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zr - m_new[:, None]), axis=1)
            m_i = m_new
            zpos += tl.sum(tl.where(pos & valid, z, 0.0), axis=1)
            if SMOOTH:
                zsum += tl.sum(tl.where(valid, z, 0.0), axis=1)
            if SYMMETRIC:
                zc = tl.where(rmask[:, None], z, _NEG)
                mc = tl.max(zc, axis=0)  # (BN,)
                lc = tl.sum(tl.exp(zc - mc[None, :]), axis=0)
                part = pid.to(tl.int64) * K + cols
                tl.store(pm_ptr + part, mc.to(ET), mask=cmask)
                tl.store(pl_ptr + part, lc.to(ET), mask=cmask)
                if SMOOTH:
                    tl.store(pc_ptr + part, tl.sum(tl.where(valid, z, 0.0), axis=0), mask=cmask)
    if SIGLIP:
        tl.store(row_out_ptr + rows, sp.to(tl.float32), mask=rmask)
    else:
        log_l = tl.log(l_i.to(tl.float64))  # (BM,) O(M) work: fp64 costs nothing here
        tl.store(lse_row_ptr + rows, m_i.to(tl.float64) + log_l, mask=rmask)
        tl.store(zpos_ptr + rows, zpos.to(tl.float64), mask=rmask)
        # (1−ε)(m − z⁺) + ε(m − z̄) + log l: as PyTorch's log-softmax, the large max cancels
        # against the logits before the small log-sum is added (exact 0 when K = 1).
        row = (1.0 - smooth) * (m_i - zpos) + smooth * (m_i - zsum / K) + log_l.to(ET)
        tl.store(row_out_ptr + rows, row.to(tl.float32), mask=rmask)


@triton.jit
def fold_col_partials(m, l, zsum, pm_ptr, pl_ptr, pc_ptr, R, K, cols, cmask, SMOOTH: tl.constexpr):
    """Fold R rows of (R, K) column partials (max, Σexp(z − max), Σz) into the fp64 running (m, l, Σz)."""
    for r in range(R):
        part = r * K + cols.to(tl.int64)
        pm = tl.load(pm_ptr + part, mask=cmask, other=_NEG).to(tl.float64)
        pl = tl.load(pl_ptr + part, mask=cmask, other=0.0).to(tl.float64)
        m_new = tl.maximum(m, pm)
        l = l * tl.exp(m - m_new) + pl * tl.exp(pm - m_new)
        m = m_new
        if SMOOTH:
            zsum += tl.load(pc_ptr + part, mask=cmask, other=0.0).to(tl.float64)
    return m, l, zsum


@triton.jit(do_not_specialize=["R", "M", "K", "smooth"])
def _col_kernel(pm_ptr, pl_ptr, pc_ptr, zpos_ptr, lse_col_ptr, col_out_ptr, R, M, K, smooth,
                SMOOTH: tl.constexpr, BN: tl.constexpr):
    """Column j (square, offset 0): lse_j = m_j + log Σ_r pl[r,j]·exp(pm[r,j] − m_j), in fp64;
    col_out_j = (1−ε)(m_j − z_jj) + ε(m_j − Σ_r pc[r,j] / M) + (lse_j − m_j)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < K
    m = tl.full((BN,), _NEG, dtype=tl.float64)
    l = tl.zeros((BN,), dtype=tl.float64)
    zsum = tl.zeros((BN,), dtype=tl.float64)
    m, l, zsum = fold_col_partials(m, l, zsum, pm_ptr, pl_ptr, pc_ptr, R, K, cols, cmask, SMOOTH)
    log_l = tl.log(tl.where(cmask, l, 1.0))
    zpos = tl.load(zpos_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    tl.store(lse_col_ptr + cols, m + log_l, mask=cmask)
    col = (1.0 - smooth) * (m - zpos) + smooth * (m - zsum / M) + log_l
    tl.store(col_out_ptr + cols, col.to(tl.float32), mask=cmask)


@triton.jit(do_not_specialize=["M", "K", "offset", "smooth"])  # one compile per dtype/flags
def _bwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, grad_ptr, lse_row_ptr, lse_col_ptr,
    da_ptr, db_ptr,  # fp32 (M, D) written here; fp32 (K, D) zero-filled, atomics
    dscale_ptr, dbias_ptr,  # (R,) fp32 per-program partials
    M, K, D, offset, smooth,
    stride_am, stride_ad, stride_bk, stride_bd,
    HAS_BIAS: tl.constexpr, SIGLIP: tl.constexpr, ROW_CE: tl.constexpr, COL_CE: tl.constexpr,
    DB: tl.constexpr, SWAP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, EXACT: tl.constexpr,
):
    """G = ∂loss/∂z per tile; da_rows = g·s·Σ_tiles G b, db += g·s·Gᵀ a (DB), dscale = g·Σ G⊙(a·b).
    CLIP's G sums the row CE term (ROW_CE, lse over columns) and the column CE term (COL_CE, lse
    over rows); the split backward runs this kernel a second time on the transposed problem, with
    SWAP: each S tile is then computed in the forward's orientation (a_cols · b_rowsᵀ, transposed).
    A GEMM in the other orientation may sum in another order (numpy's BLAS under the interpreter
    does), and a 1-ulp change of S, times a logit scale of up to 100, moves exp(z − lse) against the
    forward's lse by enough to break the error bound (d_text 4.3e-5 vs 6.0e-6 for PyTorch's fp32)."""
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    pid = tl.program_id(0)
    rows, rmask, rows64 = _block(pid * BM, M, BM)
    s = tl.load(scale_ptr).to(ET)
    beta = tl.load(bias_ptr).to(ET) if HAS_BIAS else 0.0  # a literal takes the dtype of what it is added to
    g = tl.load(grad_ptr).to(tl.float32)
    gs = g * tl.load(scale_ptr).to(tl.float32)
    if ROW_CE:
        hi_i, lo_i = lse_split(tl.load(lse_row_ptr + rows, mask=rmask, other=0.0), ET)
    dsc = tl.zeros((BM,), dtype=ET)
    dbi = tl.zeros((BM,), dtype=ET)
    for n0 in range(0, K, BN):
        cols, cmask, cols64 = _block(n0, K, BN)
        acc, z = _z_tile(a_ptr, b_ptr, rows64, rmask, cols64, cmask, D, stride_am, stride_ad, stride_bk, stride_bd,
                         s, beta, BM, BN, BD, UPCAST, PRECISION, EXACT, SWAP)  # (BM, BN)
        valid = rmask[:, None] & cmask[None, :]
        pos = cols[None, :] == rows[:, None] + offset
        if SIGLIP:
            sg = _sigmoid(tl.where(pos, -z, z))
            G = tl.where(pos, -sg, sg)
            dbi += tl.sum(tl.where(valid, G, 0.0), axis=1)
        else:
            hit = tl.where(pos, 1.0, 0.0)
            G = tl.zeros((BM, BN), dtype=ET)
            if ROW_CE:
                G += ce_logit_grad(z, hit, hi_i[:, None], lo_i[:, None], smooth, K)
            if COL_CE:
                hi_j, lo_j = lse_split(tl.load(lse_col_ptr + cols, mask=cmask, other=0.0), ET)
                G += ce_logit_grad(z, hit, hi_j[None, :], lo_j[None, :], smooth, M)
        G = tl.where(valid, G, 0.0)
        if EXACT:
            dsc += tl.sum(G * acc.to(tl.float64), axis=1)
        else:
            dsc += tl.sum(G * acc, axis=1)
        # the GEMM operand, rounded to the input dtype (under UPCAST to nearest even on the bits: the
        # interpreter's own bf16 conversion truncates)
        Gd = lowp(G.to(tl.float32), a_ptr.dtype.element_ty, UPCAST)
        # This program alone owns its rows of da, but the threads that stored a chunk in the previous
        # column block need not be the ones that load it now: barriers order those global accesses
        # (one here, ahead of any load the pipeliner may hoist into the loop prologue, one per chunk).
        tl.debug_barrier()
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < D
            bt = tl.load(b_ptr + cols64[:, None] * stride_bk + ds[None, :] * stride_bd,
                         mask=cmask[:, None] & dmask[None, :], other=0.0)  # (BN, BD)
            at = tl.load(a_ptr + rows64[:, None] * stride_am + ds[None, :] * stride_ad,
                         mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BM, BD)
            if UPCAST:
                bt = bt.to(tl.float32)
                at = at.to(tl.float32)
            da_ptrs = da_ptr + rows64[:, None] * D + ds[None, :]
            da_mask = rmask[:, None] & dmask[None, :]
            tl.debug_barrier()
            da_old = tl.load(da_ptrs, mask=da_mask & (n0 > 0), other=0.0)
            da_new = da_old + gs * tl.dot(Gd, bt, input_precision=PRECISION)
            tl.store(da_ptrs, da_new, mask=da_mask)
            if DB:
                db_part = gs * tl.dot(tl.trans(Gd), at, input_precision=PRECISION)  # (BN, BD)
                # relaxed: only the sums after the kernel matter, no ordering with other memory
                tl.atomic_add(db_ptr + cols64[:, None] * D + ds[None, :], db_part,
                              mask=cmask[:, None] & dmask[None, :], sem="relaxed")
    tl.store(dscale_ptr + pid, g * tl.sum(dsc, axis=0).to(tl.float32))
    if SIGLIP:
        tl.store(dbias_ptr + pid, g * tl.sum(dbi, axis=0).to(tl.float32))


# --------------------------------------------------------------------------- host side
def _cfg(a: torch.Tensor, M: int, K: int, D: int, phase: str) -> dict:
    """Block sizes (BM rows × BN columns per S tile, d in BD chunks). H100/H200 choices are the
    largest tiles that compile for sm_90 with no register spills (cuobjdump -res-usage, triton 3.8):
    16-bit fwd 128×64×64 / bwd 128×64×32, 8 warps; fp32 (ieee dots, fp64 elementwise) 64×64×16,
    8 warps. BM = 128 keeps the column partials (∝ 1/BM) and the db atomics (∝ 1/BM) small.
    The interpreter gets few, numpy-sized tiles (its cost is per op, not per element)."""
    if _INTERPRET:
        bm = bn = 32 if max(M, K) <= 128 else 64
        bd, warps, stages = 128, 4, 1
    elif a.dtype == torch.float32:
        bm, bn, bd, warps, stages = 64, 64, 16, 8, 2
    elif phase == "fwd":
        bm, bn, bd, warps, stages = 128, 64, 64, 8, 3
    else:
        bm, bn, bd, warps, stages = 128, 64, 32, 8, 2
    # tl.dot needs every dimension >= 16; smaller problems get smaller (power-of-two) blocks.
    bm = min(bm, max(16, next_pow2(M)))
    bn = min(bn, max(16, next_pow2(K)))
    bd = min(bd, max(16, next_pow2(D)))
    return {"BM": bm, "BN": bn, "BD": bd, "num_warps": warps, "num_stages": stages}


def _precision(a: torch.Tensor) -> str:
    if a.dtype == torch.float32:
        p = os.environ.get("MMFAST_CONTRASTIVE_FP32_PRECISION", "ieee")
        if p not in ("ieee", "tf32"):
            raise ValueError(f"MMFAST_CONTRASTIVE_FP32_PRECISION={p!r}; expected 'ieee' or 'tf32'")
        return "ieee" if _INTERPRET else p
    return "ieee"  # ignored for 16-bit operands: the MMA takes them as they are


def _flags(a: torch.Tensor) -> dict:
    return {"UPCAST": _INTERPRET and a.dtype == torch.bfloat16, "PRECISION": _precision(a),
            "EXACT": a.dtype == torch.float32}


def _out(shape, device, *, zero=False, dtype=torch.float32) -> torch.Tensor:
    if zero:  # accumulated with atomics: must start at 0
        return torch.zeros(shape, device=device, dtype=dtype)
    t = torch.empty(shape, device=device, dtype=dtype)
    return poison_(t) if POISON_OUTPUTS else t


def _strides(a: torch.Tensor, b: torch.Tensor) -> tuple:
    return (a.stride(0), a.stride(1), b.stride(0), b.stride(1))


def clip_fwd(a, b, scale, bias, label_smoothing, offset, symmetric):
    M, D = a.shape
    K = b.shape[0]
    cfg = _cfg(a, M, K, D, "fwd")
    R = cdiv(M, cfg["BM"])
    dev = a.device
    smooth = float(label_smoothing)
    row_out = _out((M,), dev)
    lse_row, zpos = _out((M,), dev, dtype=torch.float64), _out((M,), dev, dtype=torch.float64)
    if symmetric:
        et = torch.float64 if a.dtype == torch.float32 else torch.float32  # the kernels' ET
        pm, pl = _out((R, K), dev, dtype=et), _out((R, K), dev, dtype=et)
        pc = _out((R, K), dev, dtype=et) if smooth > 0 else pm
    else:
        pm = pl = pc = row_out  # never touched when SYMMETRIC is False
    _fwd_kernel[(R,)](
        a, b, scale, scale if bias is None else bias, row_out, lse_row, zpos, pm, pl, pc,
        M, K, D, int(offset), smooth, *_strides(a, b),
        HAS_BIAS=bias is not None, SIGLIP=False, SYMMETRIC=bool(symmetric), SMOOTH=smooth > 0,
        **_flags(a), **cfg,
    )
    loss = row_out.sum(dtype=torch.float64)  # O(M) terms: summing in fp64 is free
    lse_col = None
    if symmetric:
        lse_col, col_out = _out((K,), dev, dtype=torch.float64), _out((K,), dev)
        bn = 128 if not _INTERPRET else 32
        _col_kernel[(cdiv(K, bn),)](
            pm, pl, pc, zpos, lse_col, col_out, R, M, K, smooth, SMOOTH=smooth > 0, BN=bn
        )
        loss = loss + col_out.sum(dtype=torch.float64)
    return loss.float(), lse_row, lse_col


def _bwd_mode() -> str:
    """``fused`` (default): one pass, db by fp32 atomics, 6·M·K·d FLOPs, db bits vary run to run.
    ``split``: the kernel again on the transposed problem for db, 8·M·K·d FLOPs, deterministic;
    chosen by ``MMFAST_CONTRASTIVE_BWD=split`` or ``torch.use_deterministic_algorithms(True)``."""
    mode = os.environ.get("MMFAST_CONTRASTIVE_BWD", "")
    if mode not in ("", "fused", "split"):
        raise ValueError(f"MMFAST_CONTRASTIVE_BWD={mode!r}; expected 'fused' or 'split'")
    return mode or ("split" if torch.are_deterministic_algorithms_enabled() else "fused")


def _launch_bwd(a, b, scale, bias, grad, lse_row, lse_col, smooth, offset, row_ce, col_ce, siglip, db,
                swap=False):
    """One backward launch over rows of ``a``; returns (da fp32, dscale partials, dbias partials).
    ``swap``: ``a``, ``b`` are the forward's ``b``, ``a`` (the split backward's second launch)."""
    M, D = a.shape
    K = b.shape[0]
    cfg = _cfg(a, M, K, D, "bwd")
    R = cdiv(M, cfg["BM"])
    dev = a.device
    da = _out((M, D), dev)
    dscale_part = _out((R,), dev)
    dbias_part = _out((R,), dev) if siglip else dscale_part
    _bwd_kernel[(R,)](
        a, b, scale, scale if bias is None else bias, grad,
        scale if lse_row is None else lse_row, scale if lse_col is None else lse_col,
        da, da if db is None else db, dscale_part, dbias_part,
        M, K, D, int(offset), float(smooth), *_strides(a, b),
        HAS_BIAS=bias is not None, SIGLIP=siglip, ROW_CE=row_ce, COL_CE=col_ce, DB=db is not None,
        SWAP=swap, **_flags(a), **cfg,
    )
    return da, dscale_part, dbias_part


def _bwd(a, b, scale, bias, grad, lse_row, lse_col, smooth, offset, symmetric, siglip):
    grad = grad.detach().float().reshape(()).contiguous()
    row_ce, col_ce = not siglip, bool(symmetric)
    if _bwd_mode() == "fused":
        db = _out((b.shape[0], b.shape[1]), a.device, zero=True)
        da, dscale_part, dbias_part = _launch_bwd(
            a, b, scale, bias, grad, lse_row, lse_col, smooth, offset, row_ce, col_ce, siglip, db
        )
    else:
        da, dscale_part, dbias_part = _launch_bwd(
            a, b, scale, bias, grad, lse_row, lse_col, smooth, offset, row_ce, col_ce, siglip, None
        )
        # Transposed: rows are b's, the positive of row j is column j − offset, the roles of the
        # row and column CE terms (and of their lse vectors) swap. Its dscale partials repeat ours.
        db, _, _ = _launch_bwd(
            b, a, scale, bias, grad, lse_col, lse_row, smooth, -offset, col_ce, row_ce, siglip, None, swap=True
        )
    dscale = dscale_part.sum(dtype=torch.float64).float()
    if siglip:
        dbias = dbias_part.sum(dtype=torch.float64).float()
    elif bias is not None:
        dbias = torch.zeros((), device=a.device, dtype=torch.float32)  # CE is shift-invariant
    else:
        dbias = None
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias


def clip_bwd(a, b, scale, bias, label_smoothing, offset, symmetric, lse_row, lse_col, grad):
    return _bwd(a, b, scale, bias, grad, lse_row, lse_col, label_smoothing, offset, symmetric, False)


def siglip_fwd(a, b, scale, bias, offset):
    M, D = a.shape
    K = b.shape[0]
    cfg = _cfg(a, M, K, D, "fwd")
    R = cdiv(M, cfg["BM"])
    row_out = _out((M,), a.device)
    _fwd_kernel[(R,)](
        a, b, scale, bias, row_out, row_out, row_out, row_out, row_out, row_out,
        M, K, D, int(offset), 0.0, *_strides(a, b),
        HAS_BIAS=True, SIGLIP=True, SYMMETRIC=False, SMOOTH=False, **_flags(a), **cfg,
    )
    return row_out.sum(dtype=torch.float64).float()


def siglip_bwd(a, b, scale, bias, offset, grad):
    return _bwd(a, b, scale, bias, grad, None, None, 0.0, offset, False, True)


def extra_memory_bytes(M: int, K: int, D: int, symmetric: bool, label_smoothing: float, dtype) -> dict:
    """Scratch the kernels allocate beyond O(M + K) vectors, for the docs and the benchmark."""
    bm_f = _cfg(torch.empty(0, dtype=dtype), M, K, D, "fwd")["BM"]
    et_bytes = 8 if dtype == torch.float32 else 4  # partials are kept in the elementwise dtype
    fwd = (2 + (label_smoothing > 0)) * cdiv(M, bm_f) * K * et_bytes if symmetric else 0
    bwd = (M + K) * D * 4  # fp32 da / db accumulators
    return {"fwd": fwd, "bwd": bwd}
