"""Drop-in ``nn.Module`` wrappers over :mod:`mmfast.ops`; each loads on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipLoss": "loss",
    "SigLipLoss": "loss",
    "CoCaLoss": "loss",
    "DistillClipLoss": "loss",
    "FlashAttention": "attention",
    "MultiheadAttention": "attention",
    "MLPProjector": "projection",
    "FusedLinearCrossEntropyLoss": "projection",
    "LinearL2Normalize": "projection",
    "LayerNorm": "norm",
    "RMSNorm": "norm",
    "ApplyRotary": "llama",
    "SwiGLU": "llama",
    "SwiGLUMLP": "llama",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'mmfast.nn' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmfast.nn.{mod}"), name)


__all__ = list(_EXPORTS)
