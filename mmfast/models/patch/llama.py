"""Patch rules of the LLaMA fused set (HF LLaMA/Vicuna, and so LLaVA's and NExT-GPT's language models).

Like every rule of the table these patch *instances* (an instance-level ``forward``), so parameters,
their names and the state dict stay as they were, and the undo lets the class's method show through.

* ``llama.decoder_layer_add_rms_norm`` (norm): each decoder layer (``input_layernorm``, ``self_attn``,
  ``post_attention_layernorm``, ``mlp``, returning a tensor as in transformers ≥ 4.56) runs
  ``residual + attention`` and ``post_attention_layernorm`` as one pass (:func:`mmfast.ops.norm.rms_norm`
  with ``residual=``), inside the norm module's own call (DeepSpeed ZeRO-3 hooks fire around it).
  The layer's other steps are its own submodules, called as HF calls them. The instance forward is the
  class forward's wrapper chain rebuilt around the fused body (:func:`rewrap`), so transformers' gradient
  checkpointing (done in ``GradientCheckpointingLayer``'s class-forward wrapper) still applies.
* ``llama.rotary`` (attention): each attention module's forward is a copy of its class's forward
  whose global ``apply_rotary_pos_emb`` is :func:`mmfast.ops.llama.apply_rotary_pos_emb` (q and k in
  one kernel, in place when autograd does not record). Nothing else of the forward changes, so the
  cache, the mask and the attention interface stay transformers' own.
* ``llama.swiglu`` (projection): each MLP with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU
  activation runs ``down(silu(gate(x)) · up(x))`` with the activation and the down projection as one
  op (:func:`mmfast.ops.llama.swiglu_down`, inside ``down_proj``'s own call; the product is never
  kept); when ``down_proj`` is not a plain ``nn.Linear`` (an adapter), only the activation is fused.
"""
from __future__ import annotations

import inspect
import types

import torch

from mmfast.models.patch import PatchRule, backend_of, call_with_forward, set_methods

LLAMA_TYPES = ("llama", "llava")


def _set_instance_forwards(targets):
    """``(module, function taking self)`` pairs: bind each as the instance's ``forward``; the undo
    removes it. Modules that already carry an instance ``forward`` (another rule's) are left alone."""
    return set_methods([(m, "forward", types.MethodType(fn, m)) for m, fn in targets if "forward" not in vars(m)],
                       signature=False)


def _eps_of(norm):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if eps is None or not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    return float(eps)


# --------------------------------------------------------------------------- residual add + RMSNorm
def _layer_forward(model, layer_cls):
    from mmfast.ops.norm import rms_norm

    params = list(inspect.signature(layer_cls.forward).parameters)[1:]  # without self
    rest = params[1:]  # the names after hidden_states, in order

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            kwargs.update(zip(rest, args))
        post = self.post_attention_layernorm
        eps = _eps_of(post)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h = self.self_attn(hidden_states=h, **kwargs)
        h = h[0] if isinstance(h, tuple) else h

        def add_norm(x, r):
            y, s = rms_norm(x, post.weight, eps, r, backend=backend_of(model))
            return y.to(torch.promote_types(post.weight.dtype, s.dtype)), s

        h, residual = call_with_forward(post, add_norm, h, residual)
        h = self.mlp(h)
        return residual + h

    return forward


def rewrap(fn, leaf):
    """``fn`` with the innermost function of its ``functools.wraps`` chain replaced by ``leaf``: each wrapper is
    rebuilt around the rebuilt inner one, so what the wrappers do stays (transformers' gradient checkpointing
    in ``GradientCheckpointingLayer``'s class forward, keyword renames). None when a wrapper does not hold
    its ``__wrapped__`` in its closure (then it cannot be rebuilt)."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return leaf
    new_inner = rewrap(inner, leaf)
    if new_inner is None or not fn.__closure__:
        return None
    cells, found = [], False
    for c in fn.__closure__:
        try:
            hit = c.cell_contents is inner
        except ValueError:  # an empty cell
            hit = False
        cells.append(types.CellType(new_inner) if hit else c)
        found = found or hit
    if not found:
        return None
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__wrapped__ = new_inner
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def _patch_decoder_layers(model: torch.nn.Module):
    targets = []
    for m in model.modules():
        cls = type(m)
        if not cls.__name__.endswith("DecoderLayer") or not all(
            hasattr(m, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        ):
            continue
        if not type(m.post_attention_layernorm).__name__.endswith("RMSNorm") or _eps_of(m.post_attention_layernorm) is None:
            continue
        try:
            sig = inspect.signature(cls.forward)
        except (TypeError, ValueError):
            continue
        # transformers >= 4.56: forward(hidden_states, ...) -> torch.Tensor (older ones return tuples)
        if sig.return_annotation not in (torch.Tensor, "torch.Tensor") or list(sig.parameters)[1:2] != ["hidden_states"]:
            continue
        fused = rewrap(cls.forward, _layer_forward(model, cls))  # keeps the class forward's wrappers
        if fused is not None:
            targets.append((m, fused))
    return _set_instance_forwards(targets)


# --------------------------------------------------------------------------- rotary
def rebind_globals(fn, overrides: dict):
    """A copy of ``fn`` whose global lookups of the names in ``overrides`` find the overrides; a wrapper
    made with ``functools.wraps`` is rebuilt around a rebound ``__wrapped__``. None when no function
    of the chain reads any of those names from its globals."""
    inner = getattr(fn, "__wrapped__", None)
    closure, found = fn.__closure__, False
    if inner is not None and closure:
        cells = []
        for c in closure:
            try:
                v = c.cell_contents
            except ValueError:  # an empty cell
                cells.append(c)
                continue
            if v is inner:
                new_inner = rebind_globals(inner, overrides)
                if new_inner is not None:
                    found = True
                    cells.append(types.CellType(new_inner))
                    continue
            cells.append(c)
        closure = tuple(cells)
    g = fn.__globals__
    names = set(fn.__code__.co_names) & set(overrides) & set(g)
    if names:
        found = True
        g = {**g, **{k: overrides[k] for k in names}}
    if not found:
        return None
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__annotations__ = getattr(fn, "__annotations__", {})
    return new


def _patch_rotary(model: torch.nn.Module):
    from mmfast.ops.llama import rotary_embedding

    def fused(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return rotary_embedding(q, k, cos, sin, unsqueeze_dim, inplace=True, backend=backend_of(model))

    targets, cache = [], {}
    for m in model.modules():
        cls = type(m)
        if not cls.__name__.endswith("Attention") or not hasattr(m, "q_proj") or not hasattr(m, "k_proj"):
            continue
        if cls not in cache:
            cache[cls] = rebind_globals(cls.forward, {"apply_rotary_pos_emb": fused})
        if cache[cls] is not None:
            targets.append((m, cache[cls]))
    return _set_instance_forwards(targets)


# --------------------------------------------------------------------------- SwiGLU
def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _patch_swiglu(model: torch.nn.Module):
    from mmfast.ops.llama import swiglu, swiglu_down

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        if type(down) is torch.nn.Linear:
            return call_with_forward(
                down, lambda g_, u_: swiglu_down(g_, u_, down.weight, down.bias, backend=backend_of(model)), g, u)
        return down(swiglu(g, u, backend=backend_of(model)))

    targets = []
    for m in model.modules():
        if not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) or not _is_silu(m.act_fn):
            continue
        if list(inspect.signature(type(m).forward).parameters)[1:] != ["x"]:
            continue
        targets.append((m, forward))
    return _set_instance_forwards(targets)


RULES: list[PatchRule] = [
    PatchRule("llama.decoder_layer_add_rms_norm", "norm", LLAMA_TYPES, _patch_decoder_layers),
    PatchRule("llama.rotary", "attention", LLAMA_TYPES, _patch_rotary),
    PatchRule("llama.swiglu", "projection", LLAMA_TYPES, _patch_swiglu),
]
