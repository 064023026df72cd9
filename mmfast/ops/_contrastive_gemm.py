"""The ``gemm`` backends of the contrastive losses: row chunks through vendor GEMMs, with one Triton
kernel per chunk for the softmax stage. The contract (sums, not means) is in ``contrastive.py``.

Why. The fused kernels (``_contrastive_triton.py``) keep every S tile in registers, which suits a
head dim ≤ 256; CLIP's d = 768-1152 does not fit a program's accumulator, so their backward spends
its time re-reading and re-writing fp32 ``da`` rows and adding ``db`` tiles atomically (issue #21).
Here the GEMMs go to cuBLAS (bf16/fp16 in, fp32 accumulate) and the kernels only do what a GEMM
cannot: the per-element softmax.

Problem: ``a`` (M, d), ``b`` (K, d), ``z_ij = s·S_ij + β`` with ``S = a bᵀ``; positives at (i, i+offset).
The rows are taken ``C`` at a time (a chunk, rows ``r0 … r0+C−1``), C from a memory budget:

forward, per chunk
    ``S_c = a_c bᵀ`` (C, K) in fp32 (``torch.mm(..., out_dtype=float32)``: bf16 products, fp32 sums);
    ``_fwd_tiles`` over (C/BM × K/BN) tiles writes, per tile, the row partials (max, Σexp, Σz over
    the tile's columns), each row's positive logit, and for the symmetric loss the column partials
    (max, Σexp, Σz over the tile's rows); SigLIP: the tile's Σ softplus(−y z). Torch folds the
    partials: the chunk's row log-sum-exp and row losses, and the running column log-sum-exp.
backward, per chunk (the same chunks, so ``S_c`` has the forward's bits)
    ``S_c`` again; ``_bwd_tiles`` turns it into ``G'_c = g·s·∂loss/∂z`` in the input dtype (CLIP:
    row softmax + column softmax − targets − smoothing; SigLIP: −y·σ(−y z)) and per-tile partials of
    ``Σ G⊙S`` (dscale) and ``Σ G`` (SigLIP's dbias); then ``da_c = G'_c b`` (complete: the chunk
    spans every column) and ``db += G'_cᵀ a_c`` (fp32 accumulation across chunks), both by cuBLAS.

FLOPs 2·M·K·d forward, 6·M·K·d backward: 8·N²·d for a training step, all of it in GEMMs. No atomics:
deterministic, bitwise equal run to run on one device. Extra memory: the chunk's ``S_c`` (fp32) and
``G'_c`` (input dtype) and the partials, at most ``MMFAST_CONTRASTIVE_CHUNK_MB`` MiB (default 256;
:func:`chunk_rows`), plus O((M + K)·d): the fp32 ``db`` accumulator when there is more than one
chunk. The N×N logits never exist.

Precision matches the fused kernels: elementwise math in ``ET`` (fp64 for fp32 inputs, fp32
otherwise), the row/column log-sum-exp kept in fp64 and split into hi + lo in the backward, the row
loss formed as ``(1−ε)(m − z⁺) + ε(m − z̄) + log l`` so the large max cancels before the small
log-sum is added. fp32 inputs' GEMMs follow torch's matmul precision (ieee unless the caller chose
``torch.set_float32_matmul_precision("high")``). Off CUDA (the interpreter's tests) a 16-bit GEMM
is emulated as the fp32 GEMM of the upcast operands, which is what cuBLAS computes: exact products,
fp32 sums.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmfast.ops._contrastive_triton import ce_logit_grad, fold_col_partials
from mmfast.ops._host import cdiv
from mmfast.ops._triton_util import lowp, lse_split
from mmfast.ops._triton_util import sigmoid as _sigmoid
from mmfast.ops._triton_util import softplus as _softplus
from mmfast.utils.debug import poison_

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill every kernel output with NaN before launch (as in _contrastive_triton).
POISON_OUTPUTS = False

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for masked logits
DEFAULT_CHUNK_MB = 256.0


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile(s_ptr, scale_ptr, bias_ptr, R, K, r0, offset,
          HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """This program's (BM, BN) tile of the chunk: raw S, z = s·S + β in ET, masks and the positives."""
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < R
    cmask = cols < K
    valid = rmask[:, None] & cmask[None, :]
    S = tl.load(s_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=valid, other=0.0)
    s = tl.load(scale_ptr).to(ET)
    if HAS_BIAS:
        z = s * S.to(ET) + tl.load(bias_ptr).to(ET)
    else:
        z = s * S.to(ET)
    pos = cols[None, :] == rows[:, None] + (r0 + offset)
    return S, z, rows, cols, rmask, cmask, valid, pos


@triton.jit(do_not_specialize=["R", "K", "r0", "offset", "NB"])
def _fwd_tiles(
    s_ptr, scale_ptr, bias_ptr,
    pm_ptr, pl_ptr, pz_ptr,  # (R, NB) row partials: max, Σexp(z − max), Σz (SMOOTH)
    zpos_ptr,  # (R,) each row's positive logit
    qm_ptr, ql_ptr, qz_ptr,  # (RB, K) column partials (SYMMETRIC)
    sp_ptr,  # (RB, NB) Σ softplus(−y z) per tile (SIGLIP)
    R, K, r0, offset, NB,
    HAS_BIAS: tl.constexpr, SIGLIP: tl.constexpr, SYMMETRIC: tl.constexpr, SMOOTH: tl.constexpr,
    EXACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    _S, z, rows, cols, rmask, cmask, valid, pos = _tile(s_ptr, scale_ptr, bias_ptr, R, K, r0, offset,
                                                       HAS_BIAS, EXACT, BM, BN)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SIGLIP:
        sp = tl.sum(tl.sum(tl.where(valid, _softplus(tl.where(pos, -z, z)), 0.0), axis=1), axis=0)
        tl.store(sp_ptr + pid_m * NB + pid_n, sp)
    else:
        part = rows.to(tl.int64) * NB + pid_n
        zr = tl.where(cmask[None, :], z, _NEG)
        m = tl.max(zr, axis=1)
        tl.store(pm_ptr + part, m, mask=rmask)
        tl.store(pl_ptr + part, tl.sum(tl.exp(zr - m[:, None]), axis=1), mask=rmask)
        if SMOOTH:
            tl.store(pz_ptr + part, tl.sum(tl.where(valid, z, 0.0), axis=1), mask=rmask)
        # the one tile holding a row's positive column writes it
        target = rows + (r0 + offset)
        mine = rmask & (target >= pid_n * BN) & (target < pid_n * BN + BN)
        tl.store(zpos_ptr + rows, tl.sum(tl.where(pos & valid, z, 0.0), axis=1), mask=mine)
        if SYMMETRIC:
            cpart = pid_m.to(tl.int64) * K + cols
            zc = tl.where(rmask[:, None], z, _NEG)
            mc = tl.max(zc, axis=0)
            tl.store(qm_ptr + cpart, mc, mask=cmask)
            tl.store(ql_ptr + cpart, tl.sum(tl.exp(zc - mc[None, :]), axis=0), mask=cmask)
            if SMOOTH:
                tl.store(qz_ptr + cpart, tl.sum(tl.where(valid, z, 0.0), axis=0), mask=cmask)


@triton.jit(do_not_specialize=["R", "K", "NB", "smooth"])
def _fold_rows(pm_ptr, pl_ptr, pz_ptr, zpos_ptr, lse_ptr, loss_ptr, R, K, NB, smooth,
               SMOOTH: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr):
    """The chunk's rows from their (R, NB) partials, in fp64: lse = m + log l and the row loss
    (1−ε)(m − z⁺) + ε(m − z̄) + log l (the large max cancels before the small log-sum is added).
    ``zpos``/``lse``/``loss`` point at the chunk's first row."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    m = tl.full((BR,), _NEG, dtype=tl.float64)
    l = tl.zeros((BR,), dtype=tl.float64)
    zs = tl.zeros((BR,), dtype=tl.float64)
    for j0 in range(0, NB, BJ):
        js = j0 + tl.arange(0, BJ)
        mask = rmask[:, None] & (js < NB)[None, :]
        part = rows.to(tl.int64)[:, None] * NB + js[None, :]
        pm = tl.load(pm_ptr + part, mask=mask, other=_NEG).to(tl.float64)
        pl = tl.load(pl_ptr + part, mask=mask, other=0.0).to(tl.float64)
        m_new = tl.maximum(m, tl.max(pm, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(pl * tl.exp(pm - m_new[:, None]), axis=1)
        m = m_new
        if SMOOTH:
            zs += tl.sum(tl.load(pz_ptr + part, mask=mask, other=0.0).to(tl.float64), axis=1)
    log_l = tl.log(tl.where(rmask, l, 1.0))
    zpos = tl.load(zpos_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    tl.store(lse_ptr + rows, m + log_l, mask=rmask)
    if SMOOTH:
        row = (1.0 - smooth) * (m - zpos) + smooth * (m - zs / K) + log_l
    else:
        row = (m - zpos) + log_l
    tl.store(loss_ptr + rows, row, mask=rmask)


@triton.jit(do_not_specialize=["RB", "K"])
def _merge_cols(qm_ptr, ql_ptr, qz_ptr, cm_ptr, cl_ptr, cz_ptr, RB, K,
                SMOOTH: tl.constexpr, BC: tl.constexpr):
    """Fold the chunk's (RB, K) column partials into the running fp64 column max / Σexp / Σz."""
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = cols < K
    m = tl.load(cm_ptr + cols, mask=cmask, other=0.0)
    l = tl.load(cl_ptr + cols, mask=cmask, other=0.0)
    zs = tl.zeros((BC,), dtype=tl.float64)
    m, l, zs = fold_col_partials(m, l, zs, qm_ptr, ql_ptr, qz_ptr, RB, K, cols, cmask, SMOOTH)
    tl.store(cm_ptr + cols, m, mask=cmask)
    tl.store(cl_ptr + cols, l, mask=cmask)
    if SMOOTH:
        tl.store(cz_ptr + cols, tl.load(cz_ptr + cols, mask=cmask, other=0.0) + zs, mask=cmask)


@triton.jit(do_not_specialize=["R", "K", "M", "r0", "offset", "smooth", "NB"])
def _bwd_tiles(
    s_ptr, g_ptr,  # (R, K) fp32 S in, (R, K) G' out in the input dtype
    scale_ptr, bias_ptr, grad_ptr, lse_row_ptr, lse_col_ptr,  # lse: fp64, global rows / columns
    dsc_ptr, dbi_ptr,  # (RB, NB) per-tile Σ G⊙S and Σ G, in ET
    R, K, M, r0, offset, smooth, NB,
    HAS_BIAS: tl.constexpr, SIGLIP: tl.constexpr, ROW_CE: tl.constexpr, COL_CE: tl.constexpr,
    EXACT: tl.constexpr, RTNE_BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """G = ∂loss/∂z on the tile; G' = g·s·G rounded to the input dtype once, the GEMM operand."""
    ET: tl.constexpr = tl.float64 if EXACT else tl.float32
    S, z, rows, cols, rmask, cmask, valid, pos = _tile(s_ptr, scale_ptr, bias_ptr, R, K, r0, offset,
                                                       HAS_BIAS, EXACT, BM, BN)
    if SIGLIP:
        sg = _sigmoid(tl.where(pos, -z, z))
        G = tl.where(pos, -sg, sg)
    else:
        hit = tl.where(pos, 1.0, 0.0)
        G = tl.zeros((BM, BN), dtype=ET)
        if ROW_CE:
            hi_i, lo_i = lse_split(tl.load(lse_row_ptr + r0 + rows, mask=rmask, other=0.0), ET)
            G += ce_logit_grad(z, hit, hi_i[:, None], lo_i[:, None], smooth, K)
        if COL_CE:
            hi_j, lo_j = lse_split(tl.load(lse_col_ptr + cols, mask=cmask, other=0.0), ET)
            G += ce_logit_grad(z, hit, hi_j[None, :], lo_j[None, :], smooth, M)
    G = tl.where(valid, G, 0.0)
    tile = tl.program_id(0) * NB + tl.program_id(1)
    tl.store(dsc_ptr + tile, tl.sum(tl.sum(G * S.to(ET), axis=1), axis=0))
    if SIGLIP:
        tl.store(dbi_ptr + tile, tl.sum(tl.sum(G, axis=1), axis=0))
    gs = tl.load(grad_ptr).to(ET) * tl.load(scale_ptr).to(ET)
    out = g_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    # one rounding to nearest even (under the interpreter done on the bits: its bf16 conversion truncates)
    Gd = lowp((gs * G).to(tl.float32), g_ptr.dtype.element_ty, RTNE_BITS)
    tl.store(out, Gd.to(g_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- host side
def _blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, num_warps) of the tile kernels, elementwise: thousands of programs at N = 32k. For 16-bit
    inputs 64 × 128 with 16 warps (16 elements per thread; on sm_90 the backward needs 128 registers per
    thread, no spills, and a CTA keeps 32 KiB of S loads in flight); fp32 inputs do their elementwise
    math in fp64, so 64 × 64 with 8 warps (about 200 registers, no spills). The compile check in
    tests/ops/test_contrastive.py holds these. The interpreter's cost is per program, not per element:
    it takes the large tiles."""
    if dtype == torch.float32 and not _INTERPRET:
        return 64, 64, 8
    return 64, 128, 16


def row_bytes(K: int, dtype: torch.dtype) -> float:
    """Scratch bytes per chunk row: S (fp32) and G' (``dtype``) rows, the row partials, and the row's
    share of the column partials."""
    bm, bn, _ = _blocks(dtype)
    et = 8 if dtype == torch.float32 else 4
    return K * (4 + dtype.itemsize) + 3 * et * cdiv(K, bn) + 4 * et * K / bm


def chunk_rows(M: int, K: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the most whose scratch (S fp32, G' in ``dtype``, the row and column partials)
    fits ``MMFAST_CONTRASTIVE_CHUNK_MB`` MiB (default 256), at least 1; a multiple of 64 from 64 on,
    which the GEMMs prefer."""
    raw = os.environ.get("MMFAST_CONTRASTIVE_CHUNK_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_CHUNK_MB
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise ValueError(f"MMFAST_CONTRASTIVE_CHUNK_MB={raw!r}; expected a positive number of MiB")
    per_row = row_bytes(K, dtype)
    c = max(1, int(mb * 2**20 // per_row))
    if c >= 64:
        c -= c % 64
    return min(c, M)


def _et(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _out(shape, device, dtype) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    return poison_(t) if POISON_OUTPUTS else t


_ACCUMULATES: dict = {}


def _baddbmm_accumulates() -> bool:
    """Whether ``aten::baddbmm.dtype_out`` with ``out`` = ``self`` adds the product into its fp32 output on
    this torch and card: a 1×2×2 check, once per process (the CUDA path's db relies on it)."""
    if "cuda" not in _ACCUMULATES:
        acc = torch.full((1, 2, 2), 1.0, device="cuda")
        x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], device="cuda", dtype=torch.bfloat16)
        torch.ops.aten.baddbmm.dtype_out(acc, x, x, torch.float32, out=acc)
        want = torch.tensor([[[8.0, 11.0], [16.0, 23.0]]], device="cuda")
        _ACCUMULATES["cuda"] = bool(torch.equal(acc, want))
    return _ACCUMULATES["cuda"]


def missing_gemm_ops() -> list[str]:
    """Reasons the CUDA path cannot run on this torch: it needs cuBLAS GEMMs with fp32 output from 16-bit
    operands, ``mm(..., out_dtype=)``, and ``baddbmm(..., out_dtype=)`` adding into its fp32 output (db's
    accumulation across chunks)."""
    missing = [f"torch {torch.__version__} lacks aten::{name}.dtype_out (a 16-bit GEMM with fp32 output)"
               for name in ("mm", "baddbmm") if not hasattr(getattr(torch.ops.aten, name), "dtype_out")]
    if not missing and torch.cuda.is_available() and not _baddbmm_accumulates():
        missing.append(f"torch {torch.__version__}'s baddbmm(out_dtype=float32, out=self) does not add into "
                       "its output on this card (db's fp32 accumulation)")
    return missing


class _Gemm:
    """The GEMMs of one call. On CUDA 16-bit operands go to cuBLAS with fp32 output where fp32 is asked
    for (``aten::mm.dtype_out``; db accumulates across chunks through ``aten::baddbmm.dtype_out``, whose
    C operand is its fp32 output); elsewhere they are upcast (exact products, fp32 sums: the same numbers)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.half = a.dtype != torch.float32
        self.native = a.is_cuda or not self.half
        self.a = a if self.native else a.float()
        self.b = b if self.native else b.float()

    def logits(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """S_c = a[r0:r1] bᵀ into ``out`` (fp32)."""
        x, y = self.a[r0:r1], self.b.t()
        if self.native and self.half:
            return torch.ops.aten.mm.dtype_out(x, y, torch.float32, out=out)
        return torch.mm(x, y, out=out)

    def da(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """da_c = G' b, rounded once to the input dtype."""
        if self.native:
            torch.mm(g, self.b, out=out)
        else:
            out.copy_(torch.mm(g.float(), self.b))

    def db(self, g: torch.Tensor, r0: int, r1: int, acc: torch.Tensor | None) -> torch.Tensor:
        """db (+)= G'ᵀ a_c; ``acc`` (fp32; None for the first chunk, which returns a fresh one) accumulates."""
        x, y = g.t(), self.a[r0:r1]
        if not self.native:
            x = x.float()
        if self.native and self.half:
            if acc is None:
                return torch.ops.aten.mm.dtype(x, y, torch.float32)
            acc3 = acc.unsqueeze(0)
            torch.ops.aten.baddbmm.dtype_out(acc3, x.unsqueeze(0), y.unsqueeze(0), torch.float32, out=acc3)
            return acc
        if acc is None:
            return torch.mm(x, y)
        return acc.addmm_(x, y)


def _chunks(M: int, C: int):
    for r0 in range(0, M, C):
        yield r0, min(M, r0 + C)


def clip_fwd(a, b, scale, bias, label_smoothing, offset, symmetric):
    """-> (loss_sum fp32 0-d, lse_row fp64 (M,), lse_col fp64 (K,) or None). Per chunk: one GEMM and
    three launches (tiles, row fold, column merge), so host time stays small against the GEMM even
    when a large K makes the chunks short."""
    M, _ = a.shape
    K = b.shape[0]
    dev, et, smooth = a.device, _et(a.dtype), float(label_smoothing)
    BM, BN, warps = _blocks(a.dtype)
    C = chunk_rows(M, K, a.dtype)
    NB, RBC = cdiv(K, BN), cdiv(C, BM)
    gemm = _Gemm(a, b)
    s_buf = torch.empty((C, K), device=dev, dtype=torch.float32)
    pm, pl = _out((C, NB), dev, et), _out((C, NB), dev, et)
    pz = _out((C, NB), dev, et) if smooth > 0 else pm
    zpos = _out((M,), dev, et)
    lse_row = _out((M,), dev, torch.float64)
    row_loss = _out((M,), dev, torch.float64)
    if symmetric:
        qm, ql = _out((RBC, K), dev, et), _out((RBC, K), dev, et)
        qz = _out((RBC, K), dev, et) if smooth > 0 else qm
        col_m = torch.full((K,), float("-inf"), device=dev, dtype=torch.float64)
        col_l = torch.zeros((K,), device=dev, dtype=torch.float64)
        col_z = torch.zeros((K,), device=dev, dtype=torch.float64) if smooth > 0 else col_l
    else:
        qm = ql = qz = pm  # never touched
    BR, BJ, BC = 32, 32, 256  # sm_90: no spills with 4 warps (the compile check)
    for r0, r1 in _chunks(M, C):
        R, RB = r1 - r0, cdiv(r1 - r0, BM)
        S = gemm.logits(r0, r1, s_buf[:R])
        _fwd_tiles[(RB, NB)](
            S, scale, scale if bias is None else bias, pm, pl, pz, zpos[r0:r1], qm, ql, qz, pm,
            R, K, r0, int(offset), NB,
            HAS_BIAS=bias is not None, SIGLIP=False, SYMMETRIC=bool(symmetric), SMOOTH=smooth > 0,
            EXACT=a.dtype == torch.float32, BM=BM, BN=BN, num_warps=warps,
        )
        _fold_rows[(cdiv(R, BR),)](pm, pl, pz, zpos[r0:r1], lse_row[r0:r1], row_loss[r0:r1], R, K, NB, smooth,
                                   SMOOTH=smooth > 0, BR=BR, BJ=BJ)
        if symmetric:
            _merge_cols[(cdiv(K, BC),)](qm, ql, qz, col_m, col_l, col_z, RB, K, SMOOTH=smooth > 0, BC=BC)
    loss = row_loss.sum()
    if not symmetric:
        return loss.float(), lse_row, None
    # square, offset 0: column j's positive is row j's
    log_l = torch.log(col_l)
    zbar = col_z / M if smooth > 0 else col_m
    col_loss = ((1.0 - smooth) * (col_m - zpos.double()) + smooth * (col_m - zbar) + log_l).sum()
    return (loss + col_loss).float(), lse_row, col_m + log_l


def _bwd(a, b, scale, bias, grad, lse_row, lse_col, smooth, offset, symmetric, siglip):
    M, D = a.shape
    K = b.shape[0]
    dev, et = a.device, _et(a.dtype)
    BM, BN, warps = _blocks(a.dtype)
    C = chunk_rows(M, K, a.dtype)  # the forward's chunks: S_c gets the forward's bits
    NB, RBC = cdiv(K, BN), cdiv(C, BM)
    grad = grad.detach().float().reshape(()).contiguous()
    gemm = _Gemm(a, b)
    s_buf = torch.empty((C, K), device=dev, dtype=torch.float32)
    g_buf = _out((C, K), dev, a.dtype)
    dsc = _out((RBC, NB), dev, et)
    dbi = _out((RBC, NB), dev, et) if siglip else dsc
    dsc_sum = torch.zeros((), device=dev, dtype=torch.float64)
    dbi_sum = torch.zeros((), device=dev, dtype=torch.float64)
    da = _out((M, D), dev, a.dtype)
    db = None
    for r0, r1 in _chunks(M, C):
        R, RB = r1 - r0, cdiv(r1 - r0, BM)
        S = gemm.logits(r0, r1, s_buf[:R])
        G = g_buf[:R]
        _bwd_tiles[(RB, NB)](
            S, G, scale, scale if bias is None else bias, grad,
            scale if lse_row is None else lse_row, scale if lse_col is None else lse_col, dsc, dbi,
            R, K, M, r0, int(offset), float(smooth), NB,
            HAS_BIAS=bias is not None, SIGLIP=siglip, ROW_CE=not siglip, COL_CE=bool(symmetric) and not siglip,
            EXACT=a.dtype == torch.float32, RTNE_BITS=_INTERPRET and a.dtype == torch.bfloat16,
            BM=BM, BN=BN, num_warps=warps,
        )
        dsc_sum += dsc[:RB].sum(dtype=torch.float64)
        if siglip:
            dbi_sum += dbi[:RB].sum(dtype=torch.float64)
        gemm.da(G, da[r0:r1])
        db = gemm.db(G, r0, r1, db)
    dscale = (grad.double() * dsc_sum).float()
    if siglip:
        dbias = (grad.double() * dbi_sum).float()
    elif bias is not None:
        dbias = torch.zeros((), device=dev, dtype=torch.float32)  # CE is shift-invariant
    else:
        dbias = None
    return da, db.to(b.dtype), dscale, dbias


def clip_bwd(a, b, scale, bias, label_smoothing, offset, symmetric, lse_row, lse_col, grad):
    return _bwd(a, b, scale, bias, grad, lse_row, lse_col, label_smoothing, offset, symmetric, False)


def siglip_fwd(a, b, scale, bias, offset):
    """-> loss_sum fp32 0-d."""
    M, _ = a.shape
    K = b.shape[0]
    dev, et = a.device, _et(a.dtype)
    BM, BN, warps = _blocks(a.dtype)
    C = chunk_rows(M, K, a.dtype)
    NB, RBC = cdiv(K, BN), cdiv(C, BM)
    gemm = _Gemm(a, b)
    s_buf = torch.empty((C, K), device=dev, dtype=torch.float32)
    total = torch.zeros((), device=dev, dtype=torch.float64)
    sp = _out((RBC, NB), dev, et)
    for r0, r1 in _chunks(M, C):
        R, RB = r1 - r0, cdiv(r1 - r0, BM)
        S = gemm.logits(r0, r1, s_buf[:R])
        _fwd_tiles[(RB, NB)](
            S, scale, bias, sp, sp, sp, sp, sp, sp, sp, sp,
            R, K, r0, int(offset), NB,
            HAS_BIAS=True, SIGLIP=True, SYMMETRIC=False, SMOOTH=False,
            EXACT=a.dtype == torch.float32, BM=BM, BN=BN, num_warps=warps,
        )
        total += sp[:RB].sum(dtype=torch.float64)
    return total.float()


def siglip_bwd(a, b, scale, bias, offset, grad):
    return _bwd(a, b, scale, bias, grad, None, None, 0.0, offset, False, True)


def extra_memory_bytes(M: int, K: int, D: int, dtype) -> dict:
    """Scratch beyond O(M + K) vectors (for the docs, the benchmark and the memory test): the chunk's
    S, G' and partials, and the fp32 db accumulator when there is more than one chunk."""
    C = chunk_rows(M, K, dtype)
    _, bn, _ = _blocks(dtype)
    et = 8 if dtype == torch.float32 else 4
    isz = dtype.itemsize
    fwd = C * K * 4 + C * cdiv(K, bn) * 3 * et + cdiv(C, 64) * K * 3 * et
    bwd = C * K * (4 + isz) + (K * D * 4 if C < M else 0) + M * D * isz
    return {"chunk_rows": C, "fwd": fwd, "bwd": bwd}
