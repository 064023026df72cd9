"""NExT-GPT: the builder and model (``model.py``), encoders, decoders, data, generation and chat loop
(``generate.py``) and its demo stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.nextgpt.build_nextgpt``, as before the
split); they load ``model.py`` on first use, so importing a sibling module stays cheap.
"""
from __future__ import annotations

_PUBLIC = (
    "NextGPT",
    "build_nextgpt",
    "chat_main",
    "list_presets",
    "load_preset",
    "load_pretrained",
)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mmfast.models.nextgpt import model

    return getattr(model, name)


__all__ = list(_PUBLIC)
