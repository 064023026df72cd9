"""Patch rules for the norm family (the same instance-level ``forward`` mechanism as every rule file).

* ``hf.rms_norm`` (norm): HF RMSNorm modules (``weight`` + ``variance_epsilon``) → :func:`rms_norm`.
* ``layer_norm`` (norm): every ``nn.LayerNorm`` over one dimension (HF CLIP, open_clip's subclasses)
  → :func:`layer_norm`.
"""
from __future__ import annotations

import torch

from mmfast.models.patch import LM_TYPES, PatchRule, backend_of, set_forwards


def _patch_rms_norms(model: torch.nn.Module):
    from mmfast.ops.norm import rms_norm

    targets = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if eps is None:
            continue

        def forward(hidden_states, _m=m, _eps=float(eps)):
            # HF returns weight * x_normed.to(input dtype): the promoted dtype of the two.
            out_dtype = torch.promote_types(_m.weight.dtype, hidden_states.dtype)
            return rms_norm(hidden_states, _m.weight, _eps, backend=backend_of(model)).to(out_dtype)

        targets.append((m, forward))
    return set_forwards(targets)


def _patch_layer_norms(model: torch.nn.Module):
    from mmfast.ops.norm import layer_norm

    targets = []
    for m in model.modules():
        if not isinstance(m, torch.nn.LayerNorm) or len(m.normalized_shape) != 1:
            continue

        def forward(x, _m=m):
            return layer_norm(x, _m.weight, _m.bias, _m.eps, backend=backend_of(model))

        targets.append((m, forward))
    return set_forwards(targets)


RULES: list[PatchRule] = [
    PatchRule("hf.rms_norm", "norm", LM_TYPES, _patch_rms_norms),
    PatchRule("layer_norm", "norm", ("clip", "clip_vision_model", "clip_text_model", "llava", "open_clip"),
              _patch_layer_norms),
]
