"""open_clip's losses on 2 gloo ranks: mmfast.nn's DistillClipLoss (every local_loss / gather_with_grad
combination), get_logits, and the fp64 paths, against open_clip's own classes on the same ranks.

One module-scoped fixture spawns the ranks once; each runs every case and saves its results; the
tests compare them in the parent. Bound: ours (fp32) vs open_clip in fp64 within 2x open_clip's fp32
error, per rank, for the losses and every gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from mmfast.testing import assert_error_bound, rank_result, run_ranks

pytestmark = pytest.mark.distributed
pytest.importorskip("open_clip.loss")

WORLD = 2
N_LOCAL = 13
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)


def _global(seed):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * N_LOCAL

    def f(d):
        return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)

    img, txt, dimg, dtxt = f(11), f(11), f(7), f(7)
    return img, txt, torch.tensor(12.0, dtype=torch.float64), dimg, dtxt, torch.tensor(20.0, dtype=torch.float64)


def _local(t, rank):
    return t[rank * N_LOCAL:(rank + 1) * N_LOCAL] if t.dim() else t


def _call(mod, ins, dtype, grad_idx):
    x = [t.detach().to(dtype, copy=True).requires_grad_(i in grad_idx) for i, t in enumerate(ins)]
    out = mod(*x)
    losses = list(out) if isinstance(out, tuple) else [out]
    sum(losses).backward()
    return [l.detach() for l in losses] + [x[i].grad for i in grad_idx]


def _run_case(kind, arg, rank):
    import open_clip.loss as ocl

    import mmfast.nn as mnn

    ins = [_local(t, rank) for t in _global(7)]
    if kind == "distill":
        flags = {"local_loss": arg[0], "gather_with_grad": arg[1], "rank": rank, "world_size": WORLD}
        theirs, ours = ocl.DistillClipLoss(**flags), mnn.DistillClipLoss(**flags)
        return {name: _call(mod, ins, dt, (0, 1, 2)) for name, mod, dt in
                (("ref", theirs, torch.float64), ("lowp", theirs, torch.float32), ("ours", ours, torch.float32))}
    if kind == "get_logits":
        flags = {"local_loss": arg[0], "gather_with_grad": arg[1], "rank": rank, "world_size": WORLD}
        out = {}
        for name, mod in (("theirs", ocl.ClipLoss(**flags)), ("ours", mnn.ClipLoss(**flags))):
            img, txt = (t.detach().float().requires_grad_() for t in ins[:2])
            per_img, per_txt = mod.get_logits(img, txt, ins[2].float(), logit_bias=torch.tensor(-1.0))
            (per_img.square().sum() + per_txt.sum()).backward()
            out[name] = [per_img.detach(), per_txt.detach(), img.grad, txt.grad,
                         mod.get_ground_truth(img.device, per_img.shape[0])]
        return out
    if kind == "fp64_clip":
        flags = {"local_loss": arg[0], "gather_with_grad": arg[1], "rank": rank, "world_size": WORLD}
        return {name: _call(mod, ins[:3], torch.float64, (0, 1, 2)) for name, mod in
                (("theirs", ocl.ClipLoss(**flags)), ("ours", mnn.ClipLoss(**flags)))}
    if kind == "fp64_siglip":
        args = ins[:3] + [torch.tensor(-3.0, dtype=torch.float64)]
        return {name: _call(mod, args, torch.float64, (0, 1, 2, 3)) for name, mod in
                (("theirs", ocl.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=arg)),
                 ("ours", mnn.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=arg)))}
    raise ValueError(kind)


CASES = ([("distill", f) for f in FLAGS] + [("get_logits", f) for f in FLAGS] + [("fp64_clip", f) for f in FLAGS]
         + [("fp64_siglip", "bidir"), ("fp64_siglip", "gather")])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_run_case, CASES, WORLD, str(tmp_path_factory.mktemp("oc_dist")))


@pytest.mark.parametrize("flags", FLAGS, ids=[f"local{int(a)}-gwg{int(b)}" for a, b in FLAGS])
def test_distill_matches_open_clip(results, flags):
    names = ["contrastive_loss", "distill_loss", "d image", "d text", "d logit_scale"]
    for rank in range(WORLD):
        r = rank_result(results, rank, ("distill", flags))
        for name, o, ref, lowp in zip(names, r["ours"], r["ref"], r["lowp"]):
            assert o.dtype == lowp.dtype, name
            assert_error_bound(o, ref, lowp, name=f"rank {rank} {name}")


@pytest.mark.parametrize("flags", FLAGS, ids=[f"local{int(a)}-gwg{int(b)}" for a, b in FLAGS])
def test_get_logits_matches_open_clip(results, flags):
    for rank in range(WORLD):
        r = rank_result(results, rank, ("get_logits", flags))
        for i, (o, t) in enumerate(zip(r["ours"], r["theirs"])):
            assert o.shape == t.shape and o.dtype == t.dtype, i
            assert torch.allclose(o, t, rtol=1e-6, atol=1e-6), (rank, i, (o - t).abs().max().item())


@pytest.mark.parametrize("case", [("fp64_clip", f) for f in FLAGS] + [("fp64_siglip", "bidir"), ("fp64_siglip", "gather")],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_fp64_matches_open_clip(results, case):
    for rank in range(WORLD):
        r = rank_result(results, rank, case)
        for i, (o, t) in enumerate(zip(r["ours"], r["theirs"])):
            assert o.dtype == t.dtype == torch.float64, i
            assert (o - t).abs().max().item() <= 1e-12 * max(1.0, t.abs().max().item()), (rank, i)
