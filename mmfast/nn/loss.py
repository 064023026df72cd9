"""Drop-in replacements for ``open_clip.loss.ClipLoss`` and ``open_clip.loss.SigLipLoss``.

Same constructor flags, same ``forward`` signature, same numbers (loss and every gradient) as
open_clip for each flag combination, computed by :mod:`mmfast.ops.contrastive` without
materialising the N×N logits when a fused backend is available.
"""
from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.contrastive import clip_loss, siglip_loss


def _dist_group(group, rank: int, world_size: int):
    """The process group for world_size > 1, checked against the rank/world_size given."""
    import torch.distributed as dist

    from mmfast.distributed.collectives import world

    group = dist.group.WORLD if group is None else group
    r, w = world(group)
    if (r, w) != (rank, world_size):
        raise ValueError(
            f"rank={rank}, world_size={world_size} were given but the process group has "
            f"rank {r} of {w}; pass the group's own rank and size"
        )
    return group


class ClipLoss(nn.Module):
    """Symmetric CLIP InfoNCE, ``(CE(S) + CE(Sᵀ)) / 2`` with ``S = logit_scale · I Tᵀ (+ logit_bias)``.

    ``logit_scale`` is the multiplier (already exponentiated), as open_clip passes it.

    How open_clip's flags map (world_size > 1; with world_size == 1 they change nothing):

    * ``local_loss=False, gather_with_grad=False`` — the loss is the global-batch loss; each rank's
      feature gradients are d L/d(local features) (open_clip lets gradient through the local slot
      of the gathered batch only, which is exactly that). Computed as
      :func:`mmfast.ops.clip_loss` with ``group=``; scale/bias gradients are the global ones.
    * ``local_loss=False, gather_with_grad=True`` — same loss; open_clip's all-gather backward sums
      the gradient every rank computed for the same global loss, so feature gradients are
      ``world_size ·`` d L/d(local features) (which DDP's averaging turns into the global-batch
      gradient). Reproduced by scaling the feature gradients by world_size.
    * ``local_loss=True`` — a different loss per rank: CE of this rank's rows against all gathered
      texts plus its columns against all gathered images, each averaged over the local batch
      (labels offset by rank · n). ``gather_with_grad=True``: gradients reach the other ranks'
      features through the gather (backward = reduce-scatter); ``False``: the gathered copies are
      constants and only the direct use of the local features back-propagates.

    Notes: a ``logit_bias`` shifts every logit of a softmax row equally, so it changes neither the
    loss nor any gradient (its own gradient is 0); open_clip adds it twice when world_size > 1 and
    local_loss=False (``logits_per_text`` is a view of ``logits_per_image``), harmlessly, and we add
    it once. ``cache_labels`` is accepted and has no effect (no labels tensor is built). ``use_horovod=True`` is not supported. Local batch sizes may
    differ between ranks (offsets come from every rank's size).

    mmfast-only keywords: ``label_smoothing``, ``backend`` (None = auto), ``group`` (a process group
    for world_size > 1; default the WORLD group).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        label_smoothing: float = 0.0,
        backend: str | None = None,
        group=None,
    ):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported; use torch.distributed (NCCL/gloo)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.label_smoothing = float(label_smoothing)
        self.backend = backend
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size == 1:
            loss = clip_loss(
                image_features, text_features, logit_scale, logit_bias,
                label_smoothing=self.label_smoothing, backend=self.backend,
            )
        else:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, img, txt, scale, bias):
        from mmfast.distributed.collectives import scale_grad
        from mmfast.distributed.contrastive import clip_partial

        group = _dist_group(self.group, self.rank, self.world_size)
        if not self.local_loss:
            if self.gather_with_grad:
                img, txt = scale_grad(img, self.world_size), scale_grad(txt, self.world_size)
            return clip_loss(
                img, txt, scale, bias, label_smoothing=self.label_smoothing, group=group, backend=self.backend
            )
        from mmfast.ops.contrastive import _as_scalar, _check_features

        _check_features(img, txt)
        scale = _as_scalar(scale, "logit_scale", img, True)
        bias = _as_scalar(bias, "logit_bias", img, False)
        part, _ = clip_partial(
            img, txt, scale, bias, self.label_smoothing, group, self.backend, gather_grad=self.gather_with_grad
        )
        return part / (2 * img.shape[0])


class SigLipLoss(nn.Module):
    """SigLIP sigmoid loss, ``-Σ_ij log σ(y_ij · S_ij) / n`` with y = +1 on pairs, −1 elsewhere.

    Matches open_clip's ``SigLipLoss`` for every ``dist_impl`` ('bidir', 'shift', 'reduce',
    'gather' are different communication schedules of the same math): with world_size > 1 rank r's
    loss is its n local images against every rank's texts, divided by its local n (so the mean
    over ranks is the global loss). Texts are all-gathered with gradient (backward =
    reduce-scatter), so text-feature gradients collect every rank's term, as open_clip's exchanges
    do; scale/bias gradients are this rank's term only, as in open_clip (DDP averages them).
    ``logit_bias=None`` means no bias. ``cache_labels`` has no effect (no labels are built).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: str | None = None,
        group=None,
    ):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl={dist_impl!r}; expected one of 'bidir', 'shift', 'reduce', 'gather'")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if logit_bias is None:
            logit_bias = torch.zeros((), device=image_features.device)
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            from mmfast.distributed.contrastive import siglip_partial
            from mmfast.ops.contrastive import _as_scalar, _check_features

            group = _dist_group(self.group, self.rank, self.world_size)
            _check_features(image_features, text_features)
            scale = _as_scalar(logit_scale, "logit_scale", image_features, True)
            bias = _as_scalar(logit_bias, "logit_bias", image_features, True)
            part, _ = siglip_partial(image_features, text_features, scale, bias, group, self.backend)
            loss = part / image_features.shape[0]
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["ClipLoss", "SigLipLoss"]
