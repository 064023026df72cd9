"""Triton kernels for LayerNorm / RMSNorm with an optional fused residual add.

Forward, one program per row (N ≤ 65536 columns, held in registers):

    s = x (+ r)                                   stored as the new residual when r is given
    LayerNorm: μ = mean(s), rstd = 1/√(var(s) + eps), ŝ = (s − μ) rstd
    RMSNorm:   μ = 0,       rstd = 1/√(mean(s²) + eps), ŝ = s rstd
    y = ŝ · w + b

Backward, each program walks a contiguous block of rows, a tile of BLOCK_M rows per step (about
4096 elements in flight), and keeps fp32 partial sums of dw, db:

    g = dy · w,   dx = rstd (g − ŝ mean(g ŝ) − mean(g)) (+ d(new residual)),  mean(g) only for LayerNorm
    dw = Σ_rows dy ŝ,  db = Σ_rows dy
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2


@triton.jit
def _norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr,
    y_ptr,  # (M, N) out
    s_ptr,  # (M, N) out: x + r (only when HAS_RES)
    stats_ptr,  # (2, M) fp32 out: mean, rstd (M = the number of programs)
    N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(r_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * N + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
    if IS_RMS:
        mean = tl.zeros([], tl.float32)
        sc = s
    else:
        mean = tl.sum(s, 0) / N
        sc = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, 0) / N + eps)
    y = sc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + row, mean)
    tl.store(stats_ptr + tl.num_programs(0) + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    s_ptr,  # (M, N) the normalised input (x, or x + r)
    w_ptr,
    dy_ptr,  # (M, N)
    ds_ptr,  # (M, N) grad flowing into the new residual output (only when HAS_DS)
    dx_ptr,  # (M, N) out
    stats_ptr,  # (2, M) fp32: mean, rstd
    part_ptr,  # (2, programs, N) fp32 out: partial sums of dw, then of db
    M, N, rows_per_prog,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each program walks its ``rows_per_prog`` rows (a multiple of BLOCK_M) BLOCK_M at a time, so
    a (BLOCK_M, BLOCK_N) tile of loads is in flight per step rather than one row."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        off = rows[:, None].to(tl.int64) * N + cols[None, :]
        s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(stats_ptr + M + rows, mask=rmask, other=0.0)[:, None]
        if IS_RMS:
            sh = s * rstd
        else:
            mean = tl.load(stats_ptr + rows, mask=rmask, other=0.0)[:, None]
            sh = tl.where(mask, (s - mean) * rstd, 0.0)
        g = dy
        if HAS_W:
            g = dy * w
        c1 = (tl.sum(g * sh, 1) / N)[:, None]
        if IS_RMS:
            dx = (g - sh * c1) * rstd
        else:
            dx = (g - sh * c1 - (tl.sum(g, 1) / N)[:, None]) * rstd
        if HAS_DS:
            dx += tl.load(ds_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * sh
        db += dy
    tl.store(part_ptr + pid * N + cols, tl.sum(dw, 0), mask=cmask)
    tl.store(part_ptr + (tl.num_programs(0) + pid) * N + cols, tl.sum(db, 0), mask=cmask)


_TILE = 4096  # backward: elements of (rows, columns) per program step
_BWD_MAX_WARPS = 8  # backward: warps per program at most (the 4096-element tile: 148 registers, no spills)


def _warps(elements: int) -> int:
    """Warps for a row (forward) or a tile (backward) of this many elements: 8 per warp-thread pass."""
    return max(1, min(16, elements // 256))


@functools.cache
def _programs(device: torch.device) -> int:
    """Backward programs: a few per SM, so the (programs, N) partial sums stay small."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4


def norm_fwd(x, residual, weight, bias, eps, is_rms, residual_dtype):
    """x, residual: (..., N) contiguous, M = numel / N rows. Returns y (..., N) x.dtype, s (..., N) or None,
    stats (2, M) fp32: mean, rstd (one allocation)."""
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    s = torch.empty_like(x, dtype=residual_dtype) if residual is not None else None  # (empty_like: ~1 µs less than empty(shape))
    stats = torch.empty(2, M, device=x.device, dtype=torch.float32)
    if M:
        block = next_pow2(N)
        _norm_fwd_kernel[(M,)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, s if s is not None else y, stats, N, float(eps),
            IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, num_warps=_warps(block),
        )
    return y, s, stats


_BWD_CONFIGS: dict = {}


def _bwd_config(M: int, N: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, programs, rows per program, warps) of the backward, memoised per (M, N, device)."""
    key = (M, N, device)
    cfg = _BWD_CONFIGS.get(key)
    if cfg is None:
        block = next_pow2(N)
        block_m = max(1, min(16, _TILE // block))  # about _TILE elements per step
        progs = max(1, min(_programs(device), cdiv(M, block_m)))
        rows = cdiv(cdiv(M, progs), block_m) * block_m if M else block_m
        progs = max(1, cdiv(M, rows))
        cfg = (block, block_m, progs, rows, min(_BWD_MAX_WARPS, _warps(block_m * block)))
        if len(_BWD_CONFIGS) >= 4096:  # many distinct row counts (varlen): start over
            _BWD_CONFIGS.clear()
        _BWD_CONFIGS[key] = cfg
    return cfg


def norm_bwd(s, weight, dy, ds, stats, is_rms, dx_dtype):
    """s, dy, ds: (..., N) contiguous. Returns dx (..., N) in ``dx_dtype`` and the fp32 column sums
    dwb (2, N): dw, then db (the per-program partials of both in one buffer, summed by one op; with a
    single program, as for a few rows, the partials are the sums and no op is needed)."""
    N = s.shape[-1]
    M = s.numel() // N
    device = s.device
    dx = torch.empty_like(s, dtype=dx_dtype)
    block, block_m, progs, rows, warps = _bwd_config(M, N, device)
    # (2, programs, N) partials; with one program they are the sums, allocated as the (2, N) result
    part = torch.empty((2, N) if progs == 1 else (2, progs, N), device=device, dtype=torch.float32)
    if M:
        _norm_bwd_kernel[(progs,)](
            s, weight if weight is not None else s, dy, ds if ds is not None else dy, dx, stats,
            part, M, N, rows,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_DS=ds is not None,
            BLOCK_M=block_m, BLOCK_N=block, num_warps=warps,
        )
        return dx, (part if progs == 1 else part.sum(1))
    return dx, part.new_zeros(2, N)
