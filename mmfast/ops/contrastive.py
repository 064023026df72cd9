"""Fused contrastive losses (CLIP InfoNCE and SigLIP) that never store the N×N logits.

Math. For features ``a`` (M, d), ``b`` (K, d), scale ``s`` and bias ``β`` the logits are
``z_ij = s · a_i·b_j + β``. The positive of row i is column ``i + offset``.

* CLIP, one side ("rows"):  Σ_i [ lse_j z_ij − (1−ε) z_i,i+off − (ε/K) Σ_j z_ij ]
* CLIP symmetric (M = K, offset 0): rows + the same over columns; the loss is that sum / (2N).
* SigLIP: Σ_ij softplus(−y_ij z_ij), y = +1 on positives, −1 elsewhere; the loss is that sum / N.

Backend contract (``triton``, ``triton_interpret`` and ``cpp`` implement it; sums, not means):

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
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import Facts, Op, autocast_inputs, check_backend_name, register

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
# Backend name -> module implementing the contract above (imported on first use).
_BACKEND_MODULES = {
    "triton": "mmfast.ops._contrastive_triton",
    "triton_interpret": "mmfast.ops._contrastive_triton",
    "cpp": "mmfast.ops._contrastive_cpp",
}


def _kernels(backend: str):
    return importlib.import_module(_BACKEND_MODULES[backend])


def _supports(backend: str, facts: Facts) -> list[str]:
    reasons = []
    if facts.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {facts.dtype} is not one of float32/float16/bfloat16")
    if backend in _BACKEND_MODULES:
        try:
            _kernels(backend)
        except ImportError as e:
            reasons.append(f"kernel module for {backend} failed to import ({e})")
    return reasons


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32)


_IMPLS = {**_BACKEND_MODULES, "reference": "plain PyTorch over the full logits"}
CLIP_OP = register(Op("clip_loss", impls=dict(_IMPLS), supports=_supports, example=_example))
SIGLIP_OP = register(Op("siglip_loss", impls=dict(_IMPLS), supports=_supports, example=_example))


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


def select_backend(op: Op, a: torch.Tensor, backend: str | None) -> str:
    check_backend_name(backend)
    if torch.compiler.is_compiling():
        return _select_static(op.name, a.device.type, a.dtype, backend)
    return op.select(Facts.of([a]), backend)


@torch.compiler.assume_constant_result
def _select_static(op_name: str, device: str, dtype: torch.dtype, backend: str | None) -> str:
    """The choice depends on device and dtype only, so Dynamo runs it once at trace time."""
    from mmfast.ops._dispatch import get_op

    return get_op(op_name).select(Facts(device, dtype), backend)


# --------------------------------------------------------------------------- one-sided pieces
def clip_rows_sum(a, b, scale, bias=None, *, label_smoothing=0.0, offset=0, backend=None):
    """Σ_i CE(row i of ``s a bᵀ + β``, target i+offset): the building block of the distributed loss."""
    _check_features(a, b, square=False)
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} with {a.shape[0]} rows does not fit {b.shape[0]} columns")
    scale = _as_scalar(scale, "logit_scale", a, True)
    bias = _as_scalar(bias, "logit_bias", a, False)
    chosen = select_backend(CLIP_OP, a, backend)
    if chosen == "reference":
        return clip_rows_reference(a, b, scale, bias, label_smoothing, offset)
    return _clip_apply(a, b, scale, bias, float(label_smoothing), int(offset), False, chosen)


def siglip_sum(a, b, scale, bias, *, offset=0, backend=None):
    """Σ_ij softplus(−y_ij z_ij) with positives at (i, i+offset)."""
    _check_features(a, b, square=False)
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} with {a.shape[0]} rows does not fit {b.shape[0]} columns")
    scale = _as_scalar(scale, "logit_scale", a, True)
    bias = _as_scalar(bias, "logit_bias", a, True)
    chosen = select_backend(SIGLIP_OP, a, backend)
    if chosen == "reference":
        return siglip_sum_reference(a, b, scale, bias, offset)
    return _siglip_apply(a, b, scale, bias, int(offset), chosen)


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
        from mmfast.distributed.contrastive import distributed_clip_loss

        if return_stats:
            raise ValueError("return_stats is not available with group=")
        return distributed_clip_loss(image_features, text_features, scale, bias, label_smoothing, group, backend)
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
        from mmfast.distributed.contrastive import distributed_siglip_loss

        return distributed_siglip_loss(image_features, text_features, scale, bias, group, backend)
    return siglip_sum(image_features, text_features, scale, bias, backend=backend) / image_features.shape[0]


__all__: list[str] = [
    "clip_loss",
    "clip_loss_reference",
    "clip_rows_sum",
    "siglip_loss",
    "siglip_loss_reference",
    "siglip_sum",
]
