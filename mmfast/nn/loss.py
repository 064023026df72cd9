"""Drop-in replacements for open_clip 3.3's ``open_clip.loss`` classes: ``ClipLoss``, ``SigLipLoss``,
``CoCaLoss`` and ``DistillClipLoss``.

Same constructor arguments, same ``forward`` signatures and return values (a tensor, a tuple, or a
dict with ``output_dict=True``), same public methods (``get_logits``, ``get_ground_truth``,
``dist_loss``), the loss in the dtype open_clip returns, and the same numbers (loss and every
gradient, within rounding) for each flag combination, computed by :mod:`mmfast.ops.contrastive`
without materialising the N×N logits. mmfast's extensions are keyword-only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.contrastive import (
    clip_distill_loss,
    clip_distill_rows_sum,
    clip_loss,
    clip_loss_reference,
    siglip_loss,
)


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


def _gather_features(image_features, text_features, local_loss, gather_with_grad, rank, world_size, group):
    """open_clip's ``gather_features`` semantics over mmfast's collectives: every rank's features
    concatenated in rank order. ``gather_with_grad``: the gather's backward sums every rank's gradient
    for each shard (reduce-scatter). Otherwise the gathered copies are constants, except (when not
    ``local_loss``) this rank's own slot, which is the local tensor itself."""
    from mmfast.distributed.collectives import all_gather, gather_sizes

    group = _dist_group(group, rank, world_size)
    out = []
    for x in (image_features, text_features):
        sizes = gather_sizes(x.shape[0], group, x.device)
        if gather_with_grad:
            out.append(all_gather(x, group, sizes, grad=True))
            continue
        full = all_gather(x, group, sizes, grad=False)
        if not local_loss:
            off = sum(sizes[:rank])
            full = torch.cat([full[:off], x, full[off + sizes[rank]:]])
        out.append(full)
    return out[0], out[1]


# --------------------------------------------------------------------------- the dtype open_clip returns
_DTYPE_CACHE: dict = {}


def _probe(x):
    """A one-element stand-in with the dtype, device and number of dims of ``x`` (floats stay floats)."""
    if isinstance(x, torch.Tensor):
        return torch.zeros((1,) * x.dim(), dtype=x.dtype, device=x.device)
    return x


def _describe(x):
    return (x.dtype, x.dim(), x.device.type) if isinstance(x, torch.Tensor) else type(x).__name__


def _open_clip_dtype(kind: str, fn, *args) -> torch.dtype | None:
    """The dtype open_clip's own computation ``fn`` gives for inputs shaped like ``args``: it is run once
    on one-element stand-ins (same dtypes, dims, device, autocast state) and remembered. None when
    open_clip's arithmetic would itself fail on these dtypes (then the caller keeps its own)."""
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    ac = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type)) if dev.type in ("cpu", "cuda") else None
    key = (kind, ac, *(_describe(a) for a in args))
    if key not in _DTYPE_CACHE:
        try:
            with torch.no_grad():
                _DTYPE_CACHE[key] = fn(*(_probe(a) for a in args)).dtype
        except (RuntimeError, TypeError):
            _DTYPE_CACHE[key] = None
    return _DTYPE_CACHE[key]


def _as_dtype(loss: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return loss if dtype is None or loss.dtype == dtype else loss.to(dtype)


def _oc_clip_logits(image_features, text_features, logit_scale, logit_bias=None):
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits += logit_bias
    return logits


def _oc_clip_probe(image_features, text_features, logit_scale, logit_bias):
    logits = _oc_clip_logits(image_features, text_features, logit_scale, logit_bias)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def _oc_siglip_probe(image_features, text_features, logit_scale, logit_bias):
    logits = _oc_clip_logits(image_features, text_features, logit_scale, logit_bias)
    labels = torch.ones(logits.shape, dtype=image_features.dtype, device=logits.device)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def _dist_loss(teacher_logits, student_logits):
    """open_clip's ``DistillClipLoss.dist_loss``: the mean over rows of −Σ_j softmax(teacher) · log_softmax(student)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


def _oc_distill_probe(image_features, text_features, logit_scale, dist_image, dist_text, dist_scale):
    return _dist_loss(_oc_clip_logits(dist_image, dist_text, dist_scale), _oc_clip_logits(image_features, text_features, logit_scale))


def _oc_caption_probe(hidden, weight, bias):
    logits = F.linear(hidden, weight, bias)  # (B, L, V) as the CoCa head gives open_clip's loss
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.permute(0, 2, 1), labels)


def _is_f64(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in xs)


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: symmetric CLIP InfoNCE, ``(CE(S) + CE(Sᵀ)) / 2`` with
    ``S = logit_scale · I Tᵀ (+ logit_bias)``, computed without the N×N logits.

    Same constructor (``local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod``),
    same ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``,
    same public methods (``get_logits``, ``get_ground_truth``, which build the logits and labels exactly
    as open_clip does: they are for callers who want them, ``forward`` does not use them) and state
    (``prev_num_logits``, ``labels``). The loss comes back in the dtype open_clip's would have (the
    features' dtype, or fp32 under autocast), computed in fp32 whatever the features' dtype; fp64
    features take the full-logits PyTorch path in fp64. ``logit_scale`` is the multiplier (already
    exponentiated), as open_clip passes it.

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
    it once (``get_logits`` reproduces open_clip's twice). ``cache_labels`` only affects
    ``get_ground_truth``. ``use_horovod=True`` is not supported (NotImplementedError); use
    torch.distributed. Local batch sizes may differ between ranks (offsets come from every rank's size).

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
            raise NotImplementedError(
                "use_horovod=True is not supported by mmfast.nn losses; launch with torch.distributed "
                "(NCCL/gloo) and pass rank/world_size (open_clip_train: drop --horovod)"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.label_smoothing = float(label_smoothing)
        self.backend = backend
        self.group = group
        # cache state, as open_clip's (used by get_ground_truth only)
        self.prev_num_logits = 0
        self.labels = {}

    # ---------------------------------------------------------------- open_clip's public methods
    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """The targets open_clip builds: ``arange(num_logits)`` (offset by ``num_logits · rank`` with
        local_loss on several ranks), cached per device when ``cache_labels``."""
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """``(logits_per_image, logits_per_text)`` as open_clip builds them (the full logits, gathered
        across ranks when world_size > 1, following local_loss / gather_with_grad)."""
        if self.world_size > 1:
            all_img, all_txt = _gather_features(
                image_features, text_features, self.local_loss, self.gather_with_grad,
                self.rank, self.world_size, self.group,
            )
            if self.local_loss:
                per_image = logit_scale * image_features @ all_txt.T
                per_text = logit_scale * text_features @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image += logit_bias
            per_text += logit_bias
        return per_image, per_text

    # ---------------------------------------------------------------- forward
    def _logits_loss(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's own computation over the full logits (the fp64 path)."""
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        ls = self.label_smoothing
        return (F.cross_entropy(per_image, labels, label_smoothing=ls)
                + F.cross_entropy(per_text, labels, label_smoothing=ls)) / 2

    def _contrastive(self, image_features, text_features, logit_scale, logit_bias=None):
        if _is_f64(image_features, text_features):
            if self.world_size == 1:
                return clip_loss_reference(
                    image_features, text_features, logit_scale, logit_bias, self.label_smoothing
                )
            return self._logits_loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size == 1:
            loss = clip_loss(
                image_features, text_features, logit_scale, logit_bias,
                label_smoothing=self.label_smoothing, backend=self.backend,
            )
        else:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        dtype = _open_clip_dtype("clip", _oc_clip_probe, image_features, text_features, logit_scale, logit_bias)
        return _as_dtype(loss, dtype)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = self._contrastive(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, img, txt, scale, bias):
        from mmfast.distributed.collectives import scale_grad
        from mmfast.ops.contrastive import _as_scalar, _check_features, clip_partial

        group = _dist_group(self.group, self.rank, self.world_size)
        if not self.local_loss:
            if self.gather_with_grad:
                img, txt = scale_grad(img, self.world_size), scale_grad(txt, self.world_size)
            return clip_loss(
                img, txt, scale, bias, label_smoothing=self.label_smoothing, group=group, backend=self.backend
            )
        _check_features(img, txt)
        scale = _as_scalar(scale, "logit_scale", img, True)
        bias = _as_scalar(bias, "logit_bias", img, False)
        part, _ = clip_partial(
            img, txt, scale, bias, self.label_smoothing, group, self.backend, gather_grad=self.gather_with_grad
        )
        return part / (2 * img.shape[0])


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: ``(clip_loss_weight · ClipLoss, caption_loss_weight · CE(caption))``.

    ``forward(image_features, text_features, logits, labels, logit_scale, output_dict=False)`` returns
    ``(clip_loss, caption_loss)``, or ``{"contrastive_loss": ..., "caption_loss": ...}`` with
    output_dict, as open_clip (a falsy ``clip_loss_weight`` gives open_clip's integer ``tensor(0)``).
    ``logits`` (B, L, V) and ``labels`` (B, L), ``pad_id`` ignored: the caption term is then exactly
    ``nn.CrossEntropyLoss(ignore_index=pad_id)`` over the logits, as open_clip.

    mmfast-only keywords of ``forward``: ``caption_hidden`` (B, L, H), ``caption_weight`` (V, H) and
    optional ``caption_bias`` (V,): the caption term is then computed by
    :func:`mmfast.ops.fused_linear_cross_entropy` (the (B·L × V) logits are never built) and ``logits``
    may be None. open_clip's CoCa head multiplies by ``text_projection`` of shape (H, V): pass its
    ``.T``. Differences there: the loss is computed in fp32 (cast to the dtype open_clip would return),
    and a batch whose labels are all ``pad_id`` gives 0 where open_clip's mean gives NaN.
    Constructor keyword ``caption_backend`` picks the fused op's backend (None = auto).
    """

    def __init__(
        self,
        caption_loss_weight,
        clip_loss_weight,
        pad_id=0,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        *,
        label_smoothing: float = 0.0,
        backend: str | None = None,
        caption_backend: str | None = None,
        group=None,
    ):
        super().__init__(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
            rank=rank, world_size=world_size, use_horovod=use_horovod,
            label_smoothing=label_smoothing, backend=backend, group=group,
        )
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id
        self.caption_backend = caption_backend
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(
        self, image_features, text_features, logits, labels, logit_scale, output_dict=False,
        *, caption_hidden=None, caption_weight=None, caption_bias=None,
    ):
        if caption_weight is None and logits is None:
            raise ValueError("logits is None: pass the caption logits, or caption_hidden= and caption_weight=")
        if caption_weight is not None and caption_hidden is None:
            raise ValueError("caption_weight= needs caption_hidden= (the decoder's last hidden states)")
        if self.clip_loss_weight:
            clip = self.clip_loss_weight * self._contrastive(image_features, text_features, logit_scale)
        else:
            clip = torch.tensor(0, device=(logits if logits is not None else caption_hidden).device)
        if caption_weight is not None:
            from mmfast.ops.projection import fused_linear_cross_entropy

            caption = fused_linear_cross_entropy(
                caption_hidden, caption_weight, labels, caption_bias,
                ignore_index=self.pad_id, backend=self.caption_backend,
            )
            dtype = _open_clip_dtype("caption", _oc_caption_probe, caption_hidden, caption_weight, caption_bias)
            caption = _as_dtype(caption, dtype)
        else:
            caption = self.caption_loss(logits.permute(0, 2, 1), labels)
        caption = caption * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip, "caption_loss": caption}
        return clip, caption


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss``: ``(contrastive_loss, distill_loss)`` (or a dict with those keys
    with output_dict) from ``forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)``; constructor as ``ClipLoss``.

    ``distill_loss`` is open_clip's ``(dist_loss(T, S) + dist_loss(Tᵀ, Sᵀ)) / 2`` with student logits
    ``S = logit_scale · I Tᵀ`` and teacher logits ``T = dist_logit_scale · I' T'ᵀ``, computed by
    :func:`mmfast.ops.contrastive.clip_distill_loss`, a streaming kernel that never builds either
    N×N matrix: O(N·d) extra memory. Gradients reach the student (and the teacher, if its features
    or scale require grad, as open_clip's formula would give). With world_size > 1 the features are
    gathered as open_clip gathers them (local_loss / gather_with_grad; O(N·d)), then the same kernel
    runs on the gathered batch (local_loss: this rank's rows against every rank's columns).
    ``dist_loss(teacher_logits, student_logits)`` is open_clip's method over given logits.
    mmfast-only keywords as ``ClipLoss``'s, plus ``distill_backend`` (the distillation op's backend:
    ``triton``, ``triton_interpret`` or ``reference``; None = auto; ``backend`` applies to the
    contrastive term).
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        *,
        label_smoothing: float = 0.0,
        backend: str | None = None,
        distill_backend: str | None = None,
        group=None,
    ):
        super().__init__(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
            rank=rank, world_size=world_size, use_horovod=use_horovod,
            label_smoothing=label_smoothing, backend=backend, group=group,
        )
        self.distill_backend = distill_backend

    def dist_loss(self, teacher_logits, student_logits):
        return _dist_loss(teacher_logits, student_logits)

    def forward(
        self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
        dist_logit_scale, output_dict=False,
    ):
        contrastive = self._contrastive(image_features, text_features, logit_scale)
        distill = self._distill(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
        )
        dtype = _open_clip_dtype(
            "distill", _oc_distill_probe, image_features, text_features, logit_scale,
            dist_image_features, dist_text_features, dist_logit_scale,
        )
        distill = _as_dtype(distill, dtype)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def _distill(self, img, txt, scale, dimg, dtxt, dscale):
        if self.world_size == 1:
            return clip_distill_loss(img, txt, scale, dimg, dtxt, dscale, backend=self.distill_backend)
        gather = (self.local_loss, self.gather_with_grad, self.rank, self.world_size, self.group)
        all_img, all_txt = _gather_features(img, txt, *gather)
        all_dimg, all_dtxt = _gather_features(dimg, dtxt, *gather)
        if not self.local_loss:
            return clip_distill_loss(all_img, all_txt, scale, all_dimg, all_dtxt, dscale, backend=self.distill_backend)
        rows = clip_distill_rows_sum(img, all_txt, scale, dimg, all_dtxt, dscale, backend=self.distill_backend)
        cols = clip_distill_rows_sum(txt, all_img, scale, dtxt, all_dimg, dscale, backend=self.distill_backend)
        return (rows / img.shape[0] + cols / txt.shape[0]) / 2


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: ``-Σ_ij log σ(y_ij · S_ij) / N`` with y = +1 on pairs, −1 elsewhere,
    computed without the N×N logits.

    Same constructor (``cache_labels, rank, world_size, dist_impl``, and open_clip 4's ``chunk_size``,
    accepted and unused: nothing here is N×N), ``forward(image_features, text_features, logit_scale,
    logit_bias, output_dict=False)`` (``logit_bias=None`` means no bias), ``get_logits`` and
    ``get_ground_truth`` (which build the full logits / labels exactly as open_clip does, for callers
    who want them). The loss comes back in open_clip's dtype; fp64 features take the full-logits
    PyTorch path.

    Every ``dist_impl`` ('bidir', 'shift', 'reduce', 'gather' are different communication schedules
    of the same math) gives: with world_size > 1 rank r's loss is its n local images against every
    rank's texts, divided by its local n (so the mean over ranks is the global loss). Texts are
    all-gathered with gradient (backward = reduce-scatter), so text-feature gradients collect every
    rank's term, as open_clip's exchanges do; scale/bias gradients are this rank's term only, as in
    open_clip (DDP averages them). ``cache_labels`` has no effect (open_clip does not use it either).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int = 0,
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
        if int(chunk_size) < 0:
            raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.chunk_size = int(chunk_size)
        self.backend = backend
        self.group = group
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """(num_logits, num_logits) labels: +1 on the diagonal and −1 elsewhere (all −1 with negative_only)."""
        labels = torch.full((num_logits, num_logits), -1.0, device=device, dtype=dtype)
        if not negative_only:
            labels.diagonal().fill_(1.0)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        return _oc_clip_logits(image_features, text_features, logit_scale, logit_bias)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if _is_f64(image_features, text_features):
            loss = self._logits_loss(image_features, text_features, logit_scale, logit_bias)
            return {"contrastive_loss": loss} if output_dict else loss
        dtype = _open_clip_dtype("siglip", _oc_siglip_probe, image_features, text_features, logit_scale, logit_bias)
        if logit_bias is None:
            logit_bias = torch.zeros((), device=image_features.device)
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            from mmfast.ops.contrastive import _as_scalar, _check_features, siglip_partial

            group = _dist_group(self.group, self.rank, self.world_size)
            _check_features(image_features, text_features)
            scale = _as_scalar(logit_scale, "logit_scale", image_features, True)
            bias = _as_scalar(logit_bias, "logit_bias", image_features, True)
            part, _ = siglip_partial(image_features, text_features, scale, bias, group, self.backend)
            loss = part / image_features.shape[0]
        loss = _as_dtype(loss, dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _logits_loss(self, image_features, text_features, logit_scale, logit_bias):
        """The full-logits path (fp64): this rank's images against every rank's texts."""
        n = image_features.shape[0]
        offset = 0
        if self.world_size > 1:
            from mmfast.distributed.collectives import all_gather, gather_sizes

            group = _dist_group(self.group, self.rank, self.world_size)
            sizes = gather_sizes(text_features.shape[0], group, text_features.device)
            offset = sum(sizes[: self.rank])
            text_features = all_gather(text_features, group, sizes, grad=True)
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = -torch.ones_like(logits)
        idx = torch.arange(n, device=logits.device)
        labels[idx, idx + offset] = 1.0
        return -F.logsigmoid(labels * logits).sum() / n


__all__ = ["ClipLoss", "CoCaLoss", "DistillClipLoss", "SigLipLoss"]
