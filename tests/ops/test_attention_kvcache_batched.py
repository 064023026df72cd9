"""The reference backend's kv-cache path runs all rows at once (mmfast.ops._attention_reference.
_reference_cache_batched): equal to the per-row oracle (one dense reference per row) and blind to what the
cache holds outside each row's range."""
from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.ops import _attention_reference as R
from mmfast.ops.attention import flash_attn_with_kvcache


def _per_row(q, k, v, p):
    outs, lses = [], []
    for i, end in enumerate(p.seqused_k.tolist()):
        start = 0 if p.leftpad is None else int(p.leftpad[i])
        ki, vi = R._cache_row(k, p, i, end)[:, start:], R._cache_row(v, p, i, end)[:, start:]
        o, lse = R._reference_dense(q[i: i + 1], ki, vi, p, i, None, q.shape[2])
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("layout,sq,window,softcap,leftpad,gqa,causal", [
    c for c in itertools.product(["paged", "rows", "batch_idx"], [1, 3], [(-1, -1), (4, 0)], [0.0, 5.0], [False, True],
                                 [1, 2], [True, False])
    if c[2] == (-1, -1) or c[6]])
def test_batched_equals_per_row(layout, sq, window, softcap, leftpad, gqa, causal, monkeypatch):
    g = torch.Generator().manual_seed(0)
    b, h, d = 4, 4, 16
    hk = h // gqa
    lens = torch.tensor([5, 17, 9, 28], dtype=torch.int32)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    kw = {}
    if layout == "paged":
        kc = torch.randn(20, 8, hk, d, generator=g, dtype=torch.float64)
        kw["block_table"] = torch.randperm(20, generator=g)[:16].reshape(4, 4).to(torch.int32)
    else:
        kc = torch.randn(6 if layout == "batch_idx" else 4, 40, hk, d, generator=g, dtype=torch.float64)
        if layout == "batch_idx":
            kw["cache_batch_idx"] = torch.tensor([5, 0, 3, 2], dtype=torch.int32)
    vc = torch.randn(kc.shape, generator=g, dtype=torch.float64)
    if leftpad:
        kw["cache_leftpad"] = torch.tensor([0, 3, 9, 2], dtype=torch.int32)
    args = dict(cache_seqlens=lens, causal=causal, window_size=window, softcap=softcap, backend="reference",
                return_softmax_lse=True, **kw)
    out, lse = flash_attn_with_kvcache(q, kc, vc, **args)
    monkeypatch.setattr(R, "_reference_cache_batched", _per_row)
    ref_out, ref_lse = flash_attn_with_kvcache(q, kc, vc, **args)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_unused_slots_are_never_read():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc = torch.full((2, 20, 2, 16), float("nan"))
    vc = kc.clone()
    kc[:, :5] = torch.randn(2, 5, 2, 16, generator=g)
    vc[:, :5] = torch.randn(2, 5, 2, 16, generator=g)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, backend="reference")
    assert torch.isfinite(out).all()
    clean = flash_attn_with_kvcache(q, kc.nan_to_num(), vc.nan_to_num(), cache_seqlens=lens, causal=True,
                                    backend="reference")
    torch.testing.assert_close(out, clean)
