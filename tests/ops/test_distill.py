"""The streaming distillation op (``clip_distill_rows_sum`` / ``clip_distill_loss``) against the full-logits
formula open_clip's ``DistillClipLoss`` uses.

Rule: loss and every gradient within 2x PyTorch's own error in the same dtype, against fp64 on the
same (rounded) inputs; kernel outputs poisoned with NaN before launch; odd and round shapes, rectangular
one-sided problems, teacher of another width, logit scales up to open_clip's clamp (100).
"""
import pytest
import torch
from contrastive_helpers import features

import mmfast.ops._distill_triton as dt_mod
from mmfast.ops._dispatch import BackendUnavailableError
from mmfast.ops.contrastive import (
    clip_distill_loss,
    clip_distill_loss_reference,
    clip_distill_rows_sum,
)
from mmfast.testing import LiveBytes, assert_error_bound

BACKENDS = ["reference", "triton_interpret"]
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_dist_image", "d_dist_text", "d_dist_scale"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(dt_mod, "POISON_OUTPUTS", True)


def _rows_reference(a, b, s, c, e, t):
    S = s * a @ b.t()
    T = t * c @ e.t()
    return -(T.softmax(dim=1) * S.log_softmax(dim=1)).sum()


def _pair(m, k, d, seed):
    if m <= k:
        return features(m, k, d, torch.float64, seed=seed)
    b, a = features(k, m, d, torch.float64, seed=seed)
    return a, b


def _problem(m, k, d, dt, dtype, seed, s=14.0, t=30.0):
    a, b = _pair(m, k, d, seed)
    c, e = _pair(m, k, dt, seed + 1)
    # the teacher agrees with the student in part: its logits are correlated with the student's
    c = c + 0.5 * torch.nn.functional.pad(a, (0, max(0, dt - d)))[:, :dt]
    e = e + 0.5 * torch.nn.functional.pad(b, (0, max(0, dt - d)))[:, :dt]
    rounded = [x.to(dtype) for x in (a, b, c, e)]
    return rounded, torch.tensor(s), torch.tensor(t)


def _run(fn, tensors, scales, dtype, teacher_grad, **kw):
    a, b, c, e = [x.detach().to(dtype).requires_grad_(i < 2 or teacher_grad) for i, x in enumerate(tensors)]
    s, t = [x.detach().clone().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(
        i == 0 or teacher_grad) for i, x in enumerate(scales)]
    loss = fn(a, b, s, c, e, t, **kw)
    want = [a, b, s] + ([c, e, t] if teacher_grad else [])
    grads = torch.autograd.grad(loss, want)
    return [loss.detach(), *grads]


def _check(fn, ref_fn, tensors, scales, dtype, teacher_grad, **kw):
    got = _run(fn, tensors, scales, dtype, teacher_grad, **kw)
    ref = _run(ref_fn, [x.double() for x in tensors], scales, torch.float64, teacher_grad)
    lowp = _run(ref_fn, tensors, scales, dtype, teacher_grad)
    assert len(got) == (7 if teacher_grad else 4)
    for name, g, r, l in zip(NAMES, got, ref, lowp):
        if name == "loss":  # the one-sided sum comes back fp64: compared in the caller's dtype
            g = g.to(l.dtype)
        assert g.dtype == l.dtype, f"{name}: {g.dtype} != {l.dtype}"
        assert_error_bound(g, r, l, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,dt", [(37, 19, 23), (64, 32, 32)])
def test_symmetric_matches_open_clip_formula(backend, dtype, n, d, dt):
    tensors, s, t = _problem(n, n, d, dt, dtype, seed=n + d)
    _check(clip_distill_loss, clip_distill_loss_reference, tensors, (s, t), dtype, False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_gradients(backend, dtype):
    tensors, s, t = _problem(29, 29, 16, 24, dtype, seed=5)
    _check(clip_distill_loss, clip_distill_loss_reference, tensors, (s, t), dtype, True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k", [(21, 45), (45, 21)])
def test_one_sided_rectangular(backend, m, k):
    tensors, s, t = _problem(m, k, 24, 17, torch.float32, seed=m * k)
    _check(clip_distill_rows_sum, _rows_reference, tensors, (s, t), torch.float32, True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logit_scales(backend):
    """open_clip clamps the scale at 100: row softmaxes nearly one-hot, lse far from 0."""
    tensors, s, t = _problem(33, 33, 20, 20, torch.float32, seed=11, s=100.0, t=100.0)
    _check(clip_distill_loss, clip_distill_loss_reference, tensors, (s, t), torch.float32, True, backend=backend)


def test_fp64_reference_path_and_kernel_refusal():
    tensors, s, t = _problem(17, 17, 8, 8, torch.float64, seed=2)
    got = _run(clip_distill_loss, tensors, (s, t), torch.float64, True)
    ref = _run(clip_distill_loss_reference, tensors, (s, t), torch.float64, True)
    assert got[0].dtype == torch.float64
    for name, g, r in zip(NAMES, got, ref):
        assert g.dtype == torch.float64, name
        assert (g - r).abs().max().item() < 1e-12 * max(1.0, r.abs().max().item()), name
    with pytest.raises(BackendUnavailableError, match="float64"):
        clip_distill_loss(*tensors[:2], s, *tensors[2:], t, backend="triton_interpret")


def test_bad_arguments_are_named():
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="rows"):
        clip_distill_loss(a, b, 10.0, torch.randn(7, 4), torch.randn(8, 4), 10.0)
    with pytest.raises(ValueError, match="dist_text_features"):
        clip_distill_loss(a, b, 10.0, torch.randn(8, 4), torch.randn(8, 5), 10.0)
    with pytest.raises(TypeError, match="dist_image_features"):
        clip_distill_loss(a, b, 10.0, torch.randn(8, 4).long(), torch.randn(8, 4), 10.0)
    with pytest.raises(ValueError, match="dist_logit_scale"):
        clip_distill_loss(a, b, 10.0, a, b, torch.ones(2))


@pytest.fixture
def one_thread():
    """Many small ops: on a shared 2-core runner the intra-op thread hand-offs cost 100x the work."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _extra_bytes(n, d, backend):
    tensors, s, t = _problem(n, n, d, d, torch.float32, seed=n)
    a, b = [x.requires_grad_() for x in tensors[:2]]
    c, e = tensors[2:]
    s.requires_grad_()
    with LiveBytes() as lb:
        loss = clip_distill_loss(a, b, s, c, e, t, backend=backend)
        loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    return lb.peak


def test_extra_memory_is_linear_in_n_blockwise(one_thread):
    """The CPU path: N = 2048 keeps far less alive than one N×N fp32 logit matrix, and doubling N
    about doubles the peak (O(N·d) plus a fixed-size row block), where the N×N logits would quadruple it."""
    d = 32
    p1, p2 = _extra_bytes(1024, d, "reference"), _extra_bytes(2048, d, "reference")
    nn_bytes = 2048 * 2048 * 4
    print(f"blockwise peak extra bytes: N=1024 {p1}, N=2048 {p2}; one N×N fp32 matrix at 2048: {nn_bytes}")
    assert p2 < nn_bytes / 4, f"{p2} bytes at N=2048 is not far below N*N*4 = {nn_bytes}"
    assert p2 < 2.5 * p1, f"peak grew {p2 / p1:.2f}x from N=1024 to 2048: not linear"


def test_extra_memory_is_linear_in_n_triton(one_thread):
    """The kernel path allocates only O(N·d) accumulators and O(N) statistics (torch-side)."""
    d = 32
    p1, p2 = _extra_bytes(256, d, "triton_interpret"), _extra_bytes(512, d, "triton_interpret")
    print(f"triton peak extra bytes: N=256 {p1}, N=512 {p2}")
    assert p2 <= 20 * 512 * d * 4, f"{p2} bytes is more than a few (N, d) fp32 buffers"
    assert p2 < 2.5 * p1
