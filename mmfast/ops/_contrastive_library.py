"""``torch.library`` custom ops over the contrastive backend contract, so torch.compile can trace the loss.

``mmfast::clip_loss_fwd`` / ``mmfast::clip_loss_bwd`` and ``mmfast::siglip_loss_fwd`` /
``mmfast::siglip_loss_bwd`` call the backend module named by their ``backend`` argument (``triton``,
``triton_interpret`` or ``cpp``; see ``contrastive.py``). Each forward op has a fake (shape-only)
implementation and an autograd formula that calls the matching backward op, so Dynamo puts one
opaque node in the graph instead of tracing into Triton's launcher.

Custom ops cannot return None: a CLIP call without bias gets an empty ``dbias`` and a one-sided call
an empty ``lse_col``; the autograd formula maps those back to None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.ops._dispatch import get_op


def _kernels(backend: str):
    """The module implementing the contract for ``backend`` (registered by ``contrastive.py``, which imports this one)."""
    return get_op("clip_loss").backend(backend).impl()


def _f32(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().float().reshape(())


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)  # stands for None (custom ops return tensors)


# --------------------------------------------------------------------------- CLIP
@torch.library.custom_op("mmfast::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045 (schema inference)
    label_smoothing: float, offset: int, symmetric: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss_sum fp32 0-d, lse_row (M,), lse_col (K,) or (0,) when not symmetric)."""
    loss, lse_row, lse_col = _kernels(backend).clip_fwd(
        a, b, _f32(scale), _f32(bias), label_smoothing, offset, symmetric
    )
    return loss, lse_row, lse_row.new_empty((0,)) if lse_col is None else lse_col


@clip_loss_fwd.register_fake
def _(a, b, scale, bias, label_smoothing, offset, symmetric, backend):
    # The contract (contrastive.py): fp32 loss, fp64 log-sum-exp vectors.
    lse_col = b.new_empty((b.shape[0] if symmetric else 0,), dtype=torch.float64)
    return a.new_empty((), dtype=torch.float32), a.new_empty((a.shape[0],), dtype=torch.float64), lse_col


@torch.library.custom_op("mmfast::clip_loss_bwd", mutates_args=())
def clip_loss_bwd(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045 (schema inference)
    label_smoothing: float, offset: int, symmetric: bool, backend: str,
    lse_row: Tensor, lse_col: Tensor, grad: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (da like a, db like b, dscale like scale, dbias like bias or (0,))."""
    da, db, dscale, dbias = _kernels(backend).clip_bwd(
        a, b, _f32(scale), _f32(bias), label_smoothing, offset, symmetric,
        lse_row, lse_col if symmetric else None, grad.detach().float().reshape(()),
    )
    dbias = _empty(a) if bias is None else dbias.to(bias.dtype).reshape(bias.shape)
    return da, db, dscale.to(scale.dtype).reshape(scale.shape), dbias


@clip_loss_bwd.register_fake
def _(a, b, scale, bias, label_smoothing, offset, symmetric, backend, lse_row, lse_col, grad):
    dbias = a.new_empty((0,), dtype=torch.float32) if bias is None else torch.empty_like(bias)
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale), dbias


def _clip_setup(ctx, inputs, output):
    a, b, scale, bias, ls, offset, symmetric, backend = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(a, b, scale, bias, lse_row, lse_col)
    ctx.cfg = (ls, offset, symmetric, backend)


def _clip_backward(ctx, grad_loss, _grad_lse_row, _grad_lse_col):
    a, b, scale, bias, lse_row, lse_col = ctx.saved_tensors
    ls, offset, symmetric, backend = ctx.cfg
    da, db, dscale, dbias = torch.ops.mmfast.clip_loss_bwd(
        a, b, scale, bias, ls, offset, symmetric, backend, lse_row, lse_col, grad_loss
    )
    return da, db, dscale, (None if bias is None else dbias), None, None, None, None


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup)


# --------------------------------------------------------------------------- SigLIP
@torch.library.custom_op("mmfast::siglip_loss_fwd", mutates_args=())
def siglip_loss_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, offset: int, backend: str) -> Tensor:
    """-> loss_sum fp32 0-d."""
    return _kernels(backend).siglip_fwd(a, b, _f32(scale), _f32(bias), offset)


@siglip_loss_fwd.register_fake
def _(a, b, scale, bias, offset, backend):
    return a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mmfast::siglip_loss_bwd", mutates_args=())
def siglip_loss_bwd(
    a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, offset: int, backend: str, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    da, db, dscale, dbias = _kernels(backend).siglip_bwd(
        a, b, _f32(scale), _f32(bias), offset, grad.detach().float().reshape(())
    )
    return da, db, dscale.to(scale.dtype).reshape(scale.shape), dbias.to(bias.dtype).reshape(bias.shape)


@siglip_loss_bwd.register_fake
def _(a, b, scale, bias, offset, backend, grad):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale), torch.empty_like(bias)


def _siglip_setup(ctx, inputs, output):
    a, b, scale, bias, offset, backend = inputs
    ctx.save_for_backward(a, b, scale, bias)
    ctx.cfg = (offset, backend)


def _siglip_backward(ctx, grad_loss):
    a, b, scale, bias = ctx.saved_tensors
    offset, backend = ctx.cfg
    da, db, dscale, dbias = torch.ops.mmfast.siglip_loss_bwd(a, b, scale, bias, offset, backend, grad_loss)
    return da, db, dscale, dbias, None, None


siglip_loss_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)
