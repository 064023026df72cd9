"""Functional ops. Each name loads its op family's module on first use.

Every op takes ``backend=None`` (auto) or one of ``mmfast.ops.BACKENDS``.
"""
from __future__ import annotations

from mmfast.ops._dispatch import BACKENDS, BackendUnavailableError
from mmfast.utils import lazy_names

_EXPORTS = {  # submodule: the names loaded from it on first use
    "contrastive": (
        "clip_loss", "siglip_loss", "clip_loss_reference", "siglip_loss_reference", "clip_distill_loss",
        "clip_distill_loss_reference",
    ),
    "attention": (
        "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
        "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
        "attention_reference",
    ),
    "projection": (
        "fused_linear_cross_entropy", "linear_l2_normalize", "bias_gelu", "mlp_projector",
        "fused_linear_cross_entropy_reference",
    ),
    "norm": ("layer_norm", "rms_norm"),
    "llama": ("rotary_embedding", "apply_rotary_pos_emb", "swiglu", "swiglu_down", "add_rms_norm"),
}

__getattr__ = lazy_names(__name__, _EXPORTS, globals())

__all__ = ["BACKENDS", "BackendUnavailableError"] + [name for names in _EXPORTS.values() for name in names]
