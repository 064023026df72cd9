"""Backends of the op families, one module each (see the contract in :mod:`mmfast.ops._dispatch`).

Each module holds Backend objects; the family module (``mmfast/ops/<family>.py``) registers them with one
line each, e.g. ``ATTENTION_OP.add("flex", "mmfast.ops.backends.attention_flex:FLEX")``. Nothing here is
imported until a call (or ``mmfast info``) considers the backend.
"""
