"""LLaVA: the builder and facade (``model.py``), data (``data.py``), conversation templates
(``templates.py``), projector (``projector.py``), vision tower (``vision.py``), generation (``generate.py``),
the tiny tokenizer's build tool (``tokenizer_tiny.py``) and its demo stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.llava.Llava``, as before the
split); they load ``model.py`` on first use, so importing a sibling module stays cheap.
"""
from __future__ import annotations

_PUBLIC = (
    "PREFIX_KWARG",
    "Llava",
    "LlavaLossModule",
    "build_llava",
    "format_conversation",
    "forward_hidden",
    "image_features",
    "list_presets",
    "llava_loss",
    "load_preset",
    "load_pretrained",
    "merge_embeddings",
    "tokenize_conversation",
)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mmfast.models.llava import model

    return getattr(model, name)


__all__ = list(_PUBLIC)
