"""CLIP: open_clip models built from mmfast's presets, with mmfast's kernels (``model.py``) and its demo
stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.clip.create_model``, as before the
split); they load ``model.py`` on first use, so importing a sibling module stays cheap.
"""
from __future__ import annotations

_PUBLIC = (
    "apply_kernels",
    "create_model",
    "get_tokenizer",
    "get_transforms",
    "list_models",
    "list_presets",
    "load_weights",
    "model_config",
    "save_pretrained",
)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mmfast.models.clip import model

    return getattr(model, name)


__all__ = list(_PUBLIC)
