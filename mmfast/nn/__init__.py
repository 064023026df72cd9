"""Drop-in ``nn.Module`` wrappers over :mod:`mmfast.ops`; each loads on first use."""
from __future__ import annotations

from mmfast.utils import lazy_names

_EXPORTS = {  # submodule: the names loaded from it on first use
    "loss": ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss"),
    "attention": ("FlashAttention", "MultiheadAttention"),
    "projection": ("MLPProjector", "FusedLinearCrossEntropyLoss", "LinearL2Normalize"),
    "norm": ("LayerNorm", "RMSNorm"),
    "llama": ("ApplyRotary", "SwiGLU", "SwiGLUMLP"),
}

__getattr__ = lazy_names(__name__, _EXPORTS)

__all__ = [name for names in _EXPORTS.values() for name in names]
