"""LayerNorm / RMSNorm (optionally fused with the residual add) against fp64 references, forward and
every gradient: |ours − fp64| ≤ 2·|torch in the same dtype − fp64| (+ a few ulps)."""
import pytest
import torch

from mmfast.ops.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from mmfast.testing import assert_error_bound, has_cpp_kernel


def _case(device, backend, dtype, shape, is_rms, residual, affine=True):
    g = torch.Generator().manual_seed(3)
    n = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(n, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(n, generator=g, dtype=torch.float64) if (affine and not is_rms) else None
    r = torch.randn(*shape, generator=g, dtype=torch.float64) if residual else None
    gy = torch.randn(*shape, generator=g, dtype=torch.float64)
    gs = torch.randn(*shape, generator=g, dtype=torch.float64)

    def run(dt, fn):
        ts = [None if t is None else t.to(dt).to(device).detach().clone().requires_grad_() for t in (x, w, b, r)]
        xs, ws, bs, rs = ts
        out = fn(xs, ws, bs, rs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = (outs[0].double() * gy.to(device)).sum()
        if residual:
            loss = loss + (outs[1].double() * gs.to(device)).sum()
        loss.backward()
        return list(outs) + [t.grad for t in ts if t is not None]

    if is_rms:
        ref_fn = lambda x_, w_, b_, r_: rms_norm_reference(x_, w_, 1e-6, r_)
        our_fn = lambda x_, w_, b_, r_: rms_norm(x_, w_, 1e-6, r_, backend=backend)
    else:
        ref_fn = lambda x_, w_, b_, r_: layer_norm_reference(x_, w_, b_, 1e-5, r_)
        our_fn = lambda x_, w_, b_, r_: layer_norm(x_, w_, b_, 1e-5, r_, backend=backend)
    ref = run(torch.float64, ref_fn)
    low = run(dtype, ref_fn)
    ours = run(dtype, our_fn)
    assert len(ours) == len(ref)
    for i, (o, rr, l) in enumerate(zip(ours, ref, low)):
        assert o.dtype == dtype
        assert_error_bound(o, rr, l, name=f"{'rms' if is_rms else 'ln'}[{i}]")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(37, 19), (2, 77, 80), (4, 64)])
def test_norm(shape, dtype, is_rms, residual, device, triton_backend, poisoned_alloc):
    _case(device, triton_backend, dtype, shape, is_rms, residual)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_no_affine(is_rms, device, triton_backend):
    _case(device, triton_backend, torch.float32, (37, 19), is_rms, True, affine=False)


def test_norm_many_rows_per_program(device, triton_backend):
    """More rows than backward programs: the partial dw/db sums span several rows each."""
    _case(device, triton_backend, torch.float32, (301, 24), False, False)


def test_norm_validation():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have"):
        rms_norm(x, torch.ones(8), residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8), eps=0.0)
    with pytest.raises(TypeError, match="dtype"):
        layer_norm(x.long())


def test_modules_match_torch(device, triton_backend):
    from mmfast.nn import LayerNorm, RMSNorm

    ln = torch.nn.LayerNorm(19, device=device)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    ours = LayerNorm(19, backend=triton_backend).to(device)
    ours.load_state_dict(ln.state_dict())
    x = torch.randn(5, 19, device=device)
    torch.testing.assert_close(ours(x), ln(x), rtol=1e-5, atol=1e-5)
    rms = RMSNorm(19, backend=triton_backend).to(device)
    y, s = rms(x, residual=x)
    torch.testing.assert_close(s, 2 * x)
    torch.testing.assert_close(y, rms_norm_reference(2 * x, rms.weight), rtol=1e-5, atol=1e-5)


def test_eager_calls_skip_the_custom_op_dispatcher(device, triton_backend):
    """In eager mode the kernels' custom ops run their bodies directly (the dispatcher round trip cost
    more host time than a small norm kernel takes); under torch.compile they stay custom ops (see
    test_projection.py's compile test). Same results either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmfast.ops.norm import _norm_fwd_call, layer_norm

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((5, 19), (19,), (19,)))
    with Record():
        y = layer_norm(x, w, b, 1e-5, backend=triton_backend)
    assert seen and not any("mmfast" in name for name in seen), seen
    via_op = _norm_fwd_call.op(x, None, w, b, 1e-5, False)[0]
    torch.testing.assert_close(y, via_op, rtol=0, atol=0)


def test_outputs_are_not_views_and_a_double_backward_raises(device, triton_backend):
    """The rows go to the kernels in the caller's shape (no reshape around the autograd Function): the
    outputs are plain tensors, modifiable in place like F.layer_norm's, with the same gradients; the
    backward is once-differentiable (a double backward raises rather than returning wrong values)."""
    g = torch.Generator().manual_seed(5)
    x, w, b, r = (torch.randn(*s, generator=g).to(device).requires_grad_() for s in ((2, 3, 16), (16,), (16,), (2, 3, 16)))
    y = layer_norm(x, w, b, backend=triton_backend)
    assert y._base is None and y.shape == x.shape
    y.mul_(2)  # in place on the output, as on F.layer_norm's
    got = torch.autograd.grad(y.sum(), (x, w, b))
    want = torch.autograd.grad((2 * layer_norm_reference(x, w, b)).sum(), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    y, s = rms_norm(x, w, residual=r, backend=triton_backend)
    assert y._base is None and s._base is None
    gx, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


# --------------------------------------------------------------------------- cpp (csrc/norm.cpp)
_CPP = pytest.mark.skipif(not has_cpp_kernel("norm_fwd"), reason="mmfast._C without the norm kernels")


@pytest.fixture
def nan_alloc(poisoned_alloc):
    """Every fresh tensor NaN, those the C++ kernels allocate too (deterministic mode fills
    uninitialised memory, in ATen's own empty)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(prev)


@_CPP
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(37, 19), (2, 77, 80), (4, 64), (3, 5), (301, 24)])
def test_norm_cpp(shape, is_rms, residual, nan_alloc):
    """fp32 on CPU: output, new residual and every gradient within the bound; (301, 24): three blocks of
    column sums; (3, 5): rows shorter than one vector. (N = 1 is left out: there y = sign(s)·w and dx is
    the cancellation g − ŝ·(g·ŝ) with ŝ² ≈ 1, as in the Triton kernel's formula; the reference's autograd
    happens to cancel exactly in fp32.)"""
    _case("cpu", "cpp", torch.float32, shape, is_rms, residual)


@_CPP
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_cpp_no_affine_and_a_bf16_residual_stream(is_rms, nan_alloc):
    _case("cpu", "cpp", torch.float32, (37, 19), is_rms, True, affine=False)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(5, 33, generator=g), torch.randn(33, generator=g)
    w = w.bfloat16() if is_rms else w  # a bf16 weight on fp32 rows: RMSNorm applies it in fp32 (F.layer_norm refuses)
    r = torch.randn(5, 33, generator=g).bfloat16()
    y, s = rms_norm(x, w, 1e-6, r, backend="cpp") if is_rms else layer_norm(x, w, None, 1e-5, r, backend="cpp")
    ry, rs = rms_norm_reference(x, w, 1e-6, r) if is_rms else layer_norm_reference(x, w, None, 1e-5, r)
    assert s.dtype == torch.bfloat16 and torch.equal(s, rs)  # the stream rounded to its dtype, as the reference
    torch.testing.assert_close(y, ry, rtol=2e-6, atol=2e-6)


@_CPP
def test_norm_cpp_inference_skips_the_function_with_equal_results(nan_alloc):
    """Without grad the backend's forward runs without the autograd.Function: the same kernel, the same
    bits; the result carries no grad_fn."""
    g = torch.Generator().manual_seed(7)
    x, w, r = torch.randn(6, 40, generator=g), torch.randn(40, generator=g), torch.randn(6, 40, generator=g)
    xg = x.clone().requires_grad_()
    y1, s1 = rms_norm(xg, w, 1e-6, r, backend="cpp")
    assert y1.grad_fn is not None
    with torch.inference_mode():
        y2, s2 = rms_norm(x, w, 1e-6, r, backend="cpp")
    assert y2.grad_fn is None and torch.equal(y1, y2) and torch.equal(s1, s2)


def test_norm_cpp_refuses_low_precision_naming_the_dtype():
    from mmfast.ops import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        rms_norm(torch.randn(3, 8).bfloat16(), None, backend="cpp")
