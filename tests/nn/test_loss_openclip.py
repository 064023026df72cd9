"""mmfast.nn's ClipLoss / SigLipLoss / CoCaLoss / DistillClipLoss called exactly as open_clip 3.3's.

Numbers: loss and every gradient against open_clip's own class in fp64 (on the same rounded inputs),
within 2x open_clip's error in the inputs' dtype (fp32, bf16), odd and round batches. Interface:
get_logits / get_ground_truth equal open_clip's, output_dict and tuple forms, the returned dtype,
fp64. And open_clip_train's own ``train_one_epoch`` on a tiny model, with only the loss class swapped.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast.nn as mnn
from mmfast.ops._dispatch import Facts
from mmfast.ops.contrastive import CLIP_OP
from mmfast.testing import assert_error_bound

ocl = pytest.importorskip("open_clip.loss")


def _clip_backends():
    out = []
    for b in ("reference", "cpp", "triton_interpret"):
        reasons = CLIP_OP.reasons(b, Facts("cpu", torch.float32))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason="; ".join(reasons)) if reasons else ()))
    return out


def _features(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(0.7 * img + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def _inputs(kind, n, d, dtype, seed):
    """Positional arguments of ``forward`` (features in ``dtype``, scales fp32 as open_clip's parameters)."""
    img, txt = _features(n, d, seed, dtype)
    scale = torch.tensor(10.0 + seed % 7)
    if kind == "clip":
        return [img, txt, scale]
    if kind == "siglip":
        return [img, txt, scale, torch.tensor(-4.0)]
    dimg, dtxt = _features(n, d + 5, seed + 1, dtype)
    return [img, txt, scale, dimg, dtxt, torch.tensor(25.0)]


def _run(module, args, cast=None, grad_idx=(0, 1, 2, 3)):
    leaves = []
    for i, a in enumerate(args):
        a = a.detach().clone() if cast is None else a.detach().to(cast)
        leaves.append(a.requires_grad_(i in grad_idx and a.is_floating_point()))
    out = module(*leaves)
    losses = list(out) if isinstance(out, tuple) else [out]
    total = sum(losses)
    want = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(total, want)
    return [l.detach() for l in losses], list(grads)


def _compare(ours, ref, lowp, zero_bias=False):
    (ol, og), (rl, rg), (ll, lg) = ours, ref, lowp
    assert len(ol) == len(rl) and len(og) == len(rg)
    for i, (o, r, l) in enumerate(zip(ol, rl, ll)):
        assert o.dtype == l.dtype, f"loss {i}: dtype {o.dtype} != open_clip's {l.dtype}"
        assert_error_bound(o, r, l, name=f"loss {i}")
    for i, (o, r, l) in enumerate(zip(og, rg, lg)):
        assert o.dtype == l.dtype, f"grad {i}: dtype {o.dtype} != open_clip's {l.dtype}"
        if zero_bias and i == len(og) - 1:  # CLIP's bias gradient is exactly 0 (softmax ignores a shift)
            assert abs(r.item()) < 1e-12 and abs(o.item()) <= 64 * torch.finfo(o.dtype).eps
            continue
        assert_error_bound(o, r, l, name=f"grad {i}")


CLASSES = {"clip": ("ClipLoss", {}), "siglip": ("SigLipLoss", {}), "distill": ("DistillClipLoss", {})}


@pytest.mark.parametrize("backend", _clip_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [37, 64])
@pytest.mark.parametrize("kind", ["clip", "siglip", "distill"])
def test_losses_and_gradients_match_open_clip(kind, n, dtype, backend):
    if backend == "reference" and dtype != torch.float32 and kind != "distill":
        pytest.skip("the contrastive reference backend is plain PyTorch in the inputs' dtype (the yardstick itself)")
    name, _ = CLASSES[kind]
    args = _inputs(kind, n, 24, dtype, seed=n)
    grad_idx = (0, 1, 2, 3) if kind != "distill" else (0, 1, 2)
    kw = {"backend": backend}
    if kind == "distill":
        kw["distill_backend"] = "reference" if backend == "cpp" else backend
    ref = _run(getattr(ocl, name)(), [a.double() for a in args], grad_idx=grad_idx)
    lowp = _run(getattr(ocl, name)(), args, grad_idx=grad_idx)
    ours = _run(getattr(mnn, name)(**kw), args, grad_idx=grad_idx)
    _compare(ours, ref, lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_with_bias_and_output_dict(dtype):
    img, txt, scale = _inputs("clip", 29, 16, dtype, seed=3)
    args = [img, txt, scale, torch.tensor(-2.5)]

    def dict_call(cls):
        m = cls()
        return lambda *a: m(*a, output_dict=True)["contrastive_loss"]

    ref = _run(dict_call(ocl.ClipLoss), [a.double() for a in args])
    lowp = _run(dict_call(ocl.ClipLoss), args)
    ours = _run(dict_call(mnn.ClipLoss), args)
    _compare(ours, ref, lowp, zero_bias=True)


def test_get_logits_and_get_ground_truth_equal_open_clip():
    img, txt, scale = _inputs("clip", 13, 8, torch.float32, seed=1)
    bias = torch.tensor(-1.5)
    for b in (None, bias):
        theirs = ocl.ClipLoss().get_logits(img, txt, scale, logit_bias=b)
        ours = mnn.ClipLoss().get_logits(img, txt, scale, logit_bias=b)
        assert len(ours) == 2 and all(torch.equal(o, t) for o, t in zip(ours, theirs))
        assert torch.equal(mnn.SigLipLoss().get_logits(img, txt, scale, b), ocl.SigLipLoss().get_logits(img, txt, scale, b))
    for cache in (False, True):
        t, o = ocl.ClipLoss(cache_labels=cache), mnn.ClipLoss(cache_labels=cache)
        for n in (5, 5, 7):
            lt, lo = t.get_ground_truth(img.device, n), o.get_ground_truth(img.device, n)
            assert torch.equal(lt, lo) and lo.dtype == lt.dtype
        assert o.prev_num_logits == t.prev_num_logits and set(o.labels) == set(t.labels)
    o = mnn.ClipLoss(cache_labels=True)
    assert o.get_ground_truth(img.device, 6) is o.get_ground_truth(img.device, 6)  # cached, as open_clip
    for neg in (False, True):
        for dt in (torch.float32, torch.bfloat16):
            lt = ocl.SigLipLoss().get_ground_truth(img.device, dt, 6, negative_only=neg)
            lo = mnn.SigLipLoss().get_ground_truth(img.device, dt, 6, negative_only=neg)
            assert torch.equal(lt, lo) and lo.dtype == lt.dtype
    # DistillClipLoss.dist_loss over given logits
    s, t = torch.randn(6, 6), torch.randn(6, 6)
    assert torch.equal(mnn.DistillClipLoss().dist_loss(t, s), ocl.DistillClipLoss().dist_loss(t, s))


def test_constructor_signatures_and_attributes_match():
    import inspect

    for name in ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss"):
        for meth in ("__init__", "forward", "get_logits", "get_ground_truth"):
            theirs = getattr(getattr(ocl, name), meth, None)
            if theirs is None:
                continue
            tp = [p for p in inspect.signature(theirs).parameters.values()]
            op = [p for p in inspect.signature(getattr(getattr(mnn, name), meth)).parameters.values()]
            pos = [p for p in op if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            # same names and order; same defaults, except SigLipLoss's logit_bias, which open_clip
            # requires and we let default to None (no bias): every open_clip call still means the same
            relaxed = {("SigLipLoss", "forward", "logit_bias")}
            for p_o, p_t in zip(pos, tp):
                assert p_o.name == p_t.name, (name, meth, p_o.name, p_t.name)
                if (name, meth, p_o.name) not in relaxed:
                    assert p_o.default == p_t.default, (name, meth, p_o.name)
            assert len(pos) >= len(tp), (name, meth)
            # anything beyond open_clip's is keyword-only (open_clip 4's SigLipLoss chunk_size aside)
            extra = [p.name for p in pos[len(tp):]]
            assert extra in ([], ["chunk_size"]), (name, meth, extra)
    t, o = ocl.ClipLoss(True, True, True, 0, 1), mnn.ClipLoss(True, True, True, 0, 1)
    for attr in ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size", "use_horovod"):
        assert getattr(o, attr) == getattr(t, attr), attr
    o = mnn.CoCaLoss(2.0, 1.0, 3)
    assert (o.caption_loss_weight, o.clip_loss_weight, o.caption_loss.ignore_index) == (2.0, 1.0, 3)
    assert mnn.SigLipLoss(False, 0, 1, "shift").dist_impl == "shift"
    with pytest.raises(NotImplementedError, match="use_horovod"):
        mnn.DistillClipLoss(use_horovod=True)
    with pytest.raises(NotImplementedError, match="use_horovod"):
        mnn.CoCaLoss(1.0, 1.0, use_horovod=True)


def _coca_inputs(dtype, seed=0, b=3, L=7, h=12, v=23, pad=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = _features(b, 10, seed, dtype)
    hidden = torch.randn(b, L, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype)
    labels = torch.randint(1, v, (b, L), generator=g)
    labels[0, -2:] = pad  # padding, ignored
    return img, txt, hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_coca_matches_open_clip(dtype, fused):
    img, txt, hidden, weight, labels = _coca_inputs(dtype)
    scale = torch.tensor(12.0)

    def theirs(cast):
        def f(i, t, h, w, s):
            return ocl.CoCaLoss(2.0, 0.5)(i, t, h @ w.T, labels, s)
        return f

    def ours(i, t, h, w, s):
        m = mnn.CoCaLoss(2.0, 0.5)
        if fused:
            return m(i, t, None, labels, s, caption_hidden=h, caption_weight=w)
        return m(i, t, h @ w.T, labels, s)

    args = [img, txt, hidden, weight, scale]
    idx = (0, 1, 2, 3, 4)
    ref = _run(theirs(None), [a.double() for a in args], grad_idx=idx)
    lowp = _run(theirs(None), args, grad_idx=idx)
    got = _run(ours, args, grad_idx=idx)
    _compare(got, ref, lowp)
    d = mnn.CoCaLoss(2.0, 0.5)(img, txt, hidden @ weight.T, labels, scale, output_dict=True)
    assert set(d) == {"contrastive_loss", "caption_loss"}


def test_coca_zero_clip_weight_and_errors():
    img, txt, hidden, weight, labels = _coca_inputs(torch.float32)
    logits = hidden @ weight.T
    t = ocl.CoCaLoss(1.0, 0.0)(img, txt, logits, labels, torch.tensor(5.0))
    o = mnn.CoCaLoss(1.0, 0.0)(img, txt, logits, labels, torch.tensor(5.0))
    assert o[0].dtype == t[0].dtype == torch.int64 and o[0].item() == 0
    assert torch.equal(o[1], t[1])
    with pytest.raises(ValueError, match="logits"):
        mnn.CoCaLoss(1.0, 1.0)(img, txt, None, labels, torch.tensor(5.0))
    with pytest.raises(ValueError, match="caption_hidden"):
        mnn.CoCaLoss(1.0, 1.0)(img, txt, None, labels, torch.tensor(5.0), caption_weight=weight)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_returned_dtype_is_open_clips(dtype, autocast):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    for kind in ("clip", "siglip", "distill"):
        name, _ = CLASSES[kind]
        args = _inputs(kind, 9, 8, dtype, seed=2)
        with ctx:
            t = getattr(ocl, name)()(*args)
            o = getattr(mnn, name)()(*args)
        t, o = (t, o) if isinstance(t, tuple) else ((t,), (o,))
        assert [x.dtype for x in o] == [x.dtype for x in t], (kind, dtype, autocast)
    img, txt, hidden, weight, labels = _coca_inputs(dtype)
    with ctx:
        t = ocl.CoCaLoss(1.0, 1.0)(img, txt, hidden @ weight.T, labels, torch.tensor(3.0))
        o = mnn.CoCaLoss(1.0, 1.0)(img, txt, hidden @ weight.T, labels, torch.tensor(3.0))
        assert [x.dtype for x in o] == [x.dtype for x in t]
        if dtype != torch.float64:
            of = mnn.CoCaLoss(1.0, 1.0)(img, txt, None, labels, torch.tensor(3.0), caption_hidden=hidden,
                                        caption_weight=weight)
            assert [x.dtype for x in of] == [x.dtype for x in t]


def test_fp64_matches_open_clip():
    for kind in ("clip", "siglip", "distill"):
        name, _ = CLASSES[kind]
        args = _inputs(kind, 11, 6, torch.float64, seed=4)
        args = [a.double() for a in args]
        t = _run(getattr(ocl, name)(), args, grad_idx=range(6))
        o = _run(getattr(mnn, name)(), args, grad_idx=range(6))
        for x, y in zip(t[0] + t[1], o[0] + o[1]):
            assert y.dtype == x.dtype == torch.float64
            assert (x - y).abs().max().item() <= 1e-12 * max(1.0, x.abs().max().item()), kind


# --------------------------------------------------------------------------- open_clip_train, unchanged
class _Tiny(nn.Module):
    """A CLIP-shaped toy: linear image tower, bag-of-tokens text tower, learnable logit scale (and bias,
    and a caption head for CoCa), returning the dict open_clip's models return."""

    def __init__(self, seed, kind, d_img=12, vocab=17, dim=10):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.visual = nn.Linear(d_img, dim)
        self.tok = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0)) if kind == "siglip" else None

    def forward(self, images, texts):
        out = {
            "image_features": F.normalize(self.visual(images), dim=-1),
            "text_features": F.normalize(self.tok(texts).mean(1), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if self.kind == "coca":
            out["logits"] = self.head(self.tok(texts[:, :-1]))
            out["labels"] = texts[:, 1:]
        return out


class _Loader(list):
    @property
    def num_batches(self):
        return len(self)

    @property
    def num_samples(self):
        return sum(len(b[0]) for b in self)


class _Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.log = inner, []

    def forward(self, **kw):
        out = self.inner(**kw)
        self.log.append(sum(v.detach().double() for v in out.values()))
        out = dict(out)
        return out


def _train(loss, kind, dtype, precision="fp32", accum_freq=1, steps=4, batch=9):
    from open_clip_train.train import train_one_epoch

    g = torch.Generator().manual_seed(0)
    batches = _Loader(
        (torch.randn(batch, 12, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 17, (batch, 6), generator=g))
        for _ in range(steps * accum_freq)
    )
    model = _Tiny(1, kind).to(dtype)
    dist_model = _Tiny(2, "clip").to(dtype) if kind == "distill" else None
    args = SimpleNamespace(
        device="cpu", precision=precision, distill=kind == "distill", accum_freq=accum_freq, skip_scheduler=True,
        horovod=False, grad_clip_norm=None, log_every_n_steps=1, batch_size=batch, world_size=1, rank=0,
        local_rank=0, wandb=False,
    )
    data = {"train": SimpleNamespace(set_epoch=lambda e: None, dataloader=batches)}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = _Recorder(loss)
    train_one_epoch(model, data, rec, 0, opt, None, None, dist_model, args)
    params = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    return torch.stack(rec.log), params


TRAIN_CASES = [
    ("clip", lambda m: m.ClipLoss(cache_labels=True), "fp32", 1),
    ("clip", lambda m: m.ClipLoss(cache_labels=True), "fp32", 2),
    ("clip", lambda m: m.ClipLoss(cache_labels=True), "amp_bf16", 1),
    ("siglip", lambda m: m.SigLipLoss(), "fp32", 1),
    ("coca", lambda m: m.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, cache_labels=True), "fp32", 1),
    ("distill", lambda m: m.DistillClipLoss(cache_labels=True), "fp32", 1),
]


@pytest.mark.parametrize("kind,make,precision,accum", TRAIN_CASES, ids=[f"{c[0]}-{c[2]}-accum{c[3]}" for c in TRAIN_CASES])
def test_open_clip_train_one_epoch_runs_unchanged(kind, make, precision, accum):
    """open_clip_train.train.train_one_epoch, as shipped, on a tiny model: only the loss object differs.
    Per-step losses and the final parameters: ours (fp32) vs open_clip in fp64 within 2x open_clip's
    fp32 (or amp_bf16) error."""
    ref_losses, ref_params = _train(make(ocl), kind, torch.float64, "fp32", accum)
    low_losses, low_params = _train(make(ocl), kind, torch.float32, precision, accum)
    our_losses, our_params = _train(make(mnn), kind, torch.float32, precision, accum)
    assert len(our_losses) == len(ref_losses) >= 4
    assert_error_bound(our_losses, ref_losses, low_losses, name="per-step losses")
    assert_error_bound(our_params, ref_params, low_params, name="trained parameters")
