"""Fused linear cross-entropy, MLP projector and linear + L2 normalise against fp64 references.

Rule: |ours − fp64| ≤ 2·|torch in the same dtype − fp64| (+ a few ulps), for the loss and every gradient.
Kernel outputs are allocated through a poisoning ``torch.empty`` so an unwritten element shows as NaN.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops.projection import (
    fused_linear_cross_entropy as flce,
)
from mmfast.ops.projection import (
    fused_linear_cross_entropy_reference as flce_ref,
)
from mmfast.ops.projection import (
    linear_l2_normalize,
    linear_l2_normalize_reference,
    mlp_projector,
)
from mmfast.testing import assert_error_bound, poison_


def _leaf(t, dtype):
    return t.to(dtype).clone().requires_grad_()


def _run_flce(fn, h, w, b, t, grad_out, **kw):
    loss = fn(h, w, t, b, **kw)
    (loss.double() * grad_out).sum().backward()
    return loss, h.grad, w.grad, (b.grad if b is not None else None)


FLCE_VARIANTS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap_bias": {"softcap": 7.0, "bias": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def _flce_case(device, dtype, backend, T, H, V, variant, chunk_size=None, seed=0):
    kw = dict(FLCE_VARIANTS[variant])
    has_bias = kw.pop("bias", False)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if has_bias else None
    t = torch.randint(0, V, (T,), generator=g)
    t[::4] = -100  # ignored rows
    out_shape = (T,) if kw.get("reduction") == "none" else ()
    grad_out = torch.rand(out_shape, generator=g, dtype=torch.float64) + 0.5

    def leaves(dt):
        return [None if x is None else _leaf(x, dt).to(device).detach().requires_grad_() for x in (h, w, b)]

    h64, w64, b64 = leaves(torch.float64)
    ref = _run_flce(flce_ref, h64, w64, b64, t.to(device), grad_out.to(device), **kw)
    hl, wl, bl = leaves(dtype)
    low = _run_flce(flce_ref, hl, wl, bl, t.to(device), grad_out.to(device), **kw)
    ho, wo, bo = leaves(dtype)
    ours = _run_flce(flce, ho, wo, bo, t.to(device), grad_out.to(device), backend=backend,
                     chunk_size=chunk_size, **kw)
    assert ours[0].dtype == torch.float32
    for name, o, r, l in zip(("loss", "dhidden", "dweight", "dbias"), ours, ref, low):
        if r is None:
            assert o is None
            continue
        assert o.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_error_bound(o, r, l, name=f"{variant}/{name}")


@pytest.mark.parametrize("variant", list(FLCE_VARIANTS))
@pytest.mark.parametrize("H", [19, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flce_triton(variant, H, dtype, device, triton_backend, poisoned_alloc):
    _flce_case(device, dtype, triton_backend, 37, H, 1000, variant, chunk_size=16)


@pytest.mark.parametrize("variant", list(FLCE_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flce_reference_backend(variant, dtype):
    _flce_case("cpu", dtype, "reference", 37, 19, 1000, variant, chunk_size=8)


@pytest.mark.parametrize("variant", ["plain", "softcap_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flce_vocab_32003(variant, dtype, device, triton_backend, poisoned_alloc):
    _flce_case(device, dtype, triton_backend, 37, 64, 32003, variant)


def test_flce_default_chunking_round_shape(device, triton_backend):
    _flce_case(device, torch.float32, triton_backend, 64, 64, 1000, "zloss")


@pytest.mark.parametrize("backend_kind", ["triton", "reference"])
def test_flce_all_ignored(backend_kind, device, triton_backend):
    backend = triton_backend if backend_kind == "triton" else "reference"
    h = torch.randn(5, 19, device=device, requires_grad=True)
    w = torch.randn(100, 19, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    loss = flce(h, w, t, backend=backend, z_loss=1e-2, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() == 0
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() == 0


def test_flce_rows_kernel_poisoned(device, triton_backend):
    """The row pass writes every loss, lse and logit-gradient element it owns."""
    from mmfast.ops._flce import ce_rows_torch
    from mmfast.ops._projection_triton import ce_rows

    C, V = 9, 777
    x = torch.randn(C, V, device=device) * 3
    t = torch.randint(0, V, (C,), device=device)
    t[2] = -100
    scale = torch.rand(C, device=device) + 0.1
    outs = []
    for fn in (ce_rows, ce_rows_torch):
        logits = x.clone()
        loss, lse = poison_(torch.empty(C, device=device)), poison_(torch.empty(C, device=device))
        fn(logits, t, loss, lse, scale, True, ignore_index=-100, smoothing=0.05, z_loss=1e-3, softcap=5.0,
           write_grad=True)
        outs.append((loss, lse, logits))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flce_validation():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside"):
        flce(h, w, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="target shape"):
        flce(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        flce(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="weight has dtype"):
        flce(h, w.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="target must be"):
        flce(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        flce(h, w, torch.zeros(4, dtype=torch.long), reduction="avg")


@pytest.mark.parametrize("targets, ignore_index, ok", [
    ([0, 9, -100, 3], -100, True),
    ([0, 9, 3, 5], 3, True),  # ignore_index inside [0, V)
    ([0, 12, 12, 5], 12, True),  # ignore_index past V
    ([0, -1, -100, 5], -100, False),
    ([0, 10, 3, 5], 3, False),
    ([-100, -100, -100, -100], -100, True),
])
def test_flce_target_range_check(targets, ignore_index, ok):
    """Targets not ignore_index must lie in [0, V), wherever ignore_index lies."""
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor(targets)
    if ok:
        flce(h, w, t, ignore_index=ignore_index)
    else:
        with pytest.raises(ValueError, match="outside"):
            flce(h, w, t, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 3, 9, 10, 12])
def test_flce_count_targets(ignore_index):
    """The eager check's count is #{t != ignore_index}, wherever ignore_index lies, and the mean uses it."""
    from mmfast.ops._flce import count_targets

    V = 10
    t = torch.tensor([0, 9, 3, 3, 5, ignore_index, ignore_index])
    t = t[(t != ignore_index) & ((t < 0) | (t >= V)) == 0]
    assert count_targets(t, V, ignore_index) == int((t != ignore_index).sum())
    h, w = torch.randn(t.numel(), 8), torch.randn(V, 8)
    torch.testing.assert_close(flce(h, w, t, ignore_index=ignore_index, backend="reference"),
                               flce_ref(h, w, t, ignore_index=ignore_index))


def test_flce_no_grad_and_3d(device, triton_backend):
    h = torch.randn(2, 7, 19, device=device)
    w = torch.randn(50, 19, device=device)
    t = torch.randint(0, 50, (2, 7), device=device)
    with torch.no_grad():
        out = flce(h, w, t, backend=triton_backend, reduction="none")
    ref = flce_ref(h.double(), w.double(), t, reduction="none")
    assert out.shape == (2, 7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- MLP projector
def _mlp_case(device, backend, dtype, M, dims, act, recompute, bias=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, dims[0], generator=g, dtype=torch.float64)
    params = [(torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5,
               torch.randn(o, generator=g, dtype=torch.float64) if bias else None) for i, o in itertools.pairwise(dims)]
    gout = torch.randn(M, dims[-1], generator=g, dtype=torch.float64)

    def run(dt, fn):
        xs = _leaf(x, dt).to(device).detach().requires_grad_()
        ps = [(_leaf(w, dt).to(device).detach().requires_grad_(),
               None if b is None else _leaf(b, dt).to(device).detach().requires_grad_()) for w, b in params]
        out = fn(xs, ps)
        (out.double() * gout.to(device)).sum().backward()
        return [out, xs.grad] + [t.grad for p in ps for t in p if t is not None]

    approx = "tanh" if act != "gelu" else "none"

    def torch_seq(xs, ps):  # Linear → GELU → Linear … in PyTorch
        for i, (w, b) in enumerate(ps):
            xs = F.linear(xs, w, b)
            if i < len(ps) - 1:
                xs = torch.nn.GELU(approximate=approx)(xs)
        return xs

    ref = run(torch.float64, torch_seq)
    low = run(dtype, torch_seq)
    ours = run(dtype, lambda xs, ps: mlp_projector(xs, ps, act, recompute=recompute, backend=backend))
    for i, (o, r, l) in enumerate(zip(ours, ref, low)):
        assert_error_bound(o, r, l, name=f"mlp[{i}]")


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mlp_projector(recompute, act, dtype, device, triton_backend, poisoned_alloc):
    _mlp_case(device, triton_backend, dtype, 37, [19, 80, 33], act, recompute)


def test_mlp_projector_depth3_nobias(device, triton_backend):
    _mlp_case(device, triton_backend, torch.float32, 64, [64, 96, 96, 48], "gelu", True, bias=False)


def test_bias_gelu_forward(device, triton_backend):
    from mmfast.ops.projection import bias_gelu

    y = torch.randn(37, 77, device=device)
    b = torch.randn(77, device=device)
    for act, approx in (("gelu", "none"), ("gelu_tanh", "tanh")):
        out = bias_gelu(y, b, act, backend=triton_backend)
        torch.testing.assert_close(out, F.gelu(y + b, approximate=approx), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- linear + L2 normalise
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(37, 19, 33), (64, 64, 32)])
def test_linear_l2_normalize(bias, dtype, shape, device, triton_backend, poisoned_alloc):
    M, K, D = shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(D, K, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64) if bias else None
    gout = torch.randn(M, D, generator=g, dtype=torch.float64)

    def run(dt, fn):
        ts = [None if t is None else _leaf(t, dt).to(device).detach().requires_grad_() for t in (x, w, b)]
        out = fn(*ts)
        (out.double() * gout.to(device)).sum().backward()
        return [out] + [t.grad for t in ts if t is not None]

    ref = run(torch.float64, linear_l2_normalize_reference)
    low = run(dtype, linear_l2_normalize_reference)
    ours = run(dtype, lambda *a: linear_l2_normalize(*a, backend=triton_backend))
    for i, (o, r, l) in enumerate(zip(ours, ref, low)):
        assert_error_bound(o, r, l, name=f"l2[{i}]")


def test_linear_l2_normalize_validation():
    with pytest.raises(ValueError, match="weight must be"):
        linear_l2_normalize(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="eps"):
        linear_l2_normalize(torch.randn(3, 4), torch.randn(5, 4), eps=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flce_small_budget_blocks(dtype, device, triton_backend, monkeypatch):
    """A tiny byte budget: many token chunks and the fp32 dW sum split into vocab blocks."""
    import mmfast.ops._flce as flce_mod

    monkeypatch.setattr(flce_mod, "DEFAULT_CHUNK_BYTES", 16 * 1024)
    monkeypatch.setattr(flce_mod, "CUDA_CHUNK_BYTES", 16 * 1024)
    _flce_case(device, dtype, triton_backend, 37, 19, 1000, "smooth")


def test_flce_dweight_in_weight_dtype(device, triton_backend):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(37, 19, generator=g).to(device).requires_grad_()
    w = torch.randn(300, 19, generator=g).to(device).requires_grad_()
    t = torch.randint(0, 300, (37,), generator=g).to(device)
    flce(h, w, t, backend=triton_backend, chunk_size=8, dweight_fp32=False).backward()
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    flce_ref(h2, w2, t).backward()
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)


def test_flce_and_norm_under_torch_compile(device, triton_backend):
    """torch.compile traces through the autograd Functions; the kernels stay opaque custom ops."""
    from mmfast.ops.norm import rms_norm

    h = torch.randn(2, 5, 19, device=device, requires_grad=True)
    w = torch.randn(50, 19, device=device, requires_grad=True)
    nw = torch.randn(19, device=device, requires_grad=True)
    t = torch.randint(0, 50, (2, 5), device=device)

    w1 = torch.randn(23, 19, device=device, requires_grad=True)
    w2 = torch.randn(19, 23, device=device, requires_grad=True)

    def f(h, w, nw, t):
        h = mlp_projector(h, [(w1, None), (w2, None)], recompute=True, backend=triton_backend)
        h = h + linear_l2_normalize(h, w2 @ w1, backend=triton_backend)
        return flce(rms_norm(h, nw, backend=triton_backend), w, t, backend=triton_backend)

    eager = f(h, w, nw, t)
    eager_g = torch.autograd.grad(eager, (h, w, nw))
    compiled = torch.compile(f, backend="eager", fullgraph=True)(h, w, nw, t)
    comp_g = torch.autograd.grad(compiled, (h, w, nw))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(comp_g, eager_g):
        torch.testing.assert_close(a, b)


def test_autocast_casts_like_f_linear(device, triton_backend):
    """Under autocast (fp32 parameters, bf16 compute) the ops cast as F.linear would; grads reach the fp32 leaves."""
    h = torch.randn(37, 19, device=device, requires_grad=True)
    w = torch.randn(100, 19, device=device, requires_grad=True)
    t = torch.randint(0, 100, (37,), device=device)
    w1 = torch.randn(33, 19, device=device, requires_grad=True)
    w2 = torch.randn(19, 33, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = flce(h, w, t, backend=triton_backend)
        proj = mlp_projector(h, [(w1, None), (w2, None)], backend=triton_backend)
        emb = linear_l2_normalize(h, w1, backend=triton_backend)
        ref = flce_ref(h.bfloat16(), w.bfloat16(), t)
    assert proj.dtype == emb.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-2)  # both bf16 logits
    (loss + proj.float().sum() + emb.float().sum()).backward()
    for p in (h, w, w1, w2):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_nn_modules(device, triton_backend):
    from mmfast.nn import FusedLinearCrossEntropyLoss, LinearL2Normalize, MLPProjector

    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 9, 19, generator=g).to(device)
    w = torch.randn(50, 19, generator=g).to(device)
    t = torch.randint(0, 50, (2, 9), generator=g).to(device)
    loss = FusedLinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, backend=triton_backend)(h, w, t)
    ref = flce_ref(h.double(), w.double(), t, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)

    head = LinearL2Normalize(19, 7, bias=True, backend=triton_backend).to(device)
    torch.testing.assert_close(head(h), F.normalize(F.linear(h, head.weight, head.bias), dim=-1, eps=1e-6))

    proj = MLPProjector(19, 11, hidden_dim=13, depth=3, act="gelu_pytorch_tanh", recompute=True,
                        backend=triton_backend).to(device)
    seq = torch.nn.Sequential(getattr(proj, "0"), torch.nn.GELU("tanh"), getattr(proj, "2"),
                              torch.nn.GELU("tanh"), getattr(proj, "4"))
    torch.testing.assert_close(proj(h), seq(h), rtol=1e-5, atol=1e-6)
    assert set(proj.state_dict()) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


def test_live_bytes_counts_what_is_alive_at_once():
    from mmfast.testing import LiveBytes

    before = torch.randn(1000)  # allocated before the block: not counted
    with LiveBytes() as lb:
        a = torch.empty(250)  # 1000 bytes
        b = a.view(25, 10)  # a view: no new storage
        del a, b
        c = torch.empty(500) + before[:500]  # the empty's 2000 bytes are freed once the sum exists
        del c
    assert lb.peak == 4000 and lb.current == 0


def test_projector_recompute_backward_keeps_two_activations(device, triton_backend):
    """With recompute, the backward rebuilds h = gelu(u) for dW and frees it before dh exists: at most
    out, u and one of (h, dh) are alive at once (three (M, N) buffers, plus the small ones), where
    torch's unfused MLP holds four (out, u, h, dh) in its backward."""
    from mmfast.testing import LiveBytes

    M, K, N = 512, 16, 64
    g_ = torch.Generator().manual_seed(3)
    x, w1, b1 = torch.randn(M, K, generator=g_), torch.randn(N, K, generator=g_), torch.randn(N, generator=g_)
    w2, b2, dy = torch.randn(N, N, generator=g_), torch.randn(N, generator=g_), torch.randn(M, N, generator=g_)
    leaves = [t.to(device).requires_grad_() for t in (x, w1, b1, w2, b2)]
    dy = dy.to(device)
    grads_bytes = sum(t.numel() * 4 for t in leaves)
    unit = M * N * 4
    with LiveBytes() as ours:
        out = mlp_projector(leaves[0], [(leaves[1], leaves[2]), (leaves[3], leaves[4])], recompute=True,
                            backend=triton_backend)
        got = torch.autograd.grad(out, leaves, dy)
    with LiveBytes() as eager:
        out = F.linear(F.gelu(F.linear(leaves[0], leaves[1], leaves[2])), leaves[3], leaves[4])
        want = torch.autograd.grad(out, leaves, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert ours.peak <= 3 * unit + grads_bytes, (ours.peak / unit, eager.peak / unit)
    assert eager.peak >= 4 * unit  # the yardstick: torch keeps one more (M, N) buffer alive
