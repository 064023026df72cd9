"""mmfast: kernel-backed building blocks and systems for multimodal models.

Importing mmfast is cheap and needs only torch: kernels, models and optional integrations
(DeepSpeed, transformers, open_clip, diffusers) load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": "mmfast.ops",
    "nn": "mmfast.nn",
    "patch": "mmfast.models.patch:patch",
    "unpatch": "mmfast.models.patch:unpatch",
}


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
    mod, _, attr = target.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, attr) if attr else obj


__all__ = ["__version__"] + list(_LAZY)
