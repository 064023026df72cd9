"""Flash attention backward in Triton (two kernels, no atomics, deterministic).

With p_ij = exp2(s_ij·log2(e) - m_i) / l_i recomputed from the forward's row max and sum, z the
dropout keep-mask scaled by 1/(1-p_drop), δ_i = do_i·o_i, and c_ij = 1 - tanh² (softcap) or 1:

    (s_ij includes the ALiBi bias -slope·|qa - j| when slopes are given; it is constant in q, k, v)

    dv_j = Σ_i z_ij p_ij do_i
    ds_ij = p_ij (z_ij do_i·v_j - δ_i) c_ij
    dq_i = scale Σ_j ds_ij k_j          (kernel _dq: one program per query block and query head)
    dk_j = scale Σ_i ds_ij q_i          (kernel _dkdv: one program per key block and kv head, looping
                                          over the H/Hk query heads of its group, so GQA needs no atomics)

As in the forward, blocks visible from every row skip the mask arithmetic; only band edges and
sequence tails are masked (see the forward's docstring for the mask).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmfast.ops._attention_triton import (
    AUTOTUNE,
    INTERPRET,
    alibi_bias,
    as_config,
    block_d,
    block_ranges,
    dot_precision,
    dropout_keep,
    heads,
    key_block_ranges,
    launch_meta,
    load_rows,
    lowp,
    mm,
    prefix_len,
    prune_tiles,
    row_tile,
    score_scale,
    seq_bounds,
    strides3,
    upcast,
    visible_mask,
)
from mmfast.ops._host import cdiv


@triton.jit
def _scores(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units and the softcap derivative factor (1 when there is no softcap)."""
    if HAS_SOFTCAP:
        x = qk * qk_scale
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        return t * (softcap * 1.4426950408889634), 1.0 - t * t
    return qk * qk_scale, qk * 0.0 + 1.0


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, il_base, delta_base, stride_qs, stride_dos, stride_ls,
                offs_n, offs_d, d_ok, sq, sk, off, window_left, window_right, prefix, qk_scale, softcap,
                dropout_p, seed, bh, m_start, m_end, slope,
                MASKED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Accumulate dk, dv (BN, D) over query blocks [m_start, m_end) of one query head."""
    offs_mb = tl.arange(0, BLOCK_M)
    for m in range(m_start, m_end, BLOCK_M):
        rows = m + offs_mb
        q_ok = rows < sq
        if MASKED:
            qT = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None],
                         mask=q_ok[None, :] & d_ok[:, None], other=0.0)  # (D, BM)
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :],
                         mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, D)
            m_row = tl.load(m_base + rows * stride_ls, mask=q_ok, other=0.0)  # (BM,)
            il_row = tl.load(il_base + rows * stride_ls, mask=q_ok, other=0.0)  # (BM,) 0: row sees nothing
            delta = tl.load(delta_base + rows * stride_ls, mask=q_ok, other=0.0)  # (BM,)
        else:
            qT = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            m_row = tl.load(m_base + rows * stride_ls)
            il_row = tl.load(il_base + rows * stride_ls)
            delta = tl.load(delta_base + rows * stride_ls)
        sT, cT = _scores(mm(k, qT, UPCAST, DOT_PREC), qk_scale, softcap, HAS_SOFTCAP)  # (BN, BM)
        if HAS_ALIBI:
            sT += alibi_bias(slope, (rows + off)[None, :], offs_n[:, None])
        pT = tl.exp2(sT - m_row[None, :]) * il_row[None, :]
        if MASKED:
            # visible() with keys on the row axis and queries on the column axis.
            ok = visible_mask((rows + off)[None, :], offs_n[:, None], sk, window_left, window_right, prefix,
                              BAND, HAS_PREFIX)
            pT = tl.where(ok & q_ok[None, :], pT, 0.0)
        dpT = mm(v, tl.trans(do), UPCAST, DOT_PREC)  # (BN, BM)
        if HAS_DROPOUT:
            keepT = dropout_keep(seed, bh, rows[None, :], offs_n[:, None], sk, dropout_p)  # (BN, BM)
            zT = tl.where(keepT, 1.0 / (1.0 - dropout_p), 0.0)
            dv += mm(lowp(pT * zT, do.dtype, UPCAST), do, UPCAST, DOT_PREC)
            dpT = dpT * zT
        else:
            dv += mm(lowp(pT, do.dtype, UPCAST), do, UPCAST, DOT_PREC)
        dsT = pT * (dpT - delta[None, :]) * cT
        dk += mm(lowp(dsT, qT.dtype, UPCAST), tl.trans(qT), UPCAST, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "seed"])
def _dkdv_kernel(
    Q, K, V, DO, MROW, ILROW, DELTA, DK, DV, CU_Q, CU_K, SEQUSED_K, PREFIX, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, n_heads, n_kv_heads, group, head_dim,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q_start, sq, k_start, sk = seq_bounds(CU_Q, CU_K, SEQUSED_K, b, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED)
    n0 = start_n * BLOCK_N
    if n0 >= sk:
        return
    offs_n, offs_d, kv_ok, d_ok = row_tile(n0, sk, head_dim, BLOCK_N, BLOCK_D)
    k = load_rows(K, b, stride_kb, hk, stride_kh, k_start, offs_n, stride_ks, offs_d, kv_ok, d_ok)  # (BN, D)
    v = load_rows(V, b, stride_vb, hk, stride_vh, k_start, offs_n, stride_vs, offs_d, kv_ok, d_ok)  # (BN, D)

    off = sk - sq
    prefix = prefix_len(PREFIX, b, sk, HAS_PREFIX)
    # Query rows that see some key of this block: [m_lo, m_hi); that see all of them: [full_lo, full_hi)
    # (keys past the sequence end need no mask here: they only feed their own dk/dv rows, never stored).
    m_lo = n0 * 0
    m_hi = sq
    full_lo = n0 * 0
    full_hi = sq
    if BAND:
        n_last = tl.minimum(n0 + BLOCK_N, sk) - 1
        m_lo = tl.maximum(n0 - window_right - off, 0)
        m_hi = tl.minimum(n_last + window_left - off + 1, sq)
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - window_right - off, 0)
        full_hi = tl.minimum(n0 + window_left - off + 1, sq)
        if HAS_PREFIX:
            in_prefix = n0 < prefix
            m_lo = tl.where(in_prefix, 0, m_lo)
            m_hi = tl.where(in_prefix, tl.maximum(m_hi, tl.minimum(prefix - off, sq)), m_hi)
    m_lo, m_full_start, m_full_end = block_ranges(m_lo, full_lo, full_hi, BLOCK_M)
    qk_scale = score_scale(sm_scale, softcap, HAS_SOFTCAP)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = hk * group + g
        bh = b * n_heads + h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + bh)
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dos
        l_off = b.to(tl.int64) * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_ls
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, MROW + l_off, ILROW + l_off, DELTA + l_off,
                             stride_qs, stride_dos, stride_ls, offs_n, offs_d, d_ok, sq, sk, off, window_left,
                             window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, m_lo, m_full_start,
                             slope, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, MROW + l_off, ILROW + l_off, DELTA + l_off,
                             stride_qs, stride_dos, stride_ls, offs_n, offs_d, d_ok, sq, sk, off, window_left,
                             window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, m_full_start, m_full_end,
                             slope, False, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, MROW + l_off, ILROW + l_off, DELTA + l_off,
                             stride_qs, stride_dos, stride_ls, offs_n, offs_d, d_ok, sq, sk, off, window_left,
                             window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, m_full_end, m_hi,
                             slope, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_M)
    dk = dk * sm_scale
    dk_ptrs = DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + (k_start + offs_n)[:, None].to(tl.int64) * stride_dks
    dv_ptrs = DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + (k_start + offs_n)[:, None].to(tl.int64) * stride_dvs
    tl.store(dk_ptrs + offs_d[None, :], lowp(dk, DK.dtype.element_ty, UPCAST).to(DK.dtype.element_ty),
             mask=kv_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptrs + offs_d[None, :], lowp(dv, DV.dtype.element_ty, UPCAST).to(DV.dtype.element_ty),
             mask=kv_ok[:, None] & d_ok[None, :])


@triton.jit
def _dq_inner(dq, q, do, m_row, il_row, delta, k_base, v_base, stride_ks, stride_vs, rows, qa, offs_d, d_ok, sk,
              window_left, window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, n_start, n_end, slope,
              MASKED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Accumulate dq (BM, D) over key blocks [n_start, n_end)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for n in range(n_start, n_end, BLOCK_N):
        cols = n + offs_nb
        if MASKED:
            kv_ok = cols < sk
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, D)
            vT = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None],
                         mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # (D, BN)
        else:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            vT = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s, c = _scores(mm(q, tl.trans(k), UPCAST, DOT_PREC), qk_scale, softcap, HAS_SOFTCAP)  # (BM, BN)
        if HAS_ALIBI:
            s += alibi_bias(slope, qa[:, None], cols[None, :])
        p = tl.exp2(s - m_row[:, None]) * il_row[:, None]
        if MASKED:
            ok = visible_mask(qa[:, None], cols[None, :], sk, window_left, window_right, prefix, BAND, HAS_PREFIX)
            p = tl.where(ok, p, 0.0)
        dp = mm(do, vT, UPCAST, DOT_PREC)  # (BM, BN)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh, rows[:, None], cols[None, :], sk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None]) * c
        dq += mm(lowp(ds, k.dtype, UPCAST), k, UPCAST, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "seed"])
def _dq_kernel(
    Q, K, V, DO, MROW, ILROW, DELTA, DQ, CU_Q, CU_K, SEQUSED_K, PREFIX, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, n_heads, group, head_dim,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, BAND: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = heads(bh, n_heads, group)
    q_start, sq, k_start, sk = seq_bounds(CU_Q, CU_K, SEQUSED_K, b, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED)
    m0 = start_m * BLOCK_M
    if m0 >= sq:
        return
    rows, offs_d, q_ok, d_ok = row_tile(m0, sq, head_dim, BLOCK_M, BLOCK_D)
    q = load_rows(Q, b, stride_qb, h, stride_qh, q_start, rows, stride_qs, offs_d, q_ok, d_ok)  # (BM, D)
    do = load_rows(DO, b, stride_dob, h, stride_doh, q_start, rows, stride_dos, offs_d, q_ok, d_ok)  # (BM, D)
    l_off = b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + rows).to(tl.int64) * stride_ls
    m_row = tl.load(MROW + l_off, mask=q_ok, other=0.0)
    il_row = tl.load(ILROW + l_off, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + l_off, mask=q_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vs

    off = sk - sq
    qa = rows + off
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + bh)
    prefix = prefix_len(PREFIX, b, sk, HAS_PREFIX)
    n_lo, n_full_start, n_full_end, hi = key_block_ranges(m0, sq, sk, window_left, window_right, prefix,
                                                          BAND, HAS_PREFIX, BLOCK_M, BLOCK_N)
    qk_scale = score_scale(sm_scale, softcap, HAS_SOFTCAP)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(dq, q, do, m_row, il_row, delta, k_base, v_base, stride_ks, stride_vs, rows, qa, offs_d, d_ok,
                   sk, window_left, window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, n_lo, n_full_start,
                   slope, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    dq = _dq_inner(dq, q, do, m_row, il_row, delta, k_base, v_base, stride_ks, stride_vs, rows, qa, offs_d, d_ok,
                   sk, window_left, window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, n_full_start,
                   n_full_end, slope, False, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    dq = _dq_inner(dq, q, do, m_row, il_row, delta, k_base, v_base, stride_ks, stride_vs, rows, qa, offs_d, d_ok,
                   sk, window_left, window_right, prefix, qk_scale, softcap, dropout_p, seed, bh, n_full_end, hi,
                   slope, True, BAND, HAS_PREFIX, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    dq = dq * sm_scale
    dq_ptrs = DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + (q_start + rows)[:, None].to(tl.int64) * stride_dqs
    tl.store(dq_ptrs + offs_d[None, :], lowp(dq, DQ.dtype.element_ty, UPCAST).to(DQ.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])


def _bwd_configs():
    return [as_config(bm, bn, w, s) for bm, bn, w, s in [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)]]


_KEY = ["BLOCK_D", "BAND", "HAS_PREFIX", "HAS_SOFTCAP", "HAS_DROPOUT", "IS_VARLEN", "HAS_ALIBI"]
if not AUTOTUNE:
    _dkdv, _dq = _dkdv_kernel, _dq_kernel
else:
    _tune = {"configs": _bwd_configs(), "key": _KEY,
             "prune_configs_by": {"early_config_prune": functools.partial(prune_tiles, "bwd")}}
    _dkdv = triton.autotune(**_tune)(_dkdv_kernel)
    _dq = triton.autotune(**_tune)(_dq_kernel)


def attn_bwd(do, q, k, v, out, stats, p):
    """Gradients (dq, dk, dv) of the forward with params ``p``; ``stats`` as :func:`attn_fwd` returned them."""
    m_row, il_row = stats
    varlen = p.cu_seqlens_q is not None
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv = k.shape[-2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    # δ_i = do_i·o_i, laid out like lse.
    f32 = torch.float32
    delta = ((do if do.dtype == f32 else do.float()) * (out if out.dtype == f32 else out.float())).sum(-1)  # (B, Sq, H) or (T, H)
    delta = delta.transpose(-1, -2).contiguous()  # (B, H, Sq) or (H, T)
    lse_strides = (0, m_row.stride(0), m_row.stride(1)) if varlen else m_row.stride()
    batch = p.cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if INTERPRET:  # poisoned so an unwritten element shows up in tests
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    else:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dummy = p.dummy_int(q.device)
    common = [
        p.cu_seqlens_q if varlen else dummy, p.cu_seqlens_k if varlen else dummy,
        p.seqused_k if p.seqused_k is not None else dummy, p.prefix if p.prefix is not None else dummy,
        p.alibi if p.alibi is not None else dummy,
        *strides3(q, varlen), *strides3(k, varlen), *strides3(v, varlen), *strides3(do, varlen),
    ]
    scalars = [p.scale, p.softcap if p.softcap > 0 else 1.0, p.window_left, p.window_right, p.dropout_p, p.seed]
    flags = dict(
        IS_VARLEN=varlen, HAS_SEQUSED=p.seqused_k is not None, BAND=p.band, HAS_PREFIX=p.prefix is not None,
        HAS_SOFTCAP=p.softcap > 0, HAS_DROPOUT=p.dropout_p > 0, HAS_ALIBI=p.alibi is not None,
        UPCAST=upcast(q.dtype),
        DOT_PREC=dot_precision(q.dtype), BLOCK_D=block_d(head_dim), **launch_meta("bwd", head_dim, q.dtype),
    )
    _dkdv[lambda meta: (cdiv(p.max_seqlen_k, meta["BLOCK_N"]), batch * n_kv)](
        q, k, v, do, m_row, il_row, delta, dk, dv, *common, *strides3(dk, varlen), *strides3(dv, varlen), *lse_strides,
        p.max_seqlen_q, p.max_seqlen_k, n_heads, n_kv, n_heads // n_kv, head_dim, *scalars, **flags,
    )
    _dq[lambda meta: (cdiv(p.max_seqlen_q, meta["BLOCK_M"]), batch * n_heads)](
        q, k, v, do, m_row, il_row, delta, dq, *common, *strides3(dq, varlen), *lse_strides,
        p.max_seqlen_q, p.max_seqlen_k, n_heads, n_heads // n_kv, head_dim, *scalars, **flags,
    )
    return dq, dk, dv
