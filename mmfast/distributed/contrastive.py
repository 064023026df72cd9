"""CLIP and SigLIP losses over a batch sharded across ranks, with global-batch semantics.

Rank r holds n_r pairs, rows ``o_r = Σ_{k<r} n_k`` … ``o_r + n_r − 1`` of the global batch of
N = Σ n_k pairs. Each rank gathers the other ranks' features (O(N·d) memory) and computes only
its share of the global N×N logits:

* CLIP:   p_r = rows_r(I_r vs T_all) + rows_r(T_r vs I_all)   (its rows and its columns)
          L   = Σ_r p_r / (2N)
* SigLIP: p_r = Σ_{i in r, j} softplus(−y_ij z_ij)            (its rows, every column)
          L   = Σ_r p_r / N

The loss value on every rank is the global L. Gradients are exact: the local partial's gradient
flows back through the all-gathers (whose backward is a reduce-scatter, collecting what the other
ranks' partials owe this rank's features), and the replicated scale/bias gradients are summed
over ranks. Every rank therefore ends with d L/d(its features), d L/d scale and d L/d bias — the
numbers a single process holding the concatenated batch would get.

Under DDP (which *averages* parameter gradients over ranks) that is 1/W of the global gradient
for the encoders; :class:`mmfast.nn.ClipLoss` with ``gather_with_grad=True`` follows open_clip's
convention instead (see there).
"""
from __future__ import annotations

import torch

from mmfast.distributed.collectives import (
    all_gather,
    all_reduce_local_grad,
    gather_sizes,
    grad_all_reduce,
    world,
)


def _layout(img: torch.Tensor, group) -> tuple[list[int], int, int]:
    """(every rank's batch size, this rank's row offset, global batch size)."""
    rank, _ = world(group)
    sizes = gather_sizes(img.shape[0], group, img.device)
    return sizes, sum(sizes[:rank]), sum(sizes)


def _replicated(x, group):
    if x is None or not x.requires_grad:
        return x
    return grad_all_reduce(x, group)


def clip_partial(img, txt, scale, bias, label_smoothing, group, backend, *, gather_grad=True):
    """This rank's CLIP partial sum ``p_r`` (not normalised) and the global batch size.

    ``gather_grad=False`` gathers without gradient: only the direct use of the local features
    back-propagates (open_clip's ``gather_with_grad=False, local_loss=True``).
    """
    from mmfast.ops.contrastive import clip_rows_sum

    sizes, offset, total = _layout(img, group)
    img_all = all_gather(img, group, sizes, grad=gather_grad)  # (N, d)
    txt_all = all_gather(txt, group, sizes, grad=gather_grad)  # (N, d)
    kw = {"label_smoothing": label_smoothing, "offset": offset, "backend": backend}
    part = clip_rows_sum(img, txt_all, scale, bias, **kw) + clip_rows_sum(txt, img_all, scale, bias, **kw)
    return part, total


def distributed_clip_loss(img, txt, scale, bias=None, label_smoothing=0.0, group=None, backend=None):
    """Global-batch CLIP loss ``(CE(S) + CE(Sᵀ)) / 2`` over the concatenation of every rank's shard.

    ``scale``/``bias`` are 0-d tensors (or floats) replicated on every rank; ``bias`` may be None.
    Returns the same global loss on every rank; gradients as described in the module docstring.
    """
    from mmfast.ops.contrastive import _as_scalar, _check_features

    _check_features(img, txt)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    scale = _replicated(_as_scalar(scale, "logit_scale", img, True), group)
    bias = _replicated(_as_scalar(bias, "logit_bias", img, False), group)
    part, total = clip_partial(img, txt, scale, bias, label_smoothing, group, backend)
    return all_reduce_local_grad(part / (2 * total), group)


def siglip_partial(img, txt, scale, bias, group, backend):
    """This rank's SigLIP partial sum ``p_r`` (its rows against every text) and the global batch size."""
    from mmfast.ops.contrastive import siglip_sum

    sizes, offset, total = _layout(img, group)
    txt_all = all_gather(txt, group, sizes)  # (N, d)
    return siglip_sum(img, txt_all, scale, bias, offset=offset, backend=backend), total


def distributed_siglip_loss(img, txt, scale, bias, group=None, backend=None):
    """Global-batch SigLIP loss ``Σ_ij softplus(−y_ij z_ij) / N`` over every rank's shard."""
    from mmfast.ops.contrastive import _as_scalar, _check_features

    _check_features(img, txt)
    scale = _replicated(_as_scalar(scale, "logit_scale", img, True), group)
    bias = _replicated(_as_scalar(bias, "logit_bias", img, True), group)
    part, total = siglip_partial(img, txt, scale, bias, group, backend)
    return all_reduce_local_grad(part / total, group)


__all__ = ["clip_partial", "distributed_clip_loss", "distributed_siglip_loss", "siglip_partial"]
