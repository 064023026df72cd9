"""mmfast.utils."""
from __future__ import annotations

import importlib


def lazy_names(package: str, exports: dict[str, tuple[str, ...]], namespace: dict | None = None):
    """A module-level ``__getattr__`` for ``package``: each name of ``exports[sub]`` is loaded from the
    submodule ``package.sub`` on first use; any other name raises AttributeError. With ``namespace`` (the
    package's ``globals()``) a loaded name is stored there, so later reads are a plain module attribute."""
    where = {name: sub for sub, names in exports.items() for name in names}

    def __getattr__(name: str):
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        if namespace is not None:
            namespace[name] = value
        return value

    return __getattr__
