"""Flash attention kernels against an fp64 reference, bounded by PyTorch's own error in the same dtype.

Under the interpreter the shapes stay tiny (B=1, H=2); the kernels use 32×32 blocks there, so the
odd lengths below cross block edges and exercise every masked/unmasked path.
"""
import pytest
import torch

from mmfast.ops.attention import (
    attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from mmfast.testing import assert_error_bound

LOWP = [torch.float16, torch.bfloat16]


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _check(fn_kernel, fn_ref, q, k, v, dout, lse_ok=None):
    """Compare (out, lse, dq, dk, dv) of ``fn_kernel`` with fp64 ``fn_ref``, bound by ``fn_ref`` in q's dtype."""
    out, lse = fn_kernel(q, k, v)
    grads = _grads(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fn_ref(q64, k64, v64)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double())
    lq, lk, lv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low, low_lse = fn_ref(lq, lk, lv)
    low_grads = _grads(low, (lq, lk, lv), dout)
    assert_error_bound(out, ref, low, name="out")
    sel = slice(None) if lse_ok is None else lse_ok
    assert_error_bound(lse[..., sel], ref_lse[..., sel].float(), low_lse[..., sel], name="lse", atol=1e-5)
    for name, g, r, lg in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_error_bound(g, r, lg, name=name)


def _dense_case(device, backend, dtype, b, sq, sk, h, hk, d, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    q = _rand((b, sq, h, d), dtype, device, gen)
    k = _rand((b, sk, hk, d), dtype, device, gen)
    v = _rand((b, sk, hk, d), dtype, device, gen)
    dout = torch.randn((b, sq, h, d), generator=gen).to(device=device, dtype=dtype)
    _check(
        lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, backend=backend, **kw),
        lambda q, k, v: attention_reference(q, k, v, return_lse=True, **kw),
        q, k, v, dout,
    )


# (sq, sk, h, hk, d, kwargs)
CASES = {
    "S1": (1, 1, 2, 2, 64, {}),
    "S50": (50, 50, 2, 2, 64, {}),
    "S77-d80": (77, 77, 2, 2, 80, {}),
    "S197": (197, 197, 2, 2, 64, {}),
    "S257-d128": (257, 257, 2, 2, 128, {}),
    "S300-causal": (300, 300, 2, 2, 64, {"causal": True}),
    "S300-causal-d80": (300, 300, 2, 2, 80, {"causal": True}),
    "q50-k77": (50, 77, 2, 2, 64, {}),
    "q50-k77-causal": (50, 77, 2, 2, 64, {"causal": True}),
    "q1-k77-causal": (1, 77, 2, 2, 64, {"causal": True}),
    "gqa8-2": (77, 77, 8, 2, 64, {"causal": True}),
    "mqa": (50, 50, 4, 1, 32, {}),
    "window": (130, 130, 2, 2, 64, {"window_size": (20, 7)}),
    "window-causal": (130, 130, 2, 2, 64, {"window_size": (33, -1), "causal": True}),
    "window-right-only": (70, 90, 2, 2, 64, {"window_size": (-1, 5)}),
    "prefix": (150, 150, 2, 2, 64, {"prefix_len": 45}),
    "prefix-window": (150, 150, 2, 2, 80, {"prefix_len": 70, "window_size": (16, -1)}),
    "softcap": (77, 77, 2, 2, 64, {"softcap": 3.0}),
    "softcap-causal": (77, 77, 2, 2, 96, {"softcap": 30.0, "causal": True}),
    "d112-scale": (65, 65, 2, 2, 112, {"softmax_scale": 0.3}),
    "d256": (40, 40, 2, 2, 256, {}),
}


@pytest.mark.parametrize("dtype", LOWP, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dense_matches_reference(case, dtype, device, triton_backend):
    sq, sk, h, hk, d, kw = CASES[case]
    _dense_case(device, triton_backend, dtype, 1, sq, sk, h, hk, d, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOWP, ids=["fp16", "bf16"])
def test_causal_s1000(dtype, device, triton_backend):
    _dense_case(device, triton_backend, dtype, 1, 1000, 1000, 2, 2, 64, causal=True)


def test_fp32_is_full_precision(device, triton_backend):
    _dense_case(device, triton_backend, torch.float32, 1, 77, 77, 2, 2, 80, causal=True)


def test_prefix_per_batch(device, triton_backend):
    _dense_case(device, triton_backend, torch.bfloat16, 3, 70, 70, 2, 2, 64,
                prefix_len=torch.tensor([0, 33, 70], device=device))


def test_empty_rows_are_zero_with_infinite_lse(device, triton_backend):
    # Bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key (flash-attn's convention).
    gen = torch.Generator().manual_seed(1)
    q = _rand((1, 77, 2, 64), torch.float16, device, gen)
    k = _rand((1, 40, 2, 64), torch.float16, device, gen)
    v = _rand((1, 40, 2, 64), torch.float16, device, gen)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend=triton_backend)
    assert (out[:, :37] == 0).all() and torch.isposinf(lse[..., :37]).all()
    dout = torch.randn(out.shape, generator=gen).to(device=device, dtype=torch.float16)
    rows = torch.arange(37, 77)
    _check(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True, backend=triton_backend),
           lambda q, k, v: attention_reference(q, k, v, causal=True, return_lse=True), q, k, v, dout, lse_ok=rows)


# --------------------------------------------------------------------------- varlen
def _varlen_case(device, backend, dtype, lens_q, lens_k, h, hk, d, **kw):
    gen = torch.Generator().manual_seed(3)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = _rand((sum(lens_q), h, d), dtype, device, gen)
    k = _rand((sum(lens_k), hk, d), dtype, device, gen)
    v = _rand((sum(lens_k), hk, d), dtype, device, gen)
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)

    def kernel(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True,
                                      backend=backend, **kw)

    def ref(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True,
                                      backend="reference", **kw)

    _check(kernel, ref, q, k, v, dout)
    # The packed reference agrees with the dense one on each sequence.
    out = ref(q.detach(), k.detach(), v.detach())[0]
    i = 2
    dense_kw = {key: val for key, val in kw.items() if key != "prefix_lens"}
    if "prefix_lens" in kw:
        dense_kw["prefix_len"] = int(kw["prefix_lens"][i])
    dense = attention_reference(q.detach()[None, cu_q[i] : cu_q[i + 1]], k.detach()[None, cu_k[i] : cu_k[i + 1]],
                                v.detach()[None, cu_k[i] : cu_k[i + 1]], **dense_kw)
    torch.testing.assert_close(out[cu_q[i] : cu_q[i + 1]], dense[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOWP, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(dtype, causal, device, triton_backend):
    _varlen_case(device, triton_backend, dtype, [1, 17, 64, 5], [1, 17, 64, 5], 2, 2, 80, causal=causal)


def test_varlen_gqa_uneven_k_prefix(device, triton_backend):
    _varlen_case(device, triton_backend, torch.bfloat16, [1, 17, 64, 5], [3, 40, 64, 5], 4, 2, 64,
                 prefix_lens=torch.tensor([0, 9, 40, 5], device=device))


def test_varlen_window(device, triton_backend):
    _varlen_case(device, triton_backend, torch.float16, [1, 17, 64, 5], [1, 17, 64, 5], 2, 1, 128,
                 window_size=(8, 3))


# --------------------------------------------------------------------------- dropout
def test_dropout_matches_reference_and_is_deterministic(device, triton_backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_rand((1, 77, 2, 64), torch.float32, device, gen) for _ in range(3))
    dout = torch.randn(q.shape, generator=gen).to(device)
    kw = {"dropout_p": 0.3, "dropout_seed": 1234, "causal": True}
    out = flash_attn_func(q, k, v, backend=triton_backend, **kw)
    again = flash_attn_func(q, k, v, backend=triton_backend, **kw)
    other = flash_attn_func(q, k, v, backend=triton_backend, **{**kw, "dropout_seed": 99})
    assert torch.equal(out, again)
    assert not torch.equal(out, other)
    grads = _grads(out, (q, k, v), dout)
    ref = flash_attn_func(q, k, v, backend="reference", **kw)
    ref_grads = _grads(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # The mask keeps about 1 - p of the entries.
    from mmfast.ops.attention import dropout_keep_reference

    keep = dropout_keep_reference(1234, torch.arange(64), 64, 64, 0.3, "cpu")
    assert abs(keep.double().mean().item() - 0.7) < 0.01


def test_dropout_seed_from_torch_generator(device, triton_backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (_rand((1, 33, 2, 32), torch.float16, device, gen) for _ in range(3))
    torch.manual_seed(7)
    a = flash_attn_func(q, k, v, dropout_p=0.5, backend=triton_backend)
    torch.manual_seed(7)
    b = flash_attn_func(q, k, v, dropout_p=0.5, backend=triton_backend)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- kv cache
@pytest.mark.parametrize("hk", [2, 1], ids=["mha", "mqa"])
def test_kvcache_decoding_equals_full_attention(hk, device, triton_backend):
    gen = torch.Generator().manual_seed(6)
    b, s, h, d, prompt = 2, 21, 2, 64, 9
    q = torch.randn((b, s, h, d), generator=gen).to(device=device, dtype=torch.float16)
    k = torch.randn((b, s, hk, d), generator=gen).to(device=device, dtype=torch.float16)
    v = torch.randn((b, s, hk, d), generator=gen).to(device=device, dtype=torch.float16)
    k_cache = torch.full((b, 32, hk, d), float("nan"), device=device, dtype=torch.float16)
    v_cache = torch.full((b, 32, hk, d), float("nan"), device=device, dtype=torch.float16)
    outs = [flash_attn_with_kvcache(q[:, :prompt], k_cache, v_cache, k[:, :prompt], v[:, :prompt],
                                    cache_seqlens=0, causal=True, backend=triton_backend)]
    for t in range(prompt, s):
        outs.append(flash_attn_with_kvcache(q[:, t : t + 1], k_cache, v_cache, k[:, t : t + 1], v[:, t : t + 1],
                                            cache_seqlens=torch.full((b,), t, dtype=torch.int32, device=device),
                                            causal=True, backend=triton_backend))
    decoded = torch.cat(outs, dim=1)
    full = flash_attn_func(q, k, v, causal=True, backend=triton_backend)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    low = attention_reference(q, k, v, causal=True)
    assert torch.equal(k_cache[:, :s], k) and torch.equal(v_cache[:, :s], v)
    assert_error_bound(decoded, ref, low, name="decoded")
    torch.testing.assert_close(decoded, full, rtol=0, atol=2e-3)


def test_kvcache_ragged_lengths(device, triton_backend):
    gen = torch.Generator().manual_seed(8)
    k_cache = torch.randn((3, 40, 2, 32), generator=gen).to(device=device, dtype=torch.bfloat16)
    v_cache = torch.randn((3, 40, 2, 32), generator=gen).to(device=device, dtype=torch.bfloat16)
    q = torch.randn((3, 1, 4, 32), generator=gen).to(device=device, dtype=torch.bfloat16)
    lens = torch.tensor([5, 39, 17], dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True, backend=triton_backend)
    for i, n in enumerate(lens.tolist()):
        args = (q[i : i + 1], k_cache[i : i + 1, :n], v_cache[i : i + 1, :n])
        ref = attention_reference(*(t.double() for t in args), causal=True)
        assert_error_bound(out[i : i + 1], ref, attention_reference(*args, causal=True), name=f"row {i}")


# --------------------------------------------------------------------------- validation and dispatch
def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match="k/v heads"):
        flash_attn_func(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="q must be 4-D"):
        flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=(3,))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="prefix_len"):
        flash_attn_func(q, q, q, prefix_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 5]), torch.tensor([0, 8]), 8, 8)
    with pytest.raises(ValueError, match="capacity"):
        flash_attn_with_kvcache(q, q, q, q, q, cache_seqlens=1)
    with pytest.raises(ValueError, match="backend"):
        flash_attn_func(q, q, q, backend="cuda")


def test_torch_compile_traces_the_custom_ops(device, triton_backend):
    gen = torch.Generator().manual_seed(10)
    q, k, v = (_rand((1, 40, 2, 32), torch.float16, device, gen) for _ in range(3))

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True, backend=triton_backend).float().square().sum()

    eager = f(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(compiled, (q, k, v))
    assert torch.equal(compiled, eager)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


def test_reference_backend_is_the_oracle():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn((2, 19, 2, 16), generator=gen, dtype=torch.float64) for _ in range(3))
    out = flash_attn_func(q.float(), k.float(), v.float(), causal=True, backend="reference")
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    s = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    manual = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    torch.testing.assert_close(out.double(), manual, rtol=1e-5, atol=1e-6)


def test_kvcache_rejects_overflowing_lengths():
    """Appending past the cache capacity, or lengths beyond it, raise before anything is written."""
    b, smax, h, d = 2, 8, 2, 16
    q = torch.randn(b, 1, h, d)
    kc, vc = torch.randn(b, smax, h, d), torch.randn(b, smax, h, d)
    k, v = torch.randn(b, 2, h, d), torch.randn(b, 2, h, d)
    before = kc.clone()
    with pytest.raises(ValueError, match="appending 2 tokens to cache lengths up to 7 overflows"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([3, 7]), backend="reference")
    with pytest.raises(ValueError, match="appending 2 tokens to cache lengths up to 7 overflows"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=7, backend="reference")
    assert torch.equal(kc, before)
    with pytest.raises(ValueError, match="cache_seqlens up to 9 exceed the cache capacity 8"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([9, 1]), backend="reference")
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([6, 0]), backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert torch.equal(kc[0, 6:], k[0]) and torch.equal(kc[1, :2], k[1])


def test_autotune_prunes_tiles_that_do_not_fit():
    # The autotuner's early prune (GPU only, so checked here directly): fp32 runs the fixed small tiles; bf16
    # at head dim 256 keeps small tiles only, at 128 the forward keeps 64-wide key blocks or 8 warps.
    from mmfast.ops._attention_triton import as_config, fixed_config, prune_tiles

    def shapes(kind, d, dtype, configs):
        kept = prune_tiles(kind, configs, {"Q": torch.empty(1, dtype=dtype), "BLOCK_D": d})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]

    configs = [as_config(*c) for c in [(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2)]]
    for kind in ("fwd", "bwd"):
        assert shapes(kind, 64, torch.float32, configs) == [fixed_config(kind, 64, torch.float32)]
        assert shapes(kind, 64, torch.bfloat16, configs) == [(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                                                               (64, 32, 4, 2)]
    assert shapes("fwd", 128, torch.bfloat16, configs) == [(128, 128, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2)]
    assert shapes("bwd", 128, torch.bfloat16, configs) == [(128, 64, 4, 3), (64, 32, 4, 2)]
    assert shapes("fwd", 256, torch.bfloat16, configs) == [(64, 32, 4, 2)]
    assert shapes("bwd", 256, torch.bfloat16, configs) == [(64, 32, 4, 2)]
    assert shapes("bwd", 256, torch.bfloat16, configs[:2]) == [fixed_config("bwd", 256, torch.bfloat16)]
