"""Distributed CLIP/SigLIP losses on 2 gloo ranks against one process holding the whole batch.

One module-scoped fixture spawns the two ranks once; each rank runs every case, catches its
errors, and saves losses and gradients. The tests compare them in the parent process with the
error-bound rule: fp32 distributed result vs the fp64 single-process reference, at most 2x the
fp32 single-process error.
"""

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import Facts
from mmfast.ops.contrastive import CLIP_OP, clip_loss_reference, siglip_loss_reference
from mmfast.testing import assert_error_bound, rank_result, run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
D = 19
LAYOUTS = {"even": (32, 32), "uneven": (16, 21)}  # local batch per rank; uneven sums to N=37
SMOOTHING = 0.1
OC_FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)


def _backends():
    names = ("reference", "cpp", "gemm_interpret")  # gemm_interpret: under TRITON_INTERPRET=1 (the tests' default)
    return [b for b in names if not CLIP_OP.reasons(b, Facts("cpu", torch.float32))]


def _global_inputs(layout, seed):
    n = sum(LAYOUTS[layout])
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    scale = 8.0 + 4 * torch.rand((), generator=g, dtype=torch.float64)
    bias = torch.randn((), generator=g, dtype=torch.float64) - 3.0
    return img, txt, scale, bias


def _shard(t, layout, rank):
    sizes = LAYOUTS[layout]
    return t[sum(sizes[:rank]) : sum(sizes[: rank + 1])]


def _leaves(tensors, dtype):
    return [t.detach().to(dtype, copy=True).requires_grad_() for t in tensors]


def _grads(loss, leaves):
    loss.backward()
    return {"loss": loss.detach(), "img": leaves[0].grad, "txt": leaves[1].grad,
            "scale": leaves[2].grad, "bias": None if len(leaves) < 4 else leaves[3].grad}


def _cases(backends):
    cases = []
    for b in backends:
        for layout in LAYOUTS:
            cases += [("clip", b, layout), ("siglip", b, layout)]
    cases += [("open_clip", f"{int(ll)}{int(gw)}", "even") for ll, gw in OC_FLAGS]
    cases += [("open_clip_siglip", "bidir", "even")]
    return cases


def _run_case(kind, arg, layout, rank):
    import torch.distributed as dist

    from mmfast.nn import ClipLoss, SigLipLoss
    from mmfast.ops import clip_loss, siglip_loss

    seed = 1000 + list(LAYOUTS).index(layout)
    img, txt, scale, bias = (_shard(t, layout, rank) if t.dim() else t for t in _global_inputs(layout, seed))
    if kind in ("clip", "siglip"):
        x = _leaves([img, txt, scale, bias], torch.float32)
        fn = clip_loss if kind == "clip" else siglip_loss
        kw = {"label_smoothing": SMOOTHING} if kind == "clip" else {}
        return _grads(fn(*x, group=dist.group.WORLD, backend=arg, **kw), x)
    import open_clip.loss as ocl

    out = {}
    if kind == "open_clip":
        ll, gw = bool(int(arg[0])), bool(int(arg[1]))
        ins = [img, txt, scale, bias]
        flags = {"local_loss": ll, "gather_with_grad": gw, "rank": rank, "world_size": WORLD}
        theirs, ours = ocl.ClipLoss(**flags), ClipLoss(**flags, backend="reference")
    else:
        ins = [img, txt, scale, bias]
        theirs, ours = ocl.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=arg), SigLipLoss(
            rank=rank, world_size=WORLD, dist_impl=arg, backend="reference"
        )
    for name, mod, dtype in (("ref", theirs, torch.float64), ("lowp", theirs, torch.float32),
                             ("ours", ours, torch.float32)):
        x = _leaves(ins, dtype)
        out[name] = _grads(mod(*x), x)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_run_case, _cases(_backends()), WORLD, str(tmp_path_factory.mktemp("dist")))


def _single(kind, layout, dtype):
    x = _leaves(_global_inputs(layout, 1000 + list(LAYOUTS).index(layout)), dtype)
    if kind == "clip":
        loss = clip_loss_reference(*x, label_smoothing=SMOOTHING)
    else:
        loss = siglip_loss_reference(*x)
    return _grads(loss, x)


def _check(got, ref, lowp, rank, layout, what, zero=()):
    for key in ("loss", "img", "txt", "scale", "bias"):
        r, lo = ref[key], lowp[key]
        if key in ("img", "txt") and layout is not None:
            r, lo = _shard(r, layout, rank), _shard(lo, layout, rank)
        if r is None:
            assert got[key] is None, f"{what} rank {rank}: unexpected gradient for {key}"
        elif key in zero:  # exactly 0 in exact arithmetic: both fp32 values are rounding noise
            assert abs(got[key].item()) <= 64 * torch.finfo(torch.float32).eps, f"{what}: d{key}={got[key].item()}"
        else:
            assert_error_bound(got[key], r, lo, name=f"{what} rank {rank} {key}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "gemm_interpret"])
def test_global_batch_semantics(results, backend, kind, layout):
    if backend not in _backends():
        pytest.skip(f"backend {backend} unavailable here")
    ref, lowp = _single(kind, layout, torch.float64), _single(kind, layout, torch.float32)
    for rank in range(WORLD):
        got = rank_result(results, rank, (kind, backend, layout))
        zero = {"bias"} if kind == "clip" else ()
        _check(got, ref, lowp, rank, layout, f"{kind}/{backend}/{layout}", zero)


@pytest.mark.parametrize("local_loss,gather_with_grad", OC_FLAGS)
def test_clip_loss_matches_open_clip_two_ranks(results, local_loss, gather_with_grad):
    pytest.importorskip("open_clip")
    case = ("open_clip", f"{int(local_loss)}{int(gather_with_grad)}", "even")
    for rank in range(WORLD):
        got = rank_result(results, rank, case)
        _check(got["ours"], got["ref"], got["lowp"], rank, None, f"ClipLoss{case[1]}", zero={"bias"})


def test_siglip_loss_matches_open_clip_two_ranks(results):
    pytest.importorskip("open_clip")
    for rank in range(WORLD):
        got = rank_result(results, rank, ("open_clip_siglip", "bidir", "even"))
        _check(got["ours"], got["ref"], got["lowp"], rank, None, "SigLipLoss")
