"""Helpers shared by the contrastive-loss tests (test_contrastive.py, test_contrastive_cpp.py).

pytest puts this folder on ``sys.path`` (rootdir-relative imports, no ``__init__.py``), so the tests
import it as ``contrastive_helpers``.
"""
from __future__ import annotations

import math

import torch

from mmfast.testing import assert_error_bound


def features(m, k, d, dtype, *, seed, offset=0, unit=True, device="cpu"):
    """Paired, unnormalised features a (m, d), b (k, d): b's positive rows ``offset:offset+m`` are
    noisy copies of a's; with ``unit`` the row norms vary around 1 (as after a projection head)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, d, generator=g, dtype=torch.float64)
    b[offset : offset + m] = 0.8 * a + 0.6 * b[offset : offset + m]
    if unit:
        a = a / math.sqrt(d) * (0.5 + 1.5 * torch.rand(m, 1, generator=g, dtype=torch.float64))
        b = b / math.sqrt(d) * (0.5 + 1.5 * torch.rand(k, 1, generator=g, dtype=torch.float64))
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def loss_and_grads(fn, a, b, scale, bias):
    """``fn(a, b, scale, bias)`` on fresh leaves: the loss and the gradient of every tensor input."""
    leaves = [t.detach().clone().requires_grad_() for t in (a, b, scale)]
    leaves.append(None if bias is None else bias.detach().clone().requires_grad_())
    loss = fn(*leaves)
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, want)
    out = {"loss": loss.detach(), "d_image": grads[0], "d_text": grads[1], "d_scale": grads[2]}
    if bias is not None:
        out["d_bias"] = grads[3]
    return out


def check_against_reference(fn, ref_fn, a, b, scale, bias):
    """fn (the backend under test, in a's dtype) vs ref_fn in fp64; the yardstick is ref_fn (PyTorch)
    in a's dtype. Gradients must come back in their inputs' dtype (the fused loss is always fp32)."""
    got = loss_and_grads(fn, a, b, scale, bias)
    ref = loss_and_grads(ref_fn, *[None if t is None else t.double() for t in (a, b, scale, bias)])
    lowp = loss_and_grads(ref_fn, a, b, scale, bias)
    assert set(got) == set(ref)
    for name in ref:
        if name != "loss":
            assert got[name].dtype == lowp[name].dtype, name
        assert_error_bound(got[name], ref[name], lowp[name], name=name)
