"""The ``cpp`` attention backend (csrc/attention_kvcache.cpp): ``flash_attn_with_kvcache`` and
``flash_attn_varlen_func`` (packed, no block table) on CPU.

Each case compares out and lse with the reference backend run in fp64, using the reference backend in the
inputs' dtype (PyTorch's own attention composition) as the yardstick (mmfast.testing.assert_error_bound:
at most 2x its error). Cache slots outside each row's range hold NaN (a kernel that reads them fails), and
the output is checked for unwritten entries (NaN/inf) by assert_error_bound.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.ops import BackendUnavailableError
from mmfast.ops._attention_call import ATTENTION_OP, _facts, _params
from mmfast.ops._dispatch import fake_env
from mmfast.ops.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from mmfast.testing import assert_error_bound

_CPP = ATTENTION_OP.backend("cpp")
_WHY = _CPP.reasons(_facts(*(torch.zeros(1, 1, 1, 8),) * 2, _params(
    torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), None, True, (-1, -1), 0.0, 0.0, 0, 1, 1, None,
    seqused_k=torch.ones(1, dtype=torch.int32)), False, False))
pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"cpp backend unavailable: {_WHY}")


def _case(layout, b, sq, h, hk, d, dtype, leftpad, seed=0, page=8):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 30, (b,), generator=g, dtype=torch.int32)
    kw = {}
    if layout == "paged":
        n_pages = b * 5 + 3
        kc = torch.full((n_pages, page, hk, d), float("nan"), dtype=torch.float64)
        kw["block_table"] = torch.randperm(n_pages, generator=g)[: b * 5].reshape(b, 5).to(torch.int32)
        rows = [kw["block_table"][i] for i in range(b)]
    else:
        n_rows = b + 2 if layout == "batch_idx" else b
        kc = torch.full((n_rows, 40, hk, d), float("nan"), dtype=torch.float64)
        if layout == "batch_idx":
            kw["cache_batch_idx"] = torch.randperm(n_rows, generator=g)[:b].to(torch.int32)
    vc = kc.clone()
    for i, n in enumerate(lens.tolist()):  # fill only the slots in use: the rest stays NaN
        for t in range(n):
            if layout == "paged":
                at = (int(rows[i][t // page]), t % page)
            else:
                at = (int(kw["cache_batch_idx"][i]) if layout == "batch_idx" else i, t)
            kc[at] = torch.randn(hk, d, generator=g, dtype=torch.float64)
            vc[at] = torch.randn(hk, d, generator=g, dtype=torch.float64)
    if leftpad:
        kw["cache_leftpad"] = (lens * torch.rand(b, generator=g)).to(torch.int32)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    return q, kc, vc, lens, kw


def _check(q, kc, vc, lens, kw, dtype, **call):
    args = dict(cache_seqlens=lens, return_softmax_lse=True, **kw, **call)
    ref, ref_lse = flash_attn_with_kvcache(q, kc, vc, backend="reference", **args)
    low_in = [t.to(dtype) for t in (q, kc, vc)]
    low, low_lse = flash_attn_with_kvcache(*low_in, backend="reference", **args)
    out, lse = flash_attn_with_kvcache(*low_in, backend="cpp", **args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_error_bound(out, ref, low, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_error_bound(lse[finite], ref_lse[finite].float(), low_lse[finite], name="lse")


@pytest.mark.parametrize("layout,sq,gqa,leftpad", [
    c for c in itertools.product(["paged", "rows", "batch_idx"], [1, 3], [1, 2, 4], [False, True])
    if not (c[1] == 3 and c[2] == 2)])
def test_kvcache_layouts(layout, sq, gqa, leftpad):
    q, kc, vc, lens, kw = _case(layout, 5, sq, 4, 4 // gqa, 32, torch.float32, leftpad)
    _check(q, kc, vc, lens, kw, torch.float32, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [1, 24, 67, 128])
def test_dtypes_and_odd_head_dims(dtype, d):
    q, kc, vc, lens, kw = _case("paged", 3, 2, 6, 3, d, dtype, False, seed=d, page=5)
    _check(q, kc, vc, lens, kw, dtype, causal=True)


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (4, 0), 0.0), (False, (3, 2), 0.0),
                                                   (True, (-1, -1), 7.0), (False, (-1, -1), 2.0)])
@pytest.mark.parametrize("layout", ["paged", "rows"])
def test_masks_and_softcap(causal, window, softcap, layout):
    q, kc, vc, lens, kw = _case(layout, 4, 3, 4, 2, 16, torch.float32, True, seed=3)
    _check(q, kc, vc, lens, kw, torch.float32, causal=causal, window_size=window, softcap=softcap)


@pytest.mark.parametrize("layout", ["paged", "rows", "batch_idx"])
def test_append_matches_reference(layout):
    """New k/v are appended (by the Python API) and attended: out, lse and the written cache equal the
    reference backend's run of the same call."""
    q, kc, vc, lens, kw = _case(layout, 4, 2, 4, 2, 16, torch.float32, False, seed=5)
    kc, vc, q = kc.float().nan_to_num(), vc.float().nan_to_num(), q.float()
    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(4, 2, 2, 16, generator=g), torch.randn(4, 2, 2, 16, generator=g)
    runs = {}
    for be in ("reference", "cpp"):
        kcb, vcb = kc.clone(), vc.clone()
        out, lse = flash_attn_with_kvcache(q, kcb, vcb, k, v, cache_seqlens=lens, causal=True, backend=be,
                                           return_softmax_lse=True, **kw)
        runs[be] = (out, lse, kcb, vcb)
    for a, b in zip(runs["cpp"], runs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_row_that_sees_no_key_is_zero_with_inf_lse():
    q, kc, vc, lens, kw = _case("rows", 3, 1, 2, 2, 8, torch.float32, False, seed=2)
    kw["cache_leftpad"] = lens.clone()  # every row's range is empty
    out, lse = flash_attn_with_kvcache(q.float(), kc.float(), vc.float(), cache_seqlens=lens, causal=True,
                                       backend="cpp", return_softmax_lse=True, **kw)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isinf(lse).all() and (lse > 0).all()


def test_auto_takes_cpp_for_kvcache_on_cpu_and_refuses_the_rest():
    q, kc, vc, lens, kw = _case("paged", 2, 1, 4, 2, 16, torch.float32, False)
    q, kc, vc = q.float(), kc.float(), vc.float()
    p = _params(q, kc, None, True, (-1, -1), 0.0, 0.0, 0, 1, 40, None, seqused_k=lens,
                block_table=kw["block_table"], page_size=8)
    facts = _facts(q, kc, p, False, False)
    with fake_env(interpret=False):  # as on a machine without TRITON_INTERPRET (the tests set it)
        assert ATTENTION_OP.select(facts) == "cpp"
        assert "* cpp" in "\n".join(ATTENTION_OP.explain(facts))
    with fake_env(interpret=False, cpp_error="not built"):  # no extension: the reference, as before
        assert ATTENTION_OP.select(facts) == "reference"
    x = torch.randn(1, 4, 2, 16)
    with pytest.raises(BackendUnavailableError, match="not a kv-cache or varlen call"):
        flash_attn_func(x, x, x, causal=True, backend="cpp")
    with pytest.raises(BackendUnavailableError, match="ALiBi"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, alibi_slopes=torch.ones(4), backend="cpp", **kw)
    with pytest.raises(BackendUnavailableError, match="float64"):
        flash_attn_with_kvcache(q.double(), kc.double(), vc.double(), cache_seqlens=lens, backend="cpp", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,window,softcap,gqa", [(True, (-1, -1), 0.0, 2), (False, (-1, -1), 0.0, 1),
                                                       (True, (5, 0), 0.0, 1), (True, (-1, -1), 4.0, 4),
                                                       (False, (2, 3), 0.0, 2)])
def test_varlen_packed(dtype, causal, window, softcap, gqa):
    """flash_attn_varlen_func (the engine's prefill): ragged sequences, one empty, unequal q/k lengths."""
    g = torch.Generator().manual_seed(11)
    lq, lk = [7, 1, 0, 19, 12], [7, 4, 3, 19, 20]
    cu_q = torch.tensor([0] + lq).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lk).cumsum(0).to(torch.int32)
    h, d = 4, 40
    q = torch.randn(int(cu_q[-1]), h, d, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), h // gqa, d, generator=g, dtype=torch.float64)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    args = (cu_q, cu_k, max(lq), max(lk))
    kw = {"causal": causal, "window_size": window, "softcap": softcap, "return_lse": True}
    ref, ref_lse = flash_attn_varlen_func(q, k, v, *args, backend="reference", **kw)
    lo = [t.to(dtype) for t in (q, k, v)]
    low, low_lse = flash_attn_varlen_func(*lo, *args, backend="reference", **kw)
    out, lse = flash_attn_varlen_func(*lo, *args, backend="cpp", **kw)
    assert out.dtype == dtype and lse.shape == ref_lse.shape
    assert_error_bound(out, ref, low, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_error_bound(lse[finite], ref_lse[finite].float(), low_lse[finite], name="lse")


def test_long_varlen_is_refused_with_the_reason():
    q = torch.randn(1100, 2, 8)
    cu = torch.tensor([0, 1100], dtype=torch.int32)
    with pytest.raises(BackendUnavailableError, match="longer than 1024"):
        flash_attn_varlen_func(q, q, q, cu, cu, 1100, 1100, causal=True, backend="cpp")
