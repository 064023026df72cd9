"""flash-attn 2.8's interface, called exactly as flash-attn's docs and tests call it (positional and keyword),
against an oracle written here (fp64), bounded by PyTorch's own error in the same dtype (x2).

Covers ALiBi (causal / not, dense, varlen, kv cache), the packed forms, ``window_size`` as a tensor,
``deterministic`` (bitwise-equal backward), ``return_attn_probs``, and ``flash_attn_with_kvcache`` with
flash-attn's defaults, rotary (interleaved / GPT-NeoX), a paged cache, ``cache_batch_idx``, ``cache_leftpad``
and ``return_softmax_lse``; the ``mmfast.compat.flash_attn`` namespace and its ``bert_padding``.
"""
import inspect
import math

import pytest
import torch

from mmfast.compat import flash_attn
from mmfast.compat.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from mmfast.compat.flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
from mmfast.testing import assert_error_bound


# --------------------------------------------------------------------------- the oracle (written here)
def _attn_row(q, k, v, *, causal=False, window=(-1, -1), slopes=None, softcap=0.0, scale=None):
    """One sequence: q (Sq, H, D), k/v (Sk, Hk, D) -> out (Sq, H, D), lse (H, Sq). Computes in q's dtype with
    fp32 (or fp64) scores, as eager attention does; fp64 inputs give the oracle."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("qhd,khd->hqk", q, k).to(acc) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    qa = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    if slopes is not None:
        s = s - slopes.to(acc)[:, None, None] * (qa - j).abs().to(acc)
    ok = torch.ones(sq, sk, dtype=torch.bool)
    wl, wr = (int(w) for w in window)
    if causal:
        wr = 0
    if wl >= 0:
        ok &= j >= qa - wl
    if wr >= 0:
        ok &= j <= qa + wr
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hqk,khd->qhd", p.to(q.dtype), v)
    return out, lse


def _attn_batch(q, k, v, slopes=None, **kw):
    """(B, Sq, H, D) over (B, Sk, Hk, D); slopes (H,) or (B, H)."""
    outs, lses = [], []
    for i in range(q.shape[0]):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[i])
        o, lse = _attn_row(q[i], k[i], v[i], slopes=sl, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _randn(shape, dtype, gen, requires_grad=False):
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def _check_fwd_bwd(kernel, oracle, inputs, dout, names=("q", "k", "v")):
    """out and every gradient of ``kernel`` within 2x of ``oracle`` in the inputs' dtype, against fp64."""
    out = kernel(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = oracle(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    low_in = [t.detach().clone().requires_grad_() for t in inputs]
    low = oracle(*low_in)
    low_grads = torch.autograd.grad(low, low_in, dout)
    assert_error_bound(out, ref, low, name="out")
    for name, g, r, lg in zip(names, grads, ref_grads, low_grads):
        assert_error_bound(g, r, lg, name=f"d{name}")


# --------------------------------------------------------------------------- signatures
FLASH_ATTN_28 = {  # flash-attn 2.8's public parameters, in order, with defaults
    "flash_attn_func": "q k v dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                       "alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_qkvpacked_func": "qkv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) "
                                 "softcap=0.0 alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_kvpacked_func": "q kv dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) "
                                "softcap=0.0 alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                              "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                              "deterministic=False return_attn_probs=False block_table=None",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p=0.0 softmax_scale=None causal=False "
                                        "window_size=(-1, -1) softcap=0.0 alibi_slopes=None deterministic=False "
                                        "return_attn_probs=False",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                                       "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                                       "alibi_slopes=None deterministic=False return_attn_probs=False",
    "flash_attn_with_kvcache": "q k_cache v_cache k=None v=None rotary_cos=None rotary_sin=None cache_seqlens=None "
                               "cache_batch_idx=None cache_leftpad=None block_table=None softmax_scale=None "
                               "causal=False window_size=(-1, -1) softcap=0.0 rotary_interleaved=True "
                               "alibi_slopes=None num_splits=0 return_softmax_lse=False",
}


@pytest.mark.parametrize("name", list(FLASH_ATTN_28))
def test_signature_is_flash_attn_28(name):
    params = list(inspect.signature(getattr(flash_attn, name)).parameters.values())
    ours = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    rendered = " ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in ours)
    assert rendered == FLASH_ATTN_28[name].replace("(-1, -1)", repr((-1, -1)))
    # Everything else is mmfast's, keyword-only.
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(ours):])
    assert getattr(flash_attn.flash_attn_interface, name) is getattr(flash_attn, name)


# --------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_dense_positional_call(causal, dtype, triton_backend):
    gen = torch.Generator().manual_seed(11)
    b, sq, sk, h, hk, d = 2, 37, 45, 4, 2, 32
    q = _randn((b, sq, h, d), dtype, gen, True)
    k = _randn((b, sk, hk, d), dtype, gen, True)
    v = _randn((b, sk, hk, d), dtype, gen, True)
    slopes = torch.rand((b, h), generator=gen) * 0.3
    dout = _randn((b, sq, h, d), dtype, gen)
    # flash-attn's positional order: dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    # deterministic, return_attn_probs.
    out, lse, s_dmask = flash_attn_func(q, k, v, 0.0, None, causal, (-1, -1), 0.0, slopes, False, True,
                                        backend=triton_backend)
    assert s_dmask.numel() == 0  # flash-attn returns S_dmask only with dropout
    ref_out, ref_lse = _attn_batch(q.detach().double(), k.detach().double(), v.detach().double(), slopes,
                                   causal=causal)
    low_out, low_lse = _attn_batch(q.detach(), k.detach(), v.detach(), slopes, causal=causal)
    assert_error_bound(out, ref_out, low_out, name="out")
    assert_error_bound(lse, ref_lse.float(), low_lse, name="lse", atol=1e-5)
    _check_fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes,
                                                   backend=triton_backend),
                   lambda q, k, v: _attn_batch(q, k, v, slopes, causal=causal)[0], (q, k, v), dout)


def test_alibi_head_slopes_window_softcap(triton_backend):
    gen = torch.Generator().manual_seed(12)
    b, s, h, d = 1, 70, 2, 48
    q, k, v = (_randn((b, s, h, d), torch.bfloat16, gen, True) for _ in range(3))
    slopes = torch.tensor([0.5, 0.0625])
    dout = _randn((b, s, h, d), torch.bfloat16, gen)
    kw = {"window_size": (21, 6), "softcap": 5.0}
    _check_fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=slopes, backend=triton_backend, **kw),
                   lambda q, k, v: _attn_batch(q, k, v, slopes, window=(21, 6), softcap=5.0)[0], (q, k, v), dout)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_varlen(causal, triton_backend):
    gen = torch.Generator().manual_seed(13)
    lens_q, lens_k, h, hk, d = [5, 33, 1], [9, 40, 17], 4, 1, 32
    dtype = torch.float16
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = _randn((sum(lens_q), h, d), dtype, gen, True)
    k = _randn((sum(lens_k), hk, d), dtype, gen, True)
    v = _randn((sum(lens_k), hk, d), dtype, gen, True)
    slopes = torch.rand((3, h), generator=gen) * 0.5
    dout = _randn(q.shape, dtype, gen)

    def oracle(q, k, v):
        return torch.cat([_attn_row(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]],
                                    slopes=slopes[i], causal=causal)[0] for i in range(3)])

    _check_fwd_bwd(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, None,
                                                          causal, (-1, -1), 0.0, slopes, backend=triton_backend),
                   oracle, (q, k, v), dout)


# --------------------------------------------------------------------------- window_size forms, determinism
def test_window_size_tensor_list_tuple(triton_backend):
    gen = torch.Generator().manual_seed(14)
    q, k, v = (_randn((1, 40, 2, 32), torch.float16, gen) for _ in range(3))
    outs = [flash_attn_func(q, k, v, window_size=w, backend=triton_backend)
            for w in ((7, 3), [7, 3], torch.tensor([7, 3]), torch.randint(7, 8, (2,)) - torch.tensor([0, 4]))]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    ref = _attn_batch(q.double(), k.double(), v.double(), window=(7, 3))[0]
    low = _attn_batch(q, k, v, window=(7, 3))[0]
    assert_error_bound(outs[0], ref, low)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=torch.tensor([1, 2, 3]))


def test_deterministic_backward_is_bitwise_reproducible(triton_backend):
    gen = torch.Generator().manual_seed(15)
    q = _randn((2, 50, 4, 32), torch.bfloat16, gen, True)
    k = _randn((2, 50, 1, 32), torch.bfloat16, gen, True)  # MQA: 4 query heads reduce into one dk/dv
    v = _randn((2, 50, 1, 32), torch.bfloat16, gen, True)
    dout = _randn(q.shape, torch.bfloat16, gen)
    slopes = torch.rand(4, generator=gen)
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, slopes, True, backend=triton_backend)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


# --------------------------------------------------------------------------- packed forms, return_attn_probs
def test_packed_forms_equal_unpacked(triton_backend):
    gen = torch.Generator().manual_seed(16)
    qkv = _randn((2, 33, 3, 2, 32), torch.float16, gen, True)
    out = flash_attn_qkvpacked_func(qkv, 0.0, None, True, backend=triton_backend)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    plain = flash_attn_func(q, k, v, causal=True, backend=triton_backend)
    assert torch.equal(out, plain)
    dout = _randn(out.shape, torch.float16, gen)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(plain, (q, k, v), dout), dim=2))

    kv = qkv.detach()[:, :, 1:].clone().requires_grad_()
    out = flash_attn_kvpacked_func(q, kv, causal=True, backend=triton_backend)
    assert torch.equal(out, plain)

    cu = torch.tensor([0, 10, 33], dtype=torch.int32)
    flat = qkv.detach()[0]  # (33, 3, 2, 32) as (total, 3, H, D)
    out = flash_attn_varlen_qkvpacked_func(flat, cu, 23, causal=True, backend=triton_backend)
    ref = flash_attn_varlen_func(flat[:, 0], flat[:, 1], flat[:, 2], cu, cu, 23, 23, causal=True,
                                 backend=triton_backend)
    assert torch.equal(out, ref)
    out = flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, 23, 23, 0.0, None, True,
                                          backend=triton_backend)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="qkv must be 5-D"):
        flash_attn_qkvpacked_func(flat)


def test_return_attn_probs_with_dropout(triton_backend):
    gen = torch.Generator().manual_seed(17)
    q, k, v = (_randn((1, 20, 2, 16), torch.float32, gen) for _ in range(3))
    out, lse, s_dmask = flash_attn_func(q, k, v, 0.25, None, True, return_attn_probs=True, dropout_seed=5,
                                        backend=triton_backend)
    assert s_dmask.shape == (1, 2, 20, 20) and s_dmask.dtype == q.dtype and lse.shape == (1, 2, 20)
    from mmfast.ops.attention import dropout_keep_reference

    keep = dropout_keep_reference(5, torch.arange(2), 20, 20, 0.25, "cpu")[None]
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    assert ((s_dmask < 0) == (~keep & causal)).all()  # negative = dropped, as flash-attn encodes it
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(s_dmask.abs().double(), p, rtol=1e-5, atol=1e-6)
    # out is the kept probabilities (scaled by 1/(1-p)) times v.
    manual = torch.einsum("bhqk,bkhd->bqhd", s_dmask.clamp(min=0).double() / 0.75, v.double())
    torch.testing.assert_close(out.double(), manual, rtol=1e-4, atol=1e-5)
    # varlen: (batch, H, max_seqlen_q, max_seqlen_k), each sequence top-left, the same entries per sequence.
    cu = torch.tensor([0, 20, 32], dtype=torch.int32)
    qv, kv_, vv = (torch.cat([t[0], t[0, :12]]) for t in (q, k, v))
    _o, lse_v, s_v = flash_attn_varlen_func(qv, kv_, vv, cu, cu, 20, 20, 0.25, None, True, return_attn_probs=True,
                                            dropout_seed=5, backend=triton_backend)
    assert s_v.shape == (2, 2, 20, 20) and lse_v.shape == (2, 32)
    assert torch.equal(s_v[0], s_dmask[0]) and (s_v[1, :, 12:] == 0).all() and (s_v[1, :, :, 12:] == 0).all()
    keep1 = dropout_keep_reference(5, torch.arange(2, 4), 12, 12, 0.25, "cpu")  # sequence 1's heads, its length
    assert ((s_v[1, :, :12, :12] < 0) == (~keep1 & causal[:12, :12])).all()


def test_alibi_bad_values_name_the_argument():
    q = torch.randn(2, 8, 4, 16)
    with pytest.raises(TypeError, match="alibi_slopes must be float32"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(2, 4\)"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(3))


# --------------------------------------------------------------------------- kv cache
def _rotary(x, cos, sin, pos, interleaved):
    """Rotary embedding written out here: x (B, S, H, D) at positions pos (B, S)."""
    rd = 2 * cos.shape[1]
    out = x.double().clone()
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            c, sn = cos[pos[b, s]].double(), sin[pos[b, s]].double()
            for i in range(rd // 2):
                a, bb = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
                x1, x2 = x[b, s, :, a].double(), x[b, s, :, bb].double()
                out[b, s, :, a] = x1 * c[i] - x2 * sn[i]
                out[b, s, :, bb] = x1 * sn[i] + x2 * c[i]
    return out.to(x.dtype)


def _kvcache_oracle(q, k_rows, v_rows, starts, ends, slopes=None, **kw):
    """Per batch row: attend q[b] over keys starts[b]:ends[b] of the (logical, contiguous) cache rows."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, lse = _attn_row(q[b], k_rows[b, starts[b]:ends[b]], v_rows[b, starts[b]:ends[b]], slopes=sl, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def test_kvcache_flash_attn_defaults(triton_backend):
    """cache_seqlens=None attends over the whole cache; causal defaults to False."""
    gen = torch.Generator().manual_seed(18)
    q = _randn((2, 3, 4, 32), torch.float16, gen)
    kc, vc = (_randn((2, 41, 2, 32), torch.float16, gen) for _ in range(2))
    out, lse = flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, backend=triton_backend)
    starts, ends = [0, 0], [41, 41]
    ref, ref_lse = _kvcache_oracle(q.double(), kc.double(), vc.double(), starts, ends)
    low, low_lse = _kvcache_oracle(q, kc, vc, starts, ends)
    assert_error_bound(out, ref, low)
    assert_error_bound(lse, ref_lse.float(), low_lse, name="lse", atol=1e-5)
    # An int cache_seqlens means every row's length.
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=17, backend=triton_backend)
    ref = _kvcache_oracle(q.double(), kc.double(), vc.double(), [0, 0], [17, 17])[0]
    assert_error_bound(out, ref, _kvcache_oracle(q, kc, vc, [0, 0], [17, 17])[0])


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kvcache_rotary_paged_alibi(interleaved, causal, triton_backend):
    """flash-attn's test_flash_attn_kvcache on a small scale: a paged cache with a shuffled block table,
    new k/v appended (k rotated), q rotated, ALiBi; positional arguments in flash-attn's order."""
    gen = torch.Generator().manual_seed(19 + interleaved + 2 * causal)
    dtype = torch.bfloat16
    b, sq, h, hk, d, page, n_pages_row = 2, 3, 4, 2, 32, 16, 3
    seqlen_k = page * n_pages_row
    num_pages = b * n_pages_row + 2
    k_pages, v_pages = (_randn((num_pages, page, hk, d), dtype, gen) for _ in range(2))
    block_table = torch.randperm(num_pages, generator=gen)[: b * n_pages_row].reshape(b, n_pages_row).to(torch.int32)
    cache_seqlens = torch.tensor([5, 44], dtype=torch.int32)
    q = _randn((b, sq, h, d), dtype, gen)
    k, v = (_randn((b, sq, hk, d), dtype, gen) for _ in range(2))
    angle = torch.rand((seqlen_k, 8), generator=gen) * 2 * math.pi  # rotary_dim 16 of 32
    cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    slopes = torch.rand((b, h), generator=gen) * 0.3
    # Logical (contiguous) copies of each row's cache, then the reference append.
    k_rows = k_pages[block_table.long()].reshape(b, seqlen_k, hk, d).clone()
    v_rows = v_pages[block_table.long()].reshape(b, seqlen_k, hk, d).clone()
    pos_k = cache_seqlens.long()[:, None] + torch.arange(sq)
    pos_q = pos_k if causal else cache_seqlens.long()[:, None].expand(b, sq)
    k_ro = _rotary(k, cos, sin, pos_k, interleaved)
    q_ro = _rotary(q, cos, sin, pos_q, interleaved)
    for i in range(b):
        k_rows[i, pos_k[i]] = k_ro[i]
        v_rows[i, pos_k[i]] = v[i]

    out = flash_attn_with_kvcache(q, k_pages, v_pages, k, v, cos, sin, cache_seqlens, None, None, block_table,
                                  None, causal, (-1, -1), 0.0, interleaved, slopes, 0, backend=triton_backend)
    ends = (cache_seqlens + sq).tolist()
    ref = _kvcache_oracle(q_ro.double(), k_rows.double(), v_rows.double(), [0, 0], ends, slopes, causal=causal)[0]
    low = _kvcache_oracle(q_ro, k_rows, v_rows, [0, 0], ends, slopes, causal=causal)[0]
    assert_error_bound(out, ref, low)
    # The pages now hold the rotated new keys and the new values at their logical positions.
    got_k = k_pages[block_table.long()].reshape(b, seqlen_k, hk, d)
    got_v = v_pages[block_table.long()].reshape(b, seqlen_k, hk, d)
    torch.testing.assert_close(got_k.float(), k_rows.float(), rtol=0, atol=1e-2)
    assert torch.equal(got_v, v_rows)


def test_kvcache_paged_reads_the_same_as_contiguous(triton_backend):
    gen = torch.Generator().manual_seed(23)
    b, h, d, page = 3, 2, 32, 8
    kc, vc = (_randn((b, 40, h, d), torch.float16, gen) for _ in range(2))
    q = _randn((b, 1, h, d), torch.float16, gen)
    lens = torch.tensor([40, 1, 23], dtype=torch.int32)
    n = 40 // page
    perm = torch.randperm(b * n, generator=gen)
    pages_k = torch.empty((b * n, page, h, d), dtype=torch.float16)
    pages_v = torch.empty_like(pages_k)
    pages_k[perm] = kc.reshape(b * n, page, h, d)
    pages_v[perm] = vc.reshape(b * n, page, h, d)
    table = perm.reshape(b, n).to(torch.int32)
    contiguous = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=triton_backend)
    paged = flash_attn_with_kvcache(q, pages_k, pages_v, cache_seqlens=lens, block_table=table,
                                    backend=triton_backend)
    assert torch.equal(paged, contiguous)


def test_kvcache_leftpad_batch_idx_alibi(triton_backend):
    gen = torch.Generator().manual_seed(24)
    dtype = torch.float16
    b, sq, h, d, smax = 3, 4, 2, 32, 50
    kc, vc = (_randn((5, smax, h, d), dtype, gen) for _ in range(2))  # 5 cache rows, 3 in use
    q = _randn((b, sq, h, d), dtype, gen)
    k, v = (_randn((b, sq, h, d), dtype, gen) for _ in range(2))
    cache_seqlens = torch.tensor([10, 30, 4], dtype=torch.int32)
    cache_leftpad = torch.tensor([3, 0, 4], dtype=torch.int32)
    cache_batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    slopes = torch.tensor([0.25, 0.125])
    rows_k = kc[cache_batch_idx.long()].clone()
    rows_v = vc[cache_batch_idx.long()].clone()
    for i in range(b):
        rows_k[i, cache_seqlens[i]:cache_seqlens[i] + sq] = k[i]
        rows_v[i, cache_seqlens[i]:cache_seqlens[i] + sq] = v[i]
    untouched = kc[[1, 3]].clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                                       cache_leftpad=cache_leftpad, causal=True, alibi_slopes=slopes,
                                       return_softmax_lse=True, backend=triton_backend)
    starts, ends = cache_leftpad.tolist(), (cache_seqlens + sq).tolist()
    ref, ref_lse = _kvcache_oracle(q.double(), rows_k.double(), rows_v.double(), starts, ends, slopes, causal=True)
    low, low_lse = _kvcache_oracle(q, rows_k, rows_v, starts, ends, slopes, causal=True)
    assert_error_bound(out, ref, low)
    assert_error_bound(lse, ref_lse.float(), low_lse, name="lse", atol=1e-5)
    assert torch.equal(kc[cache_batch_idx.long()], rows_k) and torch.equal(vc[cache_batch_idx.long()], rows_v)
    assert torch.equal(kc[[1, 3]], untouched)


def test_kvcache_bad_values_name_the_argument():
    q = torch.randn(2, 1, 2, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k = v = torch.randn(2, 1, 2, 16)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=-1)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([2, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        flash_attn_with_kvcache(q, kc, vc, k, v)
    with pytest.raises(ValueError, match="cache_batch_idx must index"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, cache_leftpad=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="rotary_cos/rotary_sin rotate the new keys"):
        flash_attn_with_kvcache(q, kc, vc, rotary_cos=torch.ones(8, 4), rotary_sin=torch.ones(8, 4), cache_seqlens=1)
    with pytest.raises(ValueError, match="rotary_cos/rotary_sin have 2 positions"):
        flash_attn_with_kvcache(q, kc, vc, k, v, torch.ones(2, 4), torch.ones(2, 4), cache_seqlens=3)
    pages = torch.randn(4, 4, 2, 16)
    with pytest.raises(ValueError, match="block_table must be a 2-D integer tensor"):
        flash_attn_with_kvcache(q, pages, pages, cache_seqlens=3, block_table=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table has 1 rows but the batch has 2"):
        flash_attn_with_kvcache(q, pages, pages, cache_seqlens=3, block_table=torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 7 is not a page index in 0..3"):
        flash_attn_with_kvcache(q, pages, pages, cache_seqlens=torch.tensor([3, 6], dtype=torch.int32),
                                block_table=torch.tensor([[0, 9], [1, 7]], dtype=torch.int32))
    before = pages.clone()
    with pytest.raises(ValueError, match="block_table has room for 8 tokens"):  # flash-attn: match="block_table"
        flash_attn_with_kvcache(q, pages, pages.clone(), k, v, cache_seqlens=8,
                                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    assert torch.equal(pages, before)  # nothing written
    with pytest.raises(ValueError, match="cache_batch_idx cannot be combined with block_table"):
        flash_attn_with_kvcache(q, pages, pages, cache_seqlens=3, cache_batch_idx=torch.tensor([0, 1]),
                                block_table=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, num_splits=-1)


def test_varlen_block_table_forward(triton_backend):
    """flash_attn_varlen_func(block_table=...): keys read from pages, as the contiguous call computes."""
    gen = torch.Generator().manual_seed(25)
    lens_k, h, d, page = [20, 9], 2, 32, 8
    cu_q = torch.tensor([0, 3, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 29], dtype=torch.int32)
    q = _randn((4, h, d), torch.float16, gen)
    k, v = (_randn((29, h, d), torch.float16, gen) for _ in range(2))
    pages_k = torch.zeros((7, page, h, d), dtype=torch.float16)
    pages_v = torch.zeros_like(pages_k)
    table = torch.tensor([[5, 0, 3], [6, 2, 0]], dtype=torch.int32)
    for i in range(2):
        for t in range(lens_k[i]):
            pages_k[table[i, t // page], t % page] = k[cu_k[i] + t]
            pages_v[table[i, t // page], t % page] = v[cu_k[i] + t]
    ref = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 20, causal=True, backend=triton_backend)
    out = flash_attn_varlen_func(q, pages_k, pages_v, cu_q, cu_k, 3, 20, causal=True, block_table=table,
                                 backend=triton_backend)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- bert_padding + varlen
def test_bert_padding_round_trip_with_varlen(triton_backend):
    """The flash-attn recipe: unpad, varlen attention, pad back = attention with a key padding mask."""
    gen = torch.Generator().manual_seed(26)
    b, s, h, d = 3, 30, 2, 32
    x = _randn((b, s, 3, h, d), torch.float16, gen)
    lengths = torch.tensor([30, 7, 19])
    mask = torch.arange(s)[None, :] < lengths[:, None]
    qkv_unpad, indices, cu, max_s, seqused = unpad_input(x, mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 30, 37, 56] and max_s == 30
    assert seqused.tolist() == [30, 7, 19] and qkv_unpad.shape == (56, 3, h, d)
    torch.testing.assert_close(index_first_axis(x.reshape(b * s, 3, h, d), indices), qkv_unpad, rtol=0, atol=0)
    out_unpad = flash_attn_varlen_qkvpacked_func(qkv_unpad, cu, max_s, 0.0, None, True, backend=triton_backend)
    out = pad_input(out_unpad, indices, b, s)
    assert out.shape == (b, s, h, d) and (out[~mask] == 0).all()
    for i, n in enumerate(lengths.tolist()):
        xi = x[i, :n]
        ref = _attn_row(*(t.double() for t in xi.unbind(1)), causal=True)[0]
        low = _attn_row(*xi.unbind(1), causal=True)[0]
        assert_error_bound(out[i, :n], ref, low, name=f"row {i}")
