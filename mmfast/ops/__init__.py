"""Functional ops. Each name loads its op family's module on first use.

Every op takes ``backend=None`` (auto) or one of ``mmfast.ops.BACKENDS``.
"""
from __future__ import annotations

import importlib

from mmfast.ops._dispatch import BACKENDS, BackendUnavailableError

_EXPORTS = {
    # contrastive.py
    "clip_loss": "contrastive",
    "siglip_loss": "contrastive",
    "clip_loss_reference": "contrastive",
    "siglip_loss_reference": "contrastive",
    "clip_distill_loss": "contrastive",
    "clip_distill_loss_reference": "contrastive",
    # attention.py
    "flash_attn_func": "attention",
    "flash_attn_varlen_func": "attention",
    "flash_attn_qkvpacked_func": "attention",
    "flash_attn_kvpacked_func": "attention",
    "flash_attn_varlen_qkvpacked_func": "attention",
    "flash_attn_varlen_kvpacked_func": "attention",
    "flash_attn_with_kvcache": "attention",
    "attention_reference": "attention",
    # projection.py
    "fused_linear_cross_entropy": "projection",
    "linear_l2_normalize": "projection",
    "bias_gelu": "projection",
    "mlp_projector": "projection",
    "fused_linear_cross_entropy_reference": "projection",
    # norm.py
    "layer_norm": "norm",
    "rms_norm": "norm",
    # llama.py
    "rotary_embedding": "llama",
    "apply_rotary_pos_emb": "llama",
    "swiglu": "llama",
    "swiglu_down": "llama",
    "add_rms_norm": "llama",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'mmfast.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmfast.ops.{mod}"), name)
    globals()[name] = value  # later reads are a plain module attribute, not this function + an import
    return value


__all__ = ["BACKENDS", "BackendUnavailableError"] + list(_EXPORTS)
