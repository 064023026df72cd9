"""Fused contrastive losses (CLIP InfoNCE and SigLIP) that never store the N×N logits.

Math. For features ``a`` (M, d), ``b`` (K, d), scale ``s`` and bias ``β`` the logits are
``z_ij = s · a_i·b_j + β``. The positive of row i is column ``i + offset``.

* CLIP, one side ("rows"):  Σ_i [ lse_j z_ij − (1−ε) z_i,i+off − (ε/K) Σ_j z_ij ]
* CLIP symmetric (M = K, offset 0): rows + the same over columns; the loss is that sum / (2N).
* SigLIP: Σ_ij softplus(−y_ij z_ij), y = +1 on positives, −1 elsewhere; the loss is that sum / N.

Backend contract (``triton``/``triton_interpret`` (fused kernels), ``gemm``/``gemm_interpret`` (row chunks through
vendor GEMMs, ``_contrastive_gemm.py``) and ``cpp`` implement it; sums, not means):

    clip_fwd(a, b, scale, bias, label_smoothing, offset, symmetric)
        -> (loss_sum: fp32 0-d, lse_row: fp64 (M,), lse_col: fp64 (K,) or None)
    clip_bwd(a, b, scale, bias, label_smoothing, offset, symmetric, lse_row, lse_col, grad)
        -> (da, db, dscale, dbias)        # grad = d(total)/d(loss_sum), a 0-d fp32 tensor
    siglip_fwd(a, b, scale, bias, offset) -> loss_sum: fp32 0-d
    siglip_bwd(a, b, scale, bias, offset, grad) -> (da, db, dscale, dbias)

``scale`` and ``bias`` arrive as fp32 0-d tensors on the features' device (``bias`` may be None for
CLIP; then ``dbias`` is None). ``da``/``db`` come back in the features' dtype, ``dscale``/``dbias``
as fp32 0-d tensors. ``lse_row``/``lse_col`` are the row/column log-sum-exp in fp64, so that the
backward's ``exp(z − lse)`` does not lose the bits an fp32 rounding of a large lse would cost;
callers hand them back to the same backend's ``clip_bwd``.
The ``reference`` backend is plain PyTorch autograd over the full logits.

Distillation (open_clip's ``DistillClipLoss`` term) is its own op, ``clip_distill``: with student
logits ``S = s·a bᵀ`` and teacher logits ``T = t·c eᵀ`` (M, K), one side is
``Σ_i −Σ_j softmax(T)_ij log_softmax(S)_ij`` and the symmetric loss averages the image→text and
text→image sides. Backends ``triton``/``triton_interpret`` (``_distill_triton.py``) and ``reference``
(``_distill_blockwise.py``: row blocks in PyTorch, also fp64) implement, never storing (M, K):

    distill_fwd(a, b, scale, c, e, tscale) -> (loss_sum fp64 0-d, lse_s, lse_t, mu: fp64 (M,))
    distill_bwd(a, b, scale, c, e, tscale, lse_s, lse_t, mu, grad, teacher)
        -> (da, db, dscale, dc, de, dtscale)      # the teacher's three are None unless ``teacher``

``scale``/``tscale`` arrive as fp32 0-d tensors (fp64 for fp64 features); the loss sum is fp64 (so
that the mean is rounded once, to the caller's dtype), ``dscale``/``dtscale`` fp32 (fp64 for fp64
features), feature gradients in the features' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import Backend, Facts, KernelBackend, Op, check_backend_name, register
from mmfast.ops._host import autocast_inputs, constant_result, next_pow2

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference (oracle)
def _logits(a, b, scale, bias):
    z = scale * (a @ b.t())  # (M, K)
    return z if bias is None else z + bias


def clip_rows_reference(a, b, scale, bias=None, label_smoothing=0.0, offset=0):
    """Σ over rows of the (smoothed) cross-entropy of ``z = s a bᵀ + β`` with targets i+offset."""
    z = _logits(a, b, scale, bias)
    target = torch.arange(a.shape[0], device=a.device) + offset
    return F.cross_entropy(z, target, reduction="sum", label_smoothing=label_smoothing)


def clip_loss_reference(image_features, text_features, logit_scale, logit_bias=None, label_smoothing=0.0):
    """Symmetric InfoNCE ``(CE(S) + CE(Sᵀ)) / 2`` over the full logits, in PyTorch."""
    z = _logits(image_features, text_features, logit_scale, logit_bias)  # (N, N)
    target = torch.arange(z.shape[0], device=z.device)
    ce_i = F.cross_entropy(z, target, label_smoothing=label_smoothing)
    ce_t = F.cross_entropy(z.t(), target, label_smoothing=label_smoothing)
    return (ce_i + ce_t) / 2


def siglip_sum_reference(a, b, scale, bias, offset=0):
    z = _logits(a, b, scale, bias)  # (M, K)
    y = -torch.ones_like(z)
    idx = torch.arange(a.shape[0], device=a.device)
    y[idx, idx + offset] = 1.0
    return F.softplus(-y * z).sum()


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias):
    """SigLIP ``-Σ log σ(y · S) / N`` over the full logits, in PyTorch."""
    return siglip_sum_reference(image_features, text_features, logit_scale, logit_bias) / image_features.shape[0]


# --------------------------------------------------------------------------- backends
# One registration line per backend; the registration order is auto's default order. Each backend's
# forward/backward are the contract's clip_fwd/clip_bwd (siglip_fwd/siglip_bwd for SIGLIP_OP); each backend
# checks the dtypes (fp32/fp16/bf16) itself.
def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32)


def _kernel(module, fwd, bwd, **kw):
    return KernelBackend(module, fwd, bwd, **kw)


def _gemm_ops(facts: Facts) -> list[str]:
    from mmfast.ops._contrastive_gemm import missing_gemm_ops

    return missing_gemm_ops()


def _shape_class(facts: Facts) -> str:
    """The preference table's row for a call: the logits' column count K in powers of two (``k8k``,
    ``k32k``, ...; ``k<=2k`` below); ``*`` when the call's K is not known."""
    k = facts.get("k")
    if k is None:
        return "*"
    k = next_pow2(int(k))
    return "k<=2k" if k <= 2048 else f"k{k // 1024}k"


_TRI, _GEMM, _CPP = "mmfast.ops._contrastive_triton", "mmfast.ops._contrastive_gemm", "mmfast.ops._contrastive_cpp"
_GEMM_DOC = ("row chunks: vendor GEMMs (cuBLAS) + a Triton softmax stage; deterministic; scratch ≤ "
             "MMFAST_CONTRASTIVE_CHUNK_MB (256 MiB)")
# On CUDA ``gemm`` comes first: 8·N²·d at GEMM speed, where the fused kernel's backward runs far below it
# at CLIP's d = 768-1152 (issue #21); the preference table reorders by shape once the benchmark has
# measured both on a card. On CPU the interpreter's fused kernels stay ahead of the interpreted gemm path.
_ORDER = {"cuda": ("gemm", "triton")}
CLIP_OP = register(Op("clip_loss", example=_example, device_order=_ORDER, shape_class=_shape_class))
CLIP_OP.add("triton", _kernel(_TRI, "clip_fwd", "clip_bwd", devices=("cuda",), needs=("triton",),
                              doc="fused: one kernel per pass, S tiles in registers"))
CLIP_OP.add("triton_interpret", _kernel(_TRI, "clip_fwd", "clip_bwd", devices=("cpu",), needs=("triton_interpret",)))
CLIP_OP.add("gemm", _kernel(_GEMM, "clip_fwd", "clip_bwd", devices=("cuda",), needs=("triton",), doc=_GEMM_DOC,
                            check=_gemm_ops))
CLIP_OP.add("gemm_interpret", _kernel(_GEMM, "clip_fwd", "clip_bwd", devices=("cpu",), needs=("triton_interpret",),
                                      doc=_GEMM_DOC))
CLIP_OP.add("cpp", _kernel(_CPP, "clip_fwd", "clip_bwd", devices=("cpu",), needs=("cpp",)))
CLIP_OP.add("reference", Backend(devices=None, doc="plain PyTorch over the full logits"))
SIGLIP_OP = register(Op("siglip_loss", example=_example, device_order=_ORDER, shape_class=_shape_class))
SIGLIP_OP.add("triton", _kernel(_TRI, "siglip_fwd", "siglip_bwd", devices=("cuda",), needs=("triton",),
                                doc="fused: one kernel per pass, S tiles in registers"))
SIGLIP_OP.add("triton_interpret", _kernel(_TRI, "siglip_fwd", "siglip_bwd", devices=("cpu",),
                                          needs=("triton_interpret",)))
SIGLIP_OP.add("gemm", _kernel(_GEMM, "siglip_fwd", "siglip_bwd", devices=("cuda",), needs=("triton",),
                              doc=_GEMM_DOC, check=_gemm_ops))
SIGLIP_OP.add("gemm_interpret", _kernel(_GEMM, "siglip_fwd", "siglip_bwd", devices=("cpu",),
                                        needs=("triton_interpret",), doc=_GEMM_DOC))
SIGLIP_OP.add("cpp", _kernel(_CPP, "siglip_fwd", "siglip_bwd", devices=("cpu",), needs=("cpp",)))
SIGLIP_OP.add("reference", Backend(devices=None, doc="plain PyTorch over the full logits"))


def _kernels(backend: str):
    """The module implementing the contract for ``backend`` (clip and siglip share one per backend)."""
    return CLIP_OP.backend(backend).impl()


# --------------------------------------------------------------------------- autograd
class _ClipFn(torch.autograd.Function):
    """Sum of CLIP cross-entropy terms through a kernel backend; see the module docstring."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, label_smoothing, offset, symmetric, backend):
        k = _kernels(backend)
        scale32 = scale.detach().float().reshape(())
        bias32 = None if bias is None else bias.detach().float().reshape(())
        loss, lse_row, lse_col = k.clip_fwd(a, b, scale32, bias32, label_smoothing, offset, symmetric)
        ctx.save_for_backward(a, b, scale32, bias32, lse_row, lse_col)
        ctx.cfg = (label_smoothing, offset, symmetric, backend, scale.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, scale32, bias32, lse_row, lse_col = ctx.saved_tensors
        ls, offset, symmetric, backend, sdt, bdt = ctx.cfg
        da, db, dscale, dbias = _kernels(backend).clip_bwd(
            a, b, scale32, bias32, ls, offset, symmetric, lse_row, lse_col, grad.float().reshape(())
        )
        dscale = dscale.to(sdt) if ctx.needs_input_grad[2] else None
        dbias = dbias.to(bdt) if (bdt is not None and ctx.needs_input_grad[3]) else None
        return da, db, dscale, dbias, None, None, None, None


class _SigLipFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, offset, backend):
        k = _kernels(backend)
        scale32 = scale.detach().float().reshape(())
        bias32 = bias.detach().float().reshape(())
        loss = k.siglip_fwd(a, b, scale32, bias32, offset)
        ctx.save_for_backward(a, b, scale32, bias32)
        ctx.cfg = (offset, backend, scale.dtype, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, scale32, bias32 = ctx.saved_tensors
        offset, backend, sdt, bdt = ctx.cfg
        da, db, dscale, dbias = _kernels(backend).siglip_bwd(a, b, scale32, bias32, offset, grad.float().reshape(()))
        return da, db, dscale.to(sdt), dbias.to(bdt), None, None


def _clip_apply(a, b, scale, bias, label_smoothing, offset, symmetric, backend):
    """Eager calls take the autograd Function; under torch.compile the ``mmfast::clip_loss_*``
    custom ops (``_contrastive_library.py``) give Dynamo one opaque node with a fake and a backward."""
    if torch.compiler.is_compiling():
        from mmfast.ops import _contrastive_library  # noqa: F401  (registers the ops)

        return torch.ops.mmfast.clip_loss_fwd(a, b, scale, bias, label_smoothing, offset, symmetric, backend)[0]
    return _ClipFn.apply(a, b, scale, bias, label_smoothing, offset, symmetric, backend)


def _siglip_apply(a, b, scale, bias, offset, backend):
    if torch.compiler.is_compiling():
        from mmfast.ops import _contrastive_library  # noqa: F401  (registers the ops)

        return torch.ops.mmfast.siglip_loss_fwd(a, b, scale, bias, offset, backend)
    return _SigLipFn.apply(a, b, scale, bias, offset, backend)


# --------------------------------------------------------------------------- validation
def _as_scalar(x, name, like: torch.Tensor, required: bool) -> torch.Tensor | None:
    if x is None:
        if required:
            raise ValueError(f"{name} is required (a scalar tensor or float)")
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(float(x), device=like.device, dtype=torch.float32)
    if x.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.reshape(())


def _autocast_features(image_features, text_features):
    """Under ``torch.autocast`` features of two different float dtypes (say bf16 from a fused head
    and fp32 from ``F.normalize``, which CUDA autocast runs in fp32) are both cast to the autocast
    dtype, as the ``image @ text.T`` of an unfused loss would be. Otherwise: unchanged (a mismatch
    is then reported by ``_check_features``)."""
    a, b = image_features, text_features
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype == b.dtype:
        return a, b
    return autocast_inputs(a, b)


def _check_features(image_features, text_features, *, square=True):
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty (batch size 0)")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features dim {image_features.shape[1]} != text_features dim {text_features.shape[1]}"
        )
    if square and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image_features has {image_features.shape[0]} rows but text_features has "
            f"{text_features.shape[0]}; paired losses need equal batch sizes"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features dtype {image_features.dtype} != text_features dtype {text_features.dtype}")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features on {image_features.device} but text_features on {text_features.device}")


def select_backend(op: Op, a: torch.Tensor, backend: str | None, k: int | None = None) -> str:
    """The backend for features ``a`` (M, d) against ``k`` columns (default M)."""
    check_backend_name(backend)
    if torch.compiler.is_compiling():
        return _select_static(op.name, a.device.type, a.dtype, backend)
    k = a.shape[0] if k is None else k
    key = next_pow2(max(int(k), 1))
    return op.select(Facts(a.device.type, a.dtype, {"k": key}), backend)


@constant_result
def _select_static(op_name: str, device: str, dtype: torch.dtype, backend: str | None) -> str:
    """The choice depends on device and dtype only, so Dynamo runs it once at trace time."""
    from mmfast.ops._dispatch import get_op

    return get_op(op_name).select(Facts(device, dtype), backend)


def _explain(argv: list[str], op_name: str):
    """``mmfast info --explain clip_loss|siglip_loss`` options -> (Facts, op name, fake machine facts)."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"mmfast info --explain {op_name}",
                                 description="Which contrastive-loss backend auto picks for one call, and why.")
    ap.add_argument("--n", type=int, default=32768, help="the logits' columns K (the global batch; default 32768)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) | float16 | float32")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when --family is given)")
    ap.add_argument("--family", help="explain as on a CUDA card of this family (sm90, sm80, ...)")
    a = ap.parse_args(argv)
    if a.n <= 0:
        ap.error(f"--n must be positive, got {a.n}")
    device = a.device or ("cuda" if a.family else "cpu")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device == "cuda" else "float32"), None)
    if dtype not in _SUPPORTED_DTYPES:
        ap.error(f"--dtype must be float32, float16 or bfloat16, got {a.dtype!r}")
    fake = {"cuda_available": True, "arch": a.family} if a.family else {}
    return Facts(device, dtype, {"k": next_pow2(a.n)}), op_name, fake


def explain_clip(argv: list[str]):
    return _explain(argv, "clip_loss")


def explain_siglip(argv: list[str]):
    return _explain(argv, "siglip_loss")


# --------------------------------------------------------------------------- one-sided pieces
# Validation happens once per call path, in the public entry point (clip_loss, siglip_loss,
# clip_rows_sum, siglip_sum, or the nn.Module that calls the sharded pieces); the private pieces below
# take checked features and 0-d scale/bias tensors.
def _check_offset(a, b, offset):
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} with {a.shape[0]} rows does not fit {b.shape[0]} columns")


def _clip_rows(a, b, scale, bias, label_smoothing, offset, backend):
    chosen = select_backend(CLIP_OP, a, backend, b.shape[0])
    if chosen == "reference":
        return clip_rows_reference(a, b, scale, bias, label_smoothing, offset)
    return _clip_apply(a, b, scale, bias, float(label_smoothing), int(offset), False, chosen)


def _siglip_rows(a, b, scale, bias, offset, backend):
    chosen = select_backend(SIGLIP_OP, a, backend, b.shape[0])
    if chosen == "reference":
        return siglip_sum_reference(a, b, scale, bias, offset)
    return _siglip_apply(a, b, scale, bias, int(offset), chosen)


def clip_rows_sum(a, b, scale, bias=None, *, label_smoothing=0.0, offset=0, backend=None):
    """Σ_i CE(row i of ``s a bᵀ + β``, target i+offset): the building block of the distributed loss."""
    _check_features(a, b, square=False)
    _check_offset(a, b, offset)
    scale = _as_scalar(scale, "logit_scale", a, True)
    bias = _as_scalar(bias, "logit_bias", a, False)
    return _clip_rows(a, b, scale, bias, label_smoothing, offset, backend)


def siglip_sum(a, b, scale, bias, *, offset=0, backend=None):
    """Σ_ij softplus(−y_ij z_ij) with positives at (i, i+offset)."""
    _check_features(a, b, square=False)
    _check_offset(a, b, offset)
    scale = _as_scalar(scale, "logit_scale", a, True)
    bias = _as_scalar(bias, "logit_bias", a, True)
    return _siglip_rows(a, b, scale, bias, offset, backend)


# --------------------------------------------------------------------------- sharded (``group=``)
# Rank r holds n_r pairs, rows ``o_r = Σ_{k<r} n_k`` … ``o_r + n_r − 1`` of the global batch of
# N = Σ n_k pairs. Each rank gathers the other ranks' features (O(N·d) memory) and computes only
# its share of the global N×N logits:
#
#   CLIP:   p_r = rows_r(I_r vs T_all) + rows_r(T_r vs I_all)   (its rows and its columns)
#           L   = Σ_r p_r / (2N)
#   SigLIP: p_r = Σ_{i in r, j} softplus(−y_ij z_ij)            (its rows, every column)
#           L   = Σ_r p_r / N
#
# The loss value on every rank is the global L. Gradients are exact: the local partial's gradient
# flows back through the all-gathers (whose backward is a reduce-scatter, collecting what the other
# ranks' partials owe this rank's features), and the replicated scale/bias gradients are summed
# over ranks: every rank ends with d L/d(its features), d L/d scale and d L/d bias, the numbers a
# single process holding the concatenated batch would get. Under DDP (which *averages* parameter
# gradients over ranks) that is 1/W of the global gradient for the encoders; ``mmfast.nn.ClipLoss``
# with ``gather_with_grad=True`` follows open_clip's convention instead (see there).
def _layout(img: torch.Tensor, group) -> tuple[list[int], int, int]:
    """(every rank's batch size, this rank's row offset, global batch size)."""
    from mmfast.distributed.collectives import gather_sizes, world

    rank, _ = world(group)
    sizes = gather_sizes(img.shape[0], group, img.device)
    return sizes, sum(sizes[:rank]), sum(sizes)


def _replicated(x, group):
    from mmfast.distributed.collectives import grad_all_reduce

    if x is None or not x.requires_grad:
        return x
    return grad_all_reduce(x, group)


def clip_partial(img, txt, scale, bias, label_smoothing, group, backend, *, gather_grad=True):
    """This rank's CLIP partial sum ``p_r`` (not normalised) and the global batch size.

    Takes checked inputs (0-d ``scale``/``bias`` tensors; the caller validates). ``gather_grad=False``
    gathers without gradient: only the direct use of the local features back-propagates (open_clip's
    ``gather_with_grad=False, local_loss=True``).
    """
    from mmfast.distributed.collectives import all_gather

    sizes, offset, total = _layout(img, group)
    img_all = all_gather(img, group, sizes, grad=gather_grad)  # (N, d)
    txt_all = all_gather(txt, group, sizes, grad=gather_grad)  # (N, d)
    part = (_clip_rows(img, txt_all, scale, bias, label_smoothing, offset, backend)
            + _clip_rows(txt, img_all, scale, bias, label_smoothing, offset, backend))
    return part, total


def siglip_partial(img, txt, scale, bias, group, backend):
    """This rank's SigLIP partial sum ``p_r`` (its rows against every text) and the global batch size;
    checked inputs, as ``clip_partial``."""
    from mmfast.distributed.collectives import all_gather

    sizes, offset, total = _layout(img, group)
    txt_all = all_gather(txt, group, sizes)  # (N, d)
    return _siglip_rows(img, txt_all, scale, bias, offset, backend), total


def _sharded_clip(img, txt, scale, bias, label_smoothing, group, backend):
    from mmfast.distributed.collectives import all_reduce_local_grad

    scale, bias = _replicated(scale, group), _replicated(bias, group)
    part, total = clip_partial(img, txt, scale, bias, label_smoothing, group, backend)
    return all_reduce_local_grad(part / (2 * total), group)


def _sharded_siglip(img, txt, scale, bias, group, backend):
    from mmfast.distributed.collectives import all_reduce_local_grad

    scale, bias = _replicated(scale, group), _replicated(bias, group)
    part, total = siglip_partial(img, txt, scale, bias, group, backend)
    return all_reduce_local_grad(part / total, group)


# --------------------------------------------------------------------------- distillation
_DISTILL_TRITON = "mmfast.ops._distill_triton"


def _distill_supports(backend: str, facts: Facts) -> list[str]:
    """The teacher's features must be of a dtype the backend takes too (the student's the contract checks)."""
    ok = DISTILL_OP.backend(backend).dtypes
    other = facts.extra.get("teacher_dtype")
    if other is not None and other not in ok:
        return [f"teacher dtype {other} is not one of {', '.join(str(d).replace('torch.', '') for d in ok)}"]
    return []


_REF_DT = (*_SUPPORTED_DTYPES, torch.float64)  # fp64: the blockwise reference only
DISTILL_OP = register(Op("clip_distill", supports=_distill_supports, example=_example))
DISTILL_OP.add("triton", KernelBackend(_DISTILL_TRITON, "distill_fwd", "distill_bwd", devices=("cuda",),
                                       needs=("triton",), dtypes=_SUPPORTED_DTYPES))
DISTILL_OP.add("triton_interpret", KernelBackend(_DISTILL_TRITON, "distill_fwd", "distill_bwd", devices=("cpu",),
                                                 needs=("triton_interpret",), dtypes=_SUPPORTED_DTYPES))
DISTILL_OP.add("reference", KernelBackend("mmfast.ops._distill_blockwise", "distill_fwd", "distill_bwd", devices=None,
                                          dtypes=_REF_DT,
                                          doc="row blocks in PyTorch (never the N×N logits; also fp64)"))


class _DistillFn(torch.autograd.Function):
    """Σ_i of the row cross-entropy between the teacher's and the student's row softmax."""

    @staticmethod
    def forward(ctx, a, b, scale, c, e, tscale, backend):
        k = DISTILL_OP.backend(backend).impl()
        sdt = torch.float64 if a.dtype == torch.float64 else torch.float32
        tdt = torch.float64 if c.dtype == torch.float64 else torch.float32
        s = scale.detach().to(sdt).reshape(())
        t = tscale.detach().to(tdt).reshape(())
        with torch.autocast(a.device.type, enabled=False):  # the blockwise path's matmuls stay fp32
            loss, lse_s, lse_t, mu = k.distill_fwd(a, b, s, c, e, t)
        ctx.save_for_backward(a, b, s, c, e, t, lse_s, lse_t, mu)
        ctx.cfg = (backend, scale.dtype, tscale.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, s, c, e, t, lse_s, lse_t, mu = ctx.saved_tensors
        backend, sdt, tdt = ctx.cfg
        need = ctx.needs_input_grad
        teacher = any(need[3:6])
        with torch.autocast(a.device.type, enabled=False):
            da, db, ds, dc, de, dt = DISTILL_OP.backend(backend).impl().distill_bwd(
                a, b, s, c, e, t, lse_s, lse_t, mu, grad.reshape(()), teacher
            )
        return (
            da if need[0] else None, db if need[1] else None, ds.to(sdt) if need[2] else None,
            dc if need[3] else None, de if need[4] else None, dt.to(tdt) if need[5] else None, None,
        )


@torch.compiler.disable  # an opaque graph break under torch.compile (no custom op for this one yet)
def _distill_apply(a, b, scale, c, e, tscale, backend):
    return _DistillFn.apply(a, b, scale, c, e, tscale, backend)


def _check_pair(x, y, nx, ny):
    for name, v in ((nx, x), (ny, y)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(v.shape)}")
        if v.dtype not in _SUPPORTED_DTYPES + (torch.float64,):
            raise TypeError(f"{name} has dtype {v.dtype}; expected float32, float16, bfloat16 or float64")
        if v.shape[0] == 0:
            raise ValueError(f"{name} is empty (batch size 0)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{nx} dim {x.shape[1]} != {ny} dim {y.shape[1]}")
    if x.dtype != y.dtype:
        raise TypeError(f"{nx} dtype {x.dtype} != {ny} dtype {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{nx} on {x.device} but {ny} on {y.device}")


def clip_distill_rows_sum(a, b, logit_scale, c, e, teacher_logit_scale, *, backend=None):
    """``Σ_i −Σ_j softmax(T)_ij · log_softmax(S)_ij`` (an fp64 0-d tensor) with ``S = s·a bᵀ`` (student) and ``T = t·c eᵀ``
    (teacher), both (M, K), computed without either. ``a``/``b`` and ``c``/``e`` may differ in width
    and dtype from each other; every input may require grad (the teacher's gradients are only
    computed when asked for)."""
    a, b = _autocast_features(a, b)
    c, e = _autocast_features(c, e)
    _check_pair(a, b, "image_features", "text_features")
    _check_pair(c, e, "dist_image_features", "dist_text_features")
    if c.shape[0] != a.shape[0] or e.shape[0] != b.shape[0]:
        raise ValueError(
            f"teacher features have {c.shape[0]} x {e.shape[0]} rows but the student's have "
            f"{a.shape[0]} x {b.shape[0]}; they must describe the same batch"
        )
    if c.device != a.device:
        raise ValueError(f"teacher features on {c.device} but student features on {a.device}")
    scale = _as_scalar(logit_scale, "logit_scale", a, True)
    tscale = _as_scalar(teacher_logit_scale, "dist_logit_scale", a, True)
    check_backend_name(backend)
    chosen = DISTILL_OP.select(Facts(a.device.type, a.dtype, {"teacher_dtype": c.dtype}), backend)
    return _distill_apply(a.contiguous(), b.contiguous(), scale, c.contiguous(), e.contiguous(), tscale, chosen)


def clip_distill_loss(
    image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    *, backend=None,
):
    """open_clip's ``DistillClipLoss`` distillation term: the mean over the image→text rows and over
    the text→image rows of the cross-entropy between the teacher's and the student's softmax,
    averaged over both directions, in fp32 (fp64 for fp64 features). O(N·d) extra memory: the N×N
logits are never built. Two one-sided passes (rows, then the transposed problem)."""
    n = image_features.shape[0] if isinstance(image_features, torch.Tensor) else 0
    rows = clip_distill_rows_sum(image_features, text_features, logit_scale, dist_image_features,
                                 dist_text_features, dist_logit_scale, backend=backend)
    cols = clip_distill_rows_sum(text_features, image_features, logit_scale, dist_text_features,
                                 dist_image_features, dist_logit_scale, backend=backend)
    out = torch.float64 if torch.float64 in (image_features.dtype, dist_image_features.dtype) else torch.float32
    return ((rows + cols) / (2 * n)).to(out)


def clip_distill_loss_reference(
    image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
):
    """The same over the full logits, as open_clip computes it (the test oracle)."""
    s = logit_scale * image_features @ text_features.t()
    t = dist_logit_scale * dist_image_features @ dist_text_features.t()

    def side(tl, sl):
        return -(tl.softmax(dim=1) * sl.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    return (side(t, s) + side(t.t(), s.t())) / 2


# --------------------------------------------------------------------------- public API
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    label_smoothing: float = 0.0,
    group=None,
    backend: str | None = None,
    return_stats: bool = False,
):
    """Symmetric CLIP InfoNCE ``(CE(S) + CE(Sᵀ)) / 2`` with ``S = logit_scale · I Tᵀ (+ logit_bias)``.

    ``logit_scale`` is the multiplier itself (already exponentiated, as open_clip passes it).
    With ``group`` (a torch.distributed process group), the features are this rank's shard of a
    global batch, and the loss and gradients are those of the concatenated batch.
    ``return_stats=True`` also returns a dict with the row/column log-sum-exp (single process).
    """
    image_features, text_features = _autocast_features(image_features, text_features)
    _check_features(image_features, text_features)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    scale = _as_scalar(logit_scale, "logit_scale", image_features, True)
    bias = _as_scalar(logit_bias, "logit_bias", image_features, False)
    if group is not None:
        if return_stats:
            raise ValueError("return_stats is not available with group=")
        return _sharded_clip(image_features, text_features, scale, bias, label_smoothing, group, backend)
    n = image_features.shape[0]
    chosen = select_backend(CLIP_OP, image_features, backend)
    if chosen == "reference":
        loss = clip_loss_reference(image_features, text_features, scale, bias, label_smoothing)
        if return_stats:
            with torch.no_grad():
                z = _logits(image_features, text_features, scale, bias).float()
                stats = {"lse_row": z.logsumexp(1), "lse_col": z.logsumexp(0), "backend": chosen}
            return loss, stats
        return loss
    total = _clip_apply(image_features, text_features, scale, bias, float(label_smoothing), 0, True, chosen)
    loss = total / (2 * n)
    if return_stats:
        return loss, {"backend": chosen}
    return loss


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    group=None,
    backend: str | None = None,
):
    """SigLIP sigmoid loss ``-Σ_ij log σ(y_ij · S_ij) / N``, y = 2·I − 1, S = scale · I Tᵀ + bias."""
    image_features, text_features = _autocast_features(image_features, text_features)
    _check_features(image_features, text_features)
    scale = _as_scalar(logit_scale, "logit_scale", image_features, True)
    bias = _as_scalar(logit_bias, "logit_bias", image_features, True)
    if group is not None:
        return _sharded_siglip(image_features, text_features, scale, bias, group, backend)
    return _siglip_rows(image_features, text_features, scale, bias, 0, backend) / image_features.shape[0]


__all__: list[str] = [
    "clip_distill_loss",
    "clip_distill_loss_reference",
    "clip_distill_rows_sum",
    "clip_loss",
    "clip_loss_reference",
    "clip_partial",
    "clip_rows_sum",
    "siglip_loss",
    "siglip_loss_reference",
    "siglip_partial",
    "siglip_sum",
]
