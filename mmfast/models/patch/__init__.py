"""One patch registry: which parts of which models mmfast replaces, applied and undone by one function.

A :class:`PatchRule` names a kind of replacement (attention, norm, projection, loss), the model types
it applies to and an ``apply(model)`` that patches the model in place and returns an undo (or None
when nothing in the model matched). Rules live in the modules listed in :data:`RULE_MODULES`, each
exposing ``RULES: list[PatchRule]``; a rule module that is not present is skipped.

    model = mmfast.patch(model)                 # every matching rule
    model = mmfast.patch(model, kinds=("attention",), backend="reference")
    mmfast.models.patch.patched_rules(model)    # ["llama.attention", ...]
    mmfast.unpatch(model)                       # undo, in reverse order

Rules read the backend chosen for this model with :func:`backend_of`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("attention", "norm", "projection", "loss")

# One rules file per op family; rules apply in this order.
RULE_MODULES = ("mmfast.models.patch.attention", "mmfast.models.patch.loss", "mmfast.models.patch.projection",
                "mmfast.models.patch.norm", "mmfast.models.patch.llama")
LM_TYPES = ("llama", "mistral", "qwen2", "llava")  # HF model types with a causal LM (and HF RMSNorms)

# Attributes set on a patched model (plain attributes, not submodules or buffers: no state dict change).
_UNDOS_ATTR = "_mmfast_patch_undos"  # list[(rule name, undo)]
_BACKEND_ATTR = "_mmfast_patch_backend"


@dataclass(frozen=True)
class PatchRule:
    name: str  # e.g. "llama.rms_norm"
    kind: str  # one of KINDS
    model_types: tuple[str, ...]  # HF config.model_type values, "open_clip", or () for any model
    apply: Callable[[torch.nn.Module], Callable[[], None] | None]  # patch in place; return an undo or None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"PatchRule {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.model_types, tuple):
            raise TypeError(f"PatchRule {self.name!r}: model_types must be a tuple, "
                            f"got {type(self.model_types).__name__}")

    def matches(self, model_type: str) -> bool:
        return not self.model_types or model_type in self.model_types


def model_type_of(model: torch.nn.Module) -> str:
    """HF ``config.model_type``; ``"open_clip"`` for open_clip's CLIP/CustomTextCLIP; else the class name."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    cls = type(model)
    if cls.__module__.split(".")[0] == "open_clip" and cls.__name__ in ("CLIP", "CustomTextCLIP", "CoCa"):
        return "open_clip"
    return cls.__name__


def all_rules() -> list[PatchRule]:
    """Every rule of every rule module that exists, in table order."""
    rules: list[PatchRule] = []
    for name in RULE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside an existing rule module
                raise
            continue
        rules.extend(module.RULES)
    return rules


def backend_of(model: torch.nn.Module) -> str | None:
    """The ``backend=`` given to :func:`patch` for this model (None: automatic)."""
    return getattr(model, _BACKEND_ATTR, None)


def patch(model: torch.nn.Module, kinds=KINDS, *, backend: str | None = None) -> torch.nn.Module:
    """Apply every rule of ``kinds`` that matches ``model``'s type, in place; returns ``model``.

    Rules already applied to this model are skipped, so patching twice is harmless.
    """
    from mmfast.ops._dispatch import check_backend_name

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds {unknown} are not in {KINDS}")
    check_backend_name(backend)
    object.__setattr__(model, _BACKEND_ATTR, backend)
    undos = getattr(model, _UNDOS_ATTR, None)
    if undos is None:
        undos = []
        object.__setattr__(model, _UNDOS_ATTR, undos)
    done = {name for name, _ in undos}
    model_type = model_type_of(model)
    for rule in all_rules():
        if rule.kind not in kinds or rule.name in done or not rule.matches(model_type):
            continue
        undo = rule.apply(model)
        if undo is not None:
            undos.append((rule.name, undo))
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Run the undos recorded by :func:`patch` in reverse order; returns ``model``."""
    undos = getattr(model, _UNDOS_ATTR, None) or []
    while undos:
        _, undo = undos.pop()
        undo()
    object.__setattr__(model, _BACKEND_ATTR, None)
    return model


def patched_rules(model: torch.nn.Module) -> list[str]:
    """Names of the rules currently applied to ``model``, in the order they were applied."""
    return [name for name, _ in getattr(model, _UNDOS_ATTR, None) or []]


# --------------------------------------------------------------------------- helpers for rule modules
def replace_modules(
    model: torch.nn.Module,
    match: Callable[[str, torch.nn.Module], bool],
    build: Callable[[torch.nn.Module], torch.nn.Module],
) -> Callable[[], None] | None:
    """Swap every submodule for which ``match(qualified_name, module)`` holds with ``build(module)``.

    Returns an undo that puts the original modules back, or None when nothing matched.
    """
    swaps = []
    for name, module in list(model.named_modules()):
        if not name or not match(name, module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swaps.append((parent, child, module, build(module)))
    if not swaps:
        return None
    for parent, child, _, new in swaps:
        setattr(parent, child, new)

    def undo():
        for parent, child, old, _ in reversed(swaps):
            setattr(parent, child, old)

    return undo


def keep_signature(fn: Callable, original: Callable) -> Callable:
    """Make the replacement ``fn`` look like ``original`` to introspection (``functools.wraps`` plus an explicit
    ``__signature__``): transformers' ``generate`` reads ``inspect.signature(model.forward)`` to decide which
    arguments (``logits_to_keep``, ``inputs_embeds``, ``position_ids``, ...) the model takes."""
    functools.update_wrapper(fn, original, updated=())
    try:
        fn.__signature__ = inspect.signature(original)
    except (TypeError, ValueError):  # a builtin without a signature: keep fn's own
        pass
    return fn


def set_methods(targets: list[tuple[object, str, Callable]], *, signature: bool = True) -> Callable[[], None] | None:
    """Instance-level methods ``(obj, name, fn)`` (with the replaced method's signature unless ``signature`` is
    False, for functions bound with ``types.MethodType``); the undo removes them (the class's method shows
    through) or restores an instance method that was there before. None when there is nothing to set."""
    if not targets:
        return None
    missing = object()
    saved = [(obj, name, vars(obj).get(name, missing)) for obj, name, _ in targets]
    for obj, name, fn in targets:
        setattr(obj, name, keep_signature(fn, getattr(obj, name)) if signature else fn)

    def undo():
        for obj, name, old in reversed(saved):
            if old is missing:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, old)

    return undo


def config_value(model, name):
    """``model.config.<name>``, or its ``text_config``'s (LLaVA keeps the LM's settings there); None if neither has it."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = getattr(c, name, None) if c is not None else None
        if v is not None:
            return v
    return None


def set_forwards(targets):
    """Give each module an instance-level ``forward`` (``(module, fn)`` pairs) with the signature of the one it
    replaces; see :func:`set_methods`."""
    return set_methods([(m, "forward", fn) for m, fn in targets])


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, fn: Callable):
    """``module.forward`` is ``fn`` inside the block; an instance ``forward`` set before is put back after."""
    missing = object()
    old = vars(module).get("forward", missing)
    module.forward = fn
    try:
        yield module
    finally:
        if old is missing:
            del module.forward
        else:
            module.forward = old


def call_with_forward(module: torch.nn.Module, fn: Callable, *args):
    """``module(*args)`` with ``fn`` as its forward for this one call: the module's hooks (DeepSpeed ZeRO-3
    gathering its parameters, and re-gathering them for the backward of what it returns) fire around ``fn``."""
    with forward_replaced(module, fn):
        return module(*args)


def set_attributes(targets: list[tuple[object, str, object]]) -> Callable[[], None] | None:
    """Set ``obj.attr = value`` for each triple; returns an undo restoring the previous values."""
    if not targets:
        return None
    missing = object()
    saved = [(obj, attr, getattr(obj, attr, missing)) for obj, attr, _ in targets]
    for obj, attr, value in targets:
        setattr(obj, attr, value)

    def undo():
        for obj, attr, old in reversed(saved):
            if old is missing:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)

    return undo


__all__ = [
    "KINDS",
    "LM_TYPES",
    "RULE_MODULES",
    "PatchRule",
    "all_rules",
    "backend_of",
    "call_with_forward",
    "config_value",
    "forward_replaced",
    "keep_signature",
    "model_type_of",
    "patch",
    "patched_rules",
    "replace_modules",
    "set_attributes",
    "set_forwards",
    "set_methods",
    "unpatch",
]
