"""Attention rows of the patch table (see :mod:`mmfast.models.patch`).

* transformers models switch to ``attn_implementation="mmfast"`` (the registered flash attention);
* open_clip models have each ``nn.MultiheadAttention`` replaced by :class:`mmfast.nn.MultiheadAttention`
  sharing the same parameters (so the state dict and any optimiser state are unchanged).
"""
from __future__ import annotations

import torch

from mmfast.models.patch import PatchRule, backend_of, replace_modules

# transformers model types whose attention goes through AttentionInterface and is covered by tests
# (llama, clip, llava) or shares their attention code path.
HF_MODEL_TYPES = ("llama", "clip", "clip_text_model", "clip_vision_model", "llava", "mistral", "qwen2",
                  "siglip", "siglip_text_model", "siglip_vision_model")


def _hf_configs(model):
    """The model's config and every sub-config (composite models such as LLaVA)."""
    config = model.config
    subs = [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
    return [config, *subs]


def _patch_hf(model: torch.nn.Module):
    from mmfast.models.hf_attention import MODULE_BACKEND_ATTR, NAME, register_interfaces

    if not hasattr(model, "set_attn_implementation"):
        return None
    register_interfaces()
    # The model's own backend rides on its modules (transformers hands the attention module to the
    # attention function), not on a process-wide setting another model's patch would overwrite.
    backend = backend_of(model)
    marked = [m for m in model.modules()] if backend is not None else []
    for m in marked:
        object.__setattr__(m, MODULE_BACKEND_ATTR, backend)
    saved = [(c, c._attn_implementation) for c in _hf_configs(model)]
    model.set_attn_implementation(NAME)

    def undo():
        for config, impl in saved:
            config._attn_implementation = impl
        for m in marked:
            vars(m).pop(MODULE_BACKEND_ATTR, None)

    return undo


def _is_plain_mha(name: str, module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.MultiheadAttention and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn)


def _patch_open_clip(model: torch.nn.Module):
    from mmfast.nn.attention import MultiheadAttention

    backend = backend_of(model)
    return replace_modules(model, _is_plain_mha, lambda m: MultiheadAttention.from_torch(m, backend=backend))


RULES = [
    PatchRule("hf.attention", "attention", HF_MODEL_TYPES, _patch_hf),
    PatchRule("open_clip.attention", "attention", ("open_clip",), _patch_open_clip),
]
