"""Flash attention forward in Triton, plus the mask and dropout helpers shared with the backward.

Math (one head, one sequence; qa = i + Sk - Sq aligns causal masks bottom-right as flash-attn does):

    s_ij = scale · q_i·k_j                       (or softcap · tanh(scale · q_i·k_j / softcap))
           - slope_h · |qa - j|                   (ALiBi, when slopes are given; flash-attn's bias)
    visible(i, j) = j < Sk
                    ∧ [ (qa - wl ≤ j ≤ qa + wr)  ∨  (qa < P ∧ j < P) ]    (band; prefix-LM block)
    lse_i = log Σ_{j visible} exp(s_ij)           (+inf for a row that sees nothing; its output is 0)
    o_i   = Σ_j dropout(exp(s_ij - lse_i)) · v_j

``causal`` is the band with wr = 0; an unbounded side of the window is a number larger than any
sequence. The kernel streams key blocks with the online softmax (running max ``m``, running sum ``l``,
base-2 exponentials) and never stores the S×S scores. Key blocks that are visible from every row of
the query block skip the mask arithmetic; only the band edges and the sequence tail pay for it.

Layouts: dense q/k/v are (B, S, H, D); packed (varlen) ones are (total, H, D) with ``cu_seqlens``
offsets. The KV-cache forms read k/v rows through ``kv_batch_idx`` (cache row of batch row b), start
each row's keys at ``leftpad[b]`` and, with a block table, read them from pages: logical key position
t of row b lives in page ``block_table[b, t // page_size]`` at slot ``t % page_size`` of a
(num_pages, page_size, Hk, D) cache. GQA maps query head h to key/value head h // (H // Hk). ``lse`` is fp32 (B, H, Sq) dense or
(H, total_q) packed, as flash-attn returns it.

Dropout keeps an element when a 32-bit integer hash of (seed, batch·head, i·Sk + j) is ≥ p·2³²; the
reference backend computes the same hash with int64 arithmetic, so both backends drop the same entries.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from mmfast.ops._host import cdiv, next_pow2
from mmfast.ops._triton_util import lowp

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MMFAST_ATTN_AUTOTUNE=0 launches fixed per-head-dim configs instead of tuning (e.g. GPU test runs, where
# tuning every mask combination would dominate the time).
AUTOTUNE = not INTERPRET and os.environ.get("MMFAST_ATTN_AUTOTUNE", "1") != "0"
LOG2E = 1.4426950408889634

# Block sizes used under the interpreter (small, so odd lengths cross block edges in tests).
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32


@triton.jit
def hash_u32(x):
    """A 32-bit integer mixer (xorshift-multiply); x is uint32, arithmetic wraps mod 2³²."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def dropout_keep(seed, bh, rows, cols, seqlen_k, dropout_p):
    """Boolean keep-mask of head ``bh`` at broadcastable (row, col) index tensors, e.g. rows[:, None],
    cols[None, :] (either orientation, so the backward needs no transpose of a boolean tile)."""
    base = hash_u32(seed.to(tl.uint32) + bh.to(tl.uint32) * 0x9E3779B9)
    lin = rows.to(tl.uint32) * seqlen_k.to(tl.uint32) + cols.to(tl.uint32)
    r = hash_u32(lin ^ base)
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p


@triton.jit
def visible_mask(qa, cols, seqlen_k, wl, wr, prefix, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """visible(qa, cols) per the module docstring, on broadcastable tensors (query positions ``qa`` on
    the key axis, key indices ``cols``)."""
    ok = cols < seqlen_k
    if BAND:
        band = (cols >= qa - wl) & (cols <= qa + wr)
        if HAS_PREFIX:
            band = band | ((qa < prefix) & (cols < prefix))
        ok = ok & band
    return ok


@triton.jit
def alibi_bias(slope, qa, cols):
    """ALiBi bias in log2 units, -slope·|qa - j|·log2(e), on broadcastable (query, key) index tensors."""
    dist = (qa - cols).to(tl.float32)
    return -(slope * 1.4426950408889634) * tl.abs(dist)


@triton.jit
def kv_offsets(cols, k_start, sk, bt_base, page_size, stride_kp, stride_ks, stride_vp, stride_vs,
               PAGED: tl.constexpr):
    """Element offsets of key/value rows ``cols`` (relative to the sequence's first key) from the k/v
    base pointers: contiguous rows, or pages looked up in the block table."""
    if PAGED:
        pos = k_start + cols
        page = tl.load(bt_base + pos // page_size, mask=cols < sk, other=0).to(tl.int64)
        slot = pos % page_size
        return page * stride_kp + slot * stride_ks, page * stride_vp + slot * stride_vs
    return cols * stride_ks, cols * stride_vs


@triton.jit
def seq_bounds(CU_Q, CU_K, SEQUSED_K, b, seqlen_q, seqlen_k,
               IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(first row of sequence b in the packed tensors, its q length, first key row, its k length)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        sq = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        sk = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0  # int32 tensors (not constexpr 0) so callers can .to(int64)
        sq = seqlen_q
        k_start = b * 0
        sk = seqlen_k
        if HAS_SEQUSED:
            sk = tl.load(SEQUSED_K + b)
    return q_start, sq, k_start, sk


@triton.jit
def heads(bh, n_heads, group):
    """(batch, query head, kv head) of a program over (batch x query heads)."""
    b = bh // n_heads
    h = bh % n_heads
    return b, h, h // group


@triton.jit
def row_tile(start, n, head_dim, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [start, start + BLOCK) of a sequence of n, the head-dim columns, and their in-bounds masks."""
    rows = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    return rows, offs_d, rows < n, d_ok


@triton.jit
def load_rows(PTR, b, stride_b, h, stride_h, start, rows, stride_s, offs_d, ok, d_ok):
    """The (rows, D) tile of batch b, head h, rows from ``start`` on (int64 offsets); out of bounds reads 0."""
    return tl.load(PTR + b.to(tl.int64) * stride_b + h * stride_h + (start + rows)[:, None].to(tl.int64) * stride_s
                   + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def prefix_len(PREFIX, b, sk, HAS_PREFIX: tl.constexpr):
    """The prefix-LM prefix of sequence b (clipped to its keys); 0 without one."""
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.minimum(tl.load(PREFIX + b), sk)
    return prefix


@triton.jit
def score_scale(sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """What q·k is multiplied by: sm_scale·log2(e) for exp2, or sm_scale / softcap before the tanh."""
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_SOFTCAP:
        qk_scale = sm_scale / softcap
    return qk_scale


@triton.jit
def block_ranges(lo, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block starts for a loop from ``lo`` whose indices [full_lo, full_hi) need no mask: the first block, and
    the unmasked blocks' [start, end) (both at the first block when no whole block is unmasked)."""
    first = (lo // BLOCK) * BLOCK
    full_start = tl.cdiv(full_lo, BLOCK) * BLOCK
    full_end = (full_hi // BLOCK) * BLOCK
    no_full = full_end <= full_start
    full_start = tl.where(no_full, first, full_start)
    full_end = tl.where(no_full, first, full_end)
    return first, full_start, full_end


@triton.jit
def key_block_ranges(m0, sq, sk, window_left, window_right, prefix,
                     BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks for query rows [m0, m0 + BLOCK_M): masked [n_lo, n_full_start), unmasked (visible from
    every row and inside the sequence) [n_full_start, n_full_end), masked [n_full_end, hi)."""
    off = sk - sq
    qa_lo = m0 + off
    qa_hi = tl.minimum(m0 + BLOCK_M, sq) - 1 + off
    # Keys visible from some row: [lo, hi); from every row: [full_lo, full_hi) (the band alone: with a
    # prefix the true region can be larger, and the masked path covers the difference).
    lo = qa_lo * 0
    hi = sk
    full_lo = qa_lo * 0
    full_hi = sk
    if BAND:
        lo = tl.maximum(qa_lo - window_left, 0)
        hi = tl.minimum(qa_hi + window_right + 1, sk)
        full_lo = tl.maximum(qa_hi - window_left, 0)
        full_hi = tl.minimum(qa_lo + window_right + 1, sk)
        if HAS_PREFIX:
            # A query block reaching into the prefix also sees every prefix key.
            in_prefix = qa_lo < prefix
            lo = tl.where(in_prefix, 0, lo)
            hi = tl.where(in_prefix, tl.maximum(hi, prefix), hi)
    n_lo, n_full_start, n_full_end = block_ranges(lo, full_lo, full_hi, BLOCK_N)
    return n_lo, n_full_start, n_full_end, hi


@triton.jit
def mm(a, b, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # The interpreter multiplies raw bf16 bits in tl.dot; UPCAST (interpreter only) computes the same
    # product from exactly the same rounded operands in fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_d, head_dim,
               qa, rows, sk, wl, wr, prefix, qk_scale, softcap, dropout_p, seed, bh,
               n_start, n_end, slope, k_start, bt_base, page_size, stride_kp, stride_vp,
               MASKED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PAGED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for n in range(n_start, n_end, BLOCK_N):
        cols = n + offs_n
        k_off, v_off = kv_offsets(cols, k_start, sk, bt_base, page_size, stride_kp, stride_ks, stride_vp,
                                  stride_vs, PAGED)
        if MASKED:
            kv_ok = cols < sk
            kT = tl.load(k_base + k_off[None, :] + offs_d[:, None],
                         mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (D, BN)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :],
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, D)
        else:
            kT = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = mm(q, kT, UPCAST, DOT_PREC)  # (BM, BN) fp32
        if HAS_SOFTCAP:
            # softcap·tanh(x/softcap), tanh written with exp so it compiles on every Triton version.
            x = qk * qk_scale
            t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
            s = t * (softcap * 1.4426950408889634)
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            s += alibi_bias(slope, qa[:, None], cols[None, :])
        if MASKED:
            ok = visible_mask(qa[:, None], cols[None, :], sk, wl, wr, prefix, BAND, HAS_PREFIX)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh, rows[:, None], cols[None, :], sk, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        acc = acc * alpha[:, None] + mm(lowp(p, v.dtype, UPCAST), v, UPCAST, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# seqlen args stay runtime values even when 1 (Triton would otherwise make them constexpr).
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "seed"])
def _fwd_kernel(
    Q, K, V, O, LSE, MROW, ILROW, CU_Q, CU_K, SEQUSED_K, PREFIX, ALIBI, KV_IDX, LEFTPAD, BLOCK_TABLE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_btb, page_size,
    seqlen_q, seqlen_k, n_heads, group, head_dim,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = heads(bh, n_heads, group)
    q_start, sq, k_start, sk = seq_bounds(CU_Q, CU_K, SEQUSED_K, b, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED)
    if PAGED:
        k_start = k_start * 0  # a paged sequence's keys start at logical position 0 of its block-table row
    if HAS_LEFTPAD:
        pad = tl.load(LEFTPAD + b)
        k_start = k_start + pad
        sk = sk - pad
    kb = b
    if HAS_KV_IDX:
        kb = tl.load(KV_IDX + b)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * n_heads + h)
    m0 = start_m * BLOCK_M
    if m0 >= sq:
        return
    offs_m, offs_d, q_ok, d_ok = row_tile(m0, sq, head_dim, BLOCK_M, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, D)
    bt_base = BLOCK_TABLE + b.to(tl.int64) * stride_btb
    if PAGED:  # rows are found through the block table (kv_offsets); the page stride is stride_kb
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
    else:
        k_base = K + kb.to(tl.int64) * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_ks
        v_base = V + kb.to(tl.int64) * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vs

    off = sk - sq
    qa = offs_m + off  # (BM,) query positions on the key axis
    prefix = prefix_len(PREFIX, b, sk, HAS_PREFIX)
    n_lo, n_full_start, n_full_end, hi = key_block_ranges(m0, sq, sk, window_left, window_right, prefix,
                                                          BAND, HAS_PREFIX, BLOCK_M, BLOCK_N)
    qk_scale = score_scale(sm_scale, softcap, HAS_SOFTCAP)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_d, head_dim,
                               qa, offs_m, sk, window_left, window_right, prefix, qk_scale, softcap,
                               dropout_p, seed, bh, n_lo, n_full_start, slope, k_start, bt_base, page_size,
                               stride_kb, stride_vb, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT,
                               HAS_ALIBI, PAGED, UPCAST, DOT_PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_d, head_dim,
                               qa, offs_m, sk, window_left, window_right, prefix, qk_scale, softcap,
                               dropout_p, seed, bh, n_full_start, n_full_end, slope, k_start, bt_base, page_size,
                               stride_kb, stride_vb, False, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT,
                               HAS_ALIBI, PAGED, UPCAST, DOT_PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_d, head_dim,
                               qa, offs_m, sk, window_left, window_right, prefix, qk_scale, softcap,
                               dropout_p, seed, bh, n_full_end, hi, slope, k_start, bt_base, page_size,
                               stride_kb, stride_vb, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT,
                               HAS_ALIBI, PAGED, UPCAST, DOT_PREC, BLOCK_N)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i / 1.4426950408889634 + tl.log(l_safe))
    o_base = O + b.to(tl.int64) * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :],
             lowp(out, O.dtype.element_ty, UPCAST).to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    l_off = b.to(tl.int64) * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_ls + offs_m * stride_ls
    tl.store(LSE + l_off, lse, mask=q_ok)
    # For the backward: p = exp2(s - m) / l exactly as here; recomputing it from lse instead would add the
    # rounding of lse (~eps·|lse|) to every probability.
    tl.store(MROW + l_off, tl.where(empty, 0.0, m_i), mask=q_ok)
    tl.store(ILROW + l_off, tl.where(empty, 0.0, 1.0 / l_safe), mask=q_ok)


# --------------------------------------------------------------------------- tuning (GPU only)
def _fwd_configs():
    # Few configs on purpose: each one is compiled when a new (head dim, mask kind) is first tuned.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]]


def fixed_config(kind: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that fit H100/H200 shared memory (227 KiB per block).

    fp32 tiles take twice the bytes and more staging (sm_90 compiles of the fp32 forward at D=128,
    128×64, 3 stages use 225 KiB), so fp32 always gets these small tiles, tuned or not."""
    d = block_d(head_dim)
    if dtype == torch.float32:
        if kind == "fwd":
            return (64, 64, 4, 2) if d <= 128 else (32, 32, 4, 2)
        return (32, 64, 4, 2) if d <= 128 else (16, 32, 4, 1)
    if kind == "fwd":
        return (128, 64, 4, 3) if d <= 64 else (128, 64, 8, 3) if d <= 128 else (64, 64, 4, 2)
    return (64, 64, 4, 2) if d <= 128 else (32, 64, 4, 2)


def as_config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def prune_tiles(kind: str, configs, named_args, **kwargs):
    """Keep block shapes whose tiles fit shared memory for this head dim and dtype; ``kind``: "fwd" or "bwd"
    (bind it with functools.partial for triton.autotune's early_config_prune)."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    dtype = named_args["Q"].dtype
    if dtype == torch.float32:
        return [as_config(*fixed_config(kind, d, torch.float32))]

    def fits(c) -> bool:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d >= 256:
            return bm * bn <= (64 * 64 if kind == "fwd" else 64 * 32)
        if d > 64:
            return (bn <= 64 or c.num_warps == 8) if kind == "fwd" else bm * bn <= 64 * 128
        return True

    return [c for c in configs if fits(c)] or [as_config(*fixed_config(kind, d, dtype))]


if not AUTOTUNE:
    _fwd = _fwd_kernel
else:
    _fwd = triton.autotune(
        configs=_fwd_configs(),
        key=["BLOCK_D", "BAND", "HAS_PREFIX", "HAS_SOFTCAP", "HAS_DROPOUT", "IS_VARLEN", "HAS_ALIBI", "PAGED"],
        prune_configs_by={"early_config_prune": functools.partial(prune_tiles, "fwd")},
    )(_fwd_kernel)


# --------------------------------------------------------------------------- host side
def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def launch_meta(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters for ``kind`` ("fwd" | "bwd"): fixed block sizes under the interpreter, none
    when autotuning, else a fixed config that fits H100/H200 shared memory for this head dim."""
    if INTERPRET:
        return {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N}
    if AUTOTUNE:
        return {}
    bm, bn, warps, stages = fixed_config(kind, head_dim, dtype)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def strides3(t: torch.Tensor, varlen: bool):
    """(batch, seq, head) strides of a (B, S, H, D) tensor, or of a packed (T, H, D) one (batch 0)."""
    s = t.stride()  # one call, not one per dimension
    if varlen:
        return 0, s[0], s[1]
    return s[0], s[1], s[2]


def _new_nan(shape, device, dtype):
    """``torch.full(shape, NaN)``: a poisoned output buffer (the interpreter's tests)."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def attn_fwd(q, k, v, p):
    """Run the forward kernel. ``p`` is the :class:`mmfast.ops._attention_reference.AttnParams` of the call.

    Returns (out like q, lse fp32: (B, H, Sq) dense or (H, total_q) packed, row stats for the backward:
    (log2-domain max, 1 / sum) laid out like lse)."""
    varlen = p.cu_seqlens_q is not None
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    # under the interpreter the outputs are poisoned (NaN) so an unwritten element shows up in tests
    new = _new_nan if INTERPRET else torch.empty
    out = torch.full_like(q, float("nan")) if INTERPRET else torch.empty_like(q)
    if varlen:
        batch = p.cu_seqlens_q.numel() - 1
        lse_shape = (n_heads, q.shape[0])
    else:
        batch = q.shape[0]
        lse_shape = (batch, n_heads, q.shape[1])
    lse, m_row, il_row = (new(lse_shape, device=q.device, dtype=torch.float32) for _ in range(3))
    lse_strides = (0, *lse.stride()) if varlen else lse.stride()
    dummy = p.dummy_int(q.device)

    def grid(meta):
        return (cdiv(p.max_seqlen_q, meta["BLOCK_M"]), batch * n_heads)

    paged = p.block_table is not None
    _fwd[grid](
        q, k, v, out, lse, m_row, il_row,
        p.cu_seqlens_q if varlen else dummy, p.cu_seqlens_k if varlen else dummy,
        p.seqused_k if p.seqused_k is not None else dummy,
        p.prefix if p.prefix is not None else dummy,
        *kv_extras(p, dummy),
        *strides3(q, varlen), *strides3(k, varlen and not paged), *strides3(v, varlen and not paged),
        *strides3(out, varlen), *lse_strides,
        p.block_table.stride(0) if paged else 0, p.page_size if paged else 1,
        p.max_seqlen_q, p.max_seqlen_k, n_heads, n_heads // k.shape[-2], head_dim,
        p.scale, p.softcap if p.softcap > 0 else 1.0, p.window_left, p.window_right, p.dropout_p, p.seed,
        IS_VARLEN=varlen, HAS_SEQUSED=p.seqused_k is not None, BAND=p.band, HAS_PREFIX=p.prefix is not None,
        HAS_SOFTCAP=p.softcap > 0, HAS_DROPOUT=p.dropout_p > 0, HAS_ALIBI=p.alibi is not None,
        HAS_KV_IDX=p.kv_batch_idx is not None, HAS_LEFTPAD=p.leftpad is not None, PAGED=paged,
        UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype), BLOCK_D=block_d(head_dim),
        **launch_meta("fwd", head_dim, q.dtype),
    )
    return out, lse, (m_row, il_row)


def kv_extras(p, dummy) -> tuple:
    """(ALIBI, KV_IDX, LEFTPAD, BLOCK_TABLE) kernel arguments: the tensors, or ``dummy`` where absent."""
    return tuple(t if t is not None else dummy for t in (p.alibi, p.kv_batch_idx, p.leftpad, p.block_table))
