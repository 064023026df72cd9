"""A system package's names come from its ``model.py``: ``mmfast.models.llava.build_llava`` is
``mmfast.models.llava.model.build_llava``, loaded on first use so that importing a sibling module
(templates, data) stays cheap."""
from __future__ import annotations

import importlib
from pathlib import Path


def forward_names(package: str, path: str, module: str = "model"):
    """A module-level ``__getattr__`` for ``package`` (its ``__init__.py`` at ``path``): a submodule's name is
    left to the import system; any other name is looked up in ``package.module``."""
    here = Path(path).parent

    def __getattr__(name: str):
        if name.startswith("__") or (here / f"{name}.py").is_file() or (here / name).is_dir():
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
