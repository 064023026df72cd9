"""The ``cpp`` backend of the fused contrastive losses (csrc/contrastive.cpp) through the public API.

Each case compares the loss and every gradient (image, text, scale, bias) with an fp64 reference,
using PyTorch's own result in the features' dtype as the yardstick (mmfast.testing.assert_error_bound).
Shapes cover one row, odd sizes, several row blocks / column tiles with ragged edges (the kernel
tiles 256×256), and a large feature dim.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from contrastive_helpers import check_against_reference, features, loss_and_grads

from mmfast.ops import contrastive as C
from mmfast.testing import assert_error_bound


def _cpp_kernels():
    try:
        return importlib.import_module("mmfast.ops._contrastive_cpp")
    except ImportError as e:
        pytest.skip(
            f"mmfast._C with the contrastive kernels is not built ({e}); run "
            "`python setup.py build_ext --inplace`",
            allow_module_level=True,
        )


K = _cpp_kernels()
_C = K._C

SHAPES = [(1, 8), (37, 19), (300, 1152), (513, 64)]
DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------- helpers
def _clip(ls):
    return (
        lambda a, b, s, bias: C.clip_loss(a, b, s, bias, label_smoothing=ls, backend="cpp"),
        lambda a, b, s, bias: C.clip_loss_reference(a, b, s, bias, label_smoothing=ls),
    )


def _siglip():
    return (lambda a, b, s, bias: C.siglip_loss(a, b, s, bias, backend="cpp"), C.siglip_loss_reference)


# --------------------------------------------------------------------------- symmetric losses
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}d{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "ls,scale,bias", [(0.0, 10.0, None), (0.1, math.exp(4.6), -2.0)], ids=["plain", "smooth_bias_s100"]
)
def test_clip_loss(shape, dtype, ls, scale, bias):
    n, d = shape
    a, b = features(n, n, d, dtype, seed=n * 1000 + d)
    beta = None if bias is None else torch.tensor(bias)
    check_against_reference(*_clip(ls), a, b, torch.tensor(scale), beta)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}d{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (math.exp(4.6), 3.0)], ids=["s10b-10", "s100b3"])
def test_siglip_loss(shape, dtype, scale, bias):
    n, d = shape
    a, b = features(n, n, d, dtype, seed=n * 7 + d)
    check_against_reference(*_siglip(), a, b, torch.tensor(scale), torch.tensor(bias))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_unnormalised_features_and_fp16(kind):
    """Large logits (|z| in the hundreds) and fp16 operands: the online log-sum-exp must not overflow."""
    for dtype in (torch.float32, torch.float16):
        a, b = features(70, 70, 33, dtype, seed=5, unit=False)
        s = torch.tensor(math.exp(4.6))
        if kind == "clip":
            check_against_reference(*_clip(0.1), a, b, s, torch.tensor(-1.0))
        else:
            check_against_reference(*_siglip(), a, b, s, torch.tensor(-4.0))


# --------------------------------------------------------------------------- rectangular pieces
RECT = [(13, 40, 0), (13, 40, 27), (1, 5, 4), (300, 600, 260), (37, 300, 263)]


@pytest.mark.parametrize("m,k,offset", RECT, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_rows_sum_with_offset(m, k, offset, dtype):
    a, b = features(m, k, 19, dtype, seed=m + k + offset, offset=offset)
    check_against_reference(
        lambda a, b, s, bias: C.clip_rows_sum(
            a, b, s, bias, label_smoothing=0.1, offset=offset, backend="cpp"
        ),
        lambda a, b, s, bias: C.clip_rows_reference(a, b, s, bias, 0.1, offset),
        a,
        b,
        torch.tensor(30.0),
        torch.tensor(0.5),
    )


@pytest.mark.parametrize("m,k,offset", RECT, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_sum_with_offset(m, k, offset, dtype):
    a, b = features(m, k, 19, dtype, seed=m * k + offset, offset=offset)
    check_against_reference(
        lambda a, b, s, bias: C.siglip_sum(a, b, s, bias, offset=offset, backend="cpp"),
        lambda a, b, s, bias: C.siglip_sum_reference(a, b, s, bias, offset),
        a,
        b,
        torch.tensor(10.0),
        torch.tensor(-10.0),
    )


def test_clip_rows_sum_without_bias():
    a, b = features(5, 9, 16, torch.float32, seed=1, offset=2)
    check_against_reference(
        lambda a, b, s, bias: C.clip_rows_sum(a, b, s, bias, offset=2, backend="cpp"),
        lambda a, b, s, bias: C.clip_rows_reference(a, b, s, bias, 0.0, 2),
        a,
        b,
        torch.tensor(10.0),
        None,
    )


# --------------------------------------------------------------------------- kernel internals
def test_lse_stats_match_fp64():
    """clip_fwd's row/column log-sum-exp (the distributed loss relies on them), across tiles."""
    a, b = features(300, 300, 24, torch.float32, seed=11)
    s, beta = torch.tensor(20.0), torch.tensor(-1.0)
    _, lse_row, lse_col = K.clip_fwd(a, b, s, beta, 0.0, 0, True)
    z64 = 20.0 * a.double() @ b.double().t() - 1.0
    z32 = 20.0 * a @ b.t() - 1.0
    assert_error_bound(lse_row, z64.logsumexp(1), z32.logsumexp(1), name="lse_row")
    assert_error_bound(lse_col, z64.logsumexp(0), z32.logsumexp(0), name="lse_col")
    assert K.clip_fwd(a, b, s, beta, 0.0, 0, False)[2] is None


def test_deterministic_and_single_thread():
    """Same inputs, same bits (no racy accumulation); one thread (other row-block split) is also right."""
    a, b = features(600, 600, 40, torch.float32, seed=3)
    s, beta = torch.tensor(30.0), torch.tensor(-2.0)

    def run():
        loss, lr, lc = K.clip_fwd(a, b, s, beta, 0.1, 0, True)
        grads = K.clip_bwd(a, b, s, beta, 0.1, 0, True, lr, lc, torch.tensor(1.0))
        sig = K.siglip_bwd(a, b, s, beta, 0, torch.tensor(1.0))
        return [loss, *grads[:3], *sig]

    for x, y in zip(run(), run()):
        assert torch.equal(x, y)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check_against_reference(*_clip(0.1), a, b, s, beta)
        check_against_reference(*_siglip(), a, b, s, beta)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- bad input
def _ok():
    a, b = features(4, 6, 8, torch.float32, seed=0)
    return a, b, torch.tensor(10.0), torch.tensor(0.0)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, b, s, c: (a[:, ::2], b[:, ::2], s, c), "contiguous"),
        (lambda a, b, s, c: (a[0], b, s, c), "2-D"),
        (lambda a, b, s, c: (a, b[:, :5].contiguous(), s, c), "dim"),
        (lambda a, b, s, c: (a, b.double(), s, c), "Double"),
        (lambda a, b, s, c: (a.double(), b.double(), s, c), "float32, float16 or bfloat16"),
        (lambda a, b, s, c: (a, b, s.double(), c), "scale must be a one-element float32"),
        (lambda a, b, s, c: (a, b, s, torch.zeros(2)), "bias must be a one-element float32"),
        (lambda a, b, s, c: (a.to("meta"), b.to("meta"), s, c), "CPU tensors"),
        (lambda a, b, s, c: (a[:0], b, s, c), "at least one row"),
    ],
    ids=[
        "strided",
        "1-D",
        "dim-mismatch",
        "dtype-mismatch",
        "fp64",
        "scale-dtype",
        "bias-shape",
        "meta",
        "empty",
    ],
)
def test_extension_rejects_bad_input(mutate, match):
    a, b, s, c = mutate(*_ok())
    with pytest.raises(RuntimeError, match=match):
        _C.contrastive_siglip_fwd(a, b, s, c, 0)
    with pytest.raises(RuntimeError, match=match):
        _C.contrastive_clip_fwd(a, b, s, c, 0.0, 0, False)


def test_extension_rejects_bad_problem():
    a, b, s, c = _ok()
    with pytest.raises(RuntimeError, match="offset 3 with 4 rows does not fit 6 columns"):
        _C.contrastive_clip_fwd(a, b, s, c, 0.0, 3, False)
    with pytest.raises(RuntimeError, match="symmetric=True needs a square problem"):
        _C.contrastive_clip_fwd(a, b, s, c, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="label_smoothing must be in"):
        _C.contrastive_clip_fwd(a, b, s, c, 1.0, 0, False)
    _, lse_row, _ = _C.contrastive_clip_fwd(a, b, s, c, 0.0, 0, False)
    with pytest.raises(RuntimeError, match=r"lse_row must be a contiguous float64 CPU tensor of shape \(4\)"):
        _C.contrastive_clip_bwd(a, b, s, c, 0.0, 0, False, lse_row[:3], None, torch.tensor(1.0))
    sq = a[:4], b[:4].contiguous()
    with pytest.raises(RuntimeError, match="symmetric=True needs lse_col"):
        _C.contrastive_clip_bwd(*sq, s, c, 0.0, 0, True, lse_row, None, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="grad must be a one-element float32"):
        _C.contrastive_siglip_bwd(a, b, s, c, 0, torch.tensor([1.0, 2.0]))


def test_public_api_wrapper_makes_inputs_contiguous():
    """The Python wrapper hands strided views to the extension as contiguous copies."""
    a, b = features(37, 37, 38, torch.float32, seed=2)
    av, bv = a[:, ::2], b[:, 1::2]
    s, beta = torch.tensor(10.0), torch.tensor(-3.0)
    got = C.siglip_loss(av, bv, s, beta, backend="cpp")
    want = C.siglip_loss_reference(av.double(), bv.double(), s.double(), beta.double())
    assert_error_bound(got, want, C.siglip_loss_reference(av, bv, s, beta), name="loss")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_torch_compile_traces_the_cpp_backend(kind):
    """Dynamo + AOTAutograd (aot_eager) over the mmfast:: custom ops with backend="cpp": no graph
    break, and the compiled loss and gradients are bit-identical to eager."""
    torch._dynamo.reset()
    a, b = features(37, 37, 19, torch.float32, seed=5)
    s, beta = torch.tensor(10.0), torch.tensor(-2.0)
    if kind == "clip":

        def fn(a, b, s, bias):
            return C.clip_loss(a, b, s, bias, label_smoothing=0.1, backend="cpp")
    else:

        def fn(a, b, s, bias):
            return C.siglip_loss(a, b, s, bias, backend="cpp")

    eager = loss_and_grads(fn, a, b, s, beta)
    compiled = loss_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), a, b, s, beta)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0, msg=name)
