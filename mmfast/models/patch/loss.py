"""Patch rules for the loss family (the same instance-level ``forward`` mechanism as every rule file).

* ``causal_lm.fused_linear_cross_entropy`` (loss): in training mode (``model.training``), when ``labels``
  are given, the model's own forward runs with ``labels=None`` while its ``lm_head`` computes the
  shifted-label loss with :func:`fused_linear_cross_entropy` *inside the head's forward* and returns it
  as the head's output (so a DeepSpeed ZeRO-3 partitioned head weight is gathered then, and again in
  the backward); the model's output gets that loss and an empty ``(B, S, 0)`` logits tensor (a tensor,
  not ``None``, so ``return_dict=False`` tuples keep their positions). A training step never reads the
  logits; anything that does (evaluation loops, metrics, transformers' own output tests) runs in eval
  mode, where the model computes its logits and loss exactly as unpatched. Same label shift,
  ``ignore_index=-100``, ``num_items_in_batch`` and final-logit softcap as HF.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.models.patch import LM_TYPES, PatchRule, backend_of, config_value, set_forwards

_IGNORE = -100


def _patch_causal_lm_loss(model: torch.nn.Module):
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "loss_function"):
        return None
    from mmfast.ops.projection import fused_linear_cross_entropy

    orig = model.forward
    softcap = config_value(model, "final_logit_softcapping")

    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if not model.training or labels is None or kwargs.get("logits_to_keep", 0) not in (0, None):
            return orig(*args, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        n_items = kwargs.get("num_items_in_batch")
        kwargs["labels"] = None
        box = {}

        def head_forward(hidden):  # (B, S, H), runs inside the head's __call__ (hooks have fired)
            target = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=_IGNORE)[..., 1:]
            loss = fused_linear_cross_entropy(
                hidden, head.weight, target.to(hidden.device), head.bias, ignore_index=_IGNORE,
                reduction="sum" if n_items is not None else "mean", softcap=softcap, backend=backend_of(model),
            )
            box["shape"] = hidden.shape[:-1]
            # The loss leaves the head as its output, so module hooks see it in the backward (ZeRO-3
            # re-gathers the head's weight there before the gradient is accumulated into it).
            return (loss / n_items if n_items is not None else loss).reshape(1, 1, 1)

        missing = object()
        old = vars(head).get("forward", missing)
        head.forward = head_forward  # the model's own forward calls the head: our loss runs inside it
        try:
            out = orig(*args, **kwargs)
        finally:
            if old is missing:
                del head.forward
            else:
                head.forward = old
        if isinstance(out, tuple):
            loss = out[0].reshape(())
            return (loss, loss.new_empty(*box["shape"], 0)) + tuple(out[1:])
        loss = out["logits"].reshape(())
        # Rebuilt rather than `out["loss"] = loss`: a ModelOutput key set after construction goes to the
        # end, so `to_tuple()` / indexing would no longer put the loss first as return_dict=False does.
        fields = dict(out.items())
        fields.update(loss=loss, logits=loss.new_empty(*box["shape"], 0))
        return type(out)(**fields)

    return set_forwards([(model, forward)])


RULES: list[PatchRule] = [
    PatchRule("causal_lm.fused_linear_cross_entropy", "loss", LM_TYPES, _patch_causal_lm_loss),
]
