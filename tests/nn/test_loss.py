"""mmfast.nn.ClipLoss / SigLipLoss against open_clip's losses (single process, fp32).

Reference: open_clip in fp64; bound: 2x open_clip's own fp32 error (loss and every gradient).
"""
import pytest
import torch

from mmfast.ops._dispatch import Facts
from mmfast.ops.contrastive import CLIP_OP, clip_loss_reference
from mmfast.testing import assert_error_bound

open_clip_loss = pytest.importorskip("open_clip.loss")

SHAPES = [(37, 19), (64, 32)]


def _backends():
    # The interpreter is exercised by the op tests; here the cheap backends suffice.
    out = []
    for b in ("reference", "cpp"):
        reasons = CLIP_OP.reasons(b, Facts("cpu", torch.float32))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason="; ".join(reasons)) if reasons else ()))
    return out


def _inputs(n, d, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(8.0, dtype=torch.float64) + torch.rand((), generator=g, dtype=torch.float64) * 4
    b = (torch.randn((), generator=g, dtype=torch.float64) - 3.0) if bias else None
    return img, txt, scale, b


def _run(loss_fn, tensors, dtype):
    leaves = [None if t is None else t.detach().to(dtype, copy=True).requires_grad_() for t in tensors]
    out = loss_fn(*leaves)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return [loss.detach()] + [None if t is None else t.grad for t in leaves]


def _compare(ours, ref, lowp, names, zero=()):
    """``zero``: names whose exact value is 0 (CLIP's bias gradient: softmax ignores a shared shift);
    both fp32 results are rounding noise there, so they are held to a few ulps of the unit scale."""
    checked = 0
    for o, r, l, name in zip(ours, ref, lowp, names):
        if r is None:
            assert o is None, f"{name}: expected no gradient"
            continue
        if name in zero:
            assert abs(r.item()) < 1e-12, f"{name}: fp64 reference {r.item():.3e} is not zero"
            assert o is not None and abs(o.item()) <= 64 * torch.finfo(o.dtype).eps, f"{name}: {o.item():.3e}"
        else:
            assert_error_bound(o, r, l, name=name)
        checked += 1
    assert checked >= 4


NAMES = ["loss", "d image_features", "d text_features", "d logit_scale", "d logit_bias"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_clip_loss_matches_open_clip(backend, n, d, bias):
    from mmfast.nn import ClipLoss

    tensors = _inputs(n, d, seed=n * 100 + d, bias=bias)
    theirs = open_clip_loss.ClipLoss()
    ref = _run(theirs, tensors, torch.float64)
    lowp = _run(theirs, tensors, torch.float32)
    ours = _run(ClipLoss(backend=backend), tensors, torch.float32)
    _compare(ours, ref, lowp, NAMES, zero={"d logit_bias"})


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("n,d", SHAPES)
def test_siglip_loss_matches_open_clip(backend, n, d):
    from mmfast.nn import SigLipLoss

    tensors = _inputs(n, d, seed=n * 7 + d)
    theirs = open_clip_loss.SigLipLoss()
    ref = _run(theirs, tensors, torch.float64)
    lowp = _run(theirs, tensors, torch.float32)
    ours = _run(SigLipLoss(backend=backend), tensors, torch.float32)
    _compare(ours, ref, lowp, NAMES)


def test_output_dict_and_label_smoothing():
    from mmfast.nn import ClipLoss

    tensors = _inputs(37, 19, seed=3)
    ref = _run(lambda *t: clip_loss_reference(*t, label_smoothing=0.1), tensors, torch.float64)
    lowp = _run(lambda *t: clip_loss_reference(*t, label_smoothing=0.1), tensors, torch.float32)
    module = ClipLoss(label_smoothing=0.1, backend="reference")
    ours = _run(lambda *t: module(*t, output_dict=True), tensors, torch.float32)
    _compare(ours, ref, lowp, NAMES, zero={"d logit_bias"})


def test_bad_arguments_are_named():
    from mmfast.nn import ClipLoss, SigLipLoss

    with pytest.raises(NotImplementedError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClipLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="text_features"):
        ClipLoss()(torch.randn(4, 8), torch.randn(4, 9), torch.tensor(10.0))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClipLoss(rank=0, world_size=2)(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0))
