"""LLaVA's projector as checkpoints name it: ``mm_projector_type`` (``linear``, ``mlp{N}x_gelu``) and the
two state-dict layouts, LLaVA's ``nn.Sequential`` (``model.mm_projector.0/.2``) and HF's
``multi_modal_projector.linear_1/2``. The module itself is :class:`mmfast.nn.MLPProjector`, which knows
neither layout; a projector built here loads both."""
from __future__ import annotations

import re

from mmfast.nn.projection import MLPProjector

_LLAVA_TYPE = re.compile(r"^mlp(\d+)x_gelu$")
# Prefixes under which the projector sits in LLaVA / HF checkpoints.
_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")
_HF_KEY = re.compile(r"^linear_(\d+)\.(weight|bias)$")


def strip_prefix(sd: dict) -> dict:
    """The projector's own entries of a LLaVA / HF state dict (the whole dict when no prefix matches)."""
    for p in _PREFIXES:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def hf_to_seq(key: str) -> str:
    """HF's ``linear_k.weight`` → the Sequential's ``{2(k-1)}.weight``; other keys unchanged."""
    m = _HF_KEY.match(key)
    return f"{2 * (int(m.group(1)) - 1)}.{m.group(2)}" if m else key


def _rename_hf_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: ``{prefix}linear_k.*`` → ``{prefix}{2(k-1)}.*`` (HF layout)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = hf_to_seq(key[len(prefix):])
        if new != key[len(prefix):]:
            state_dict[prefix + new] = state_dict.pop(key)


def _loads_both_layouts(m: MLPProjector) -> MLPProjector:
    m._register_load_state_dict_pre_hook(_rename_hf_keys)
    return m


def projector_from_type(projector_type: str, in_dim: int, out_dim: int, **kw) -> MLPProjector:
    """``"linear"`` or ``"mlp{N}x_gelu"`` (LLaVA's ``mm_projector_type``); loads both checkpoint layouts."""
    if projector_type == "linear":
        return _loads_both_layouts(MLPProjector(in_dim, out_dim, depth=1, **kw))
    m = _LLAVA_TYPE.match(projector_type)
    if not m:
        raise ValueError(f"projector_type must be 'linear' or 'mlp<N>x_gelu', got {projector_type!r}")
    return _loads_both_layouts(MLPProjector(in_dim, out_dim, depth=int(m.group(1)), **kw))


def projector_from_state_dict(state_dict: dict, act: str = "gelu", **kw) -> MLPProjector:
    """Build and load from a LLaVA (``mm_projector.0/.2``) or HF (``multi_modal_projector.linear_1/2``)
    state dict, with or without those prefixes; sizes and depth come from the weights."""
    sd = strip_prefix(state_dict)
    sd = {hf_to_seq(k): v for k, v in sd.items()}
    idx = sorted({int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()})
    if not idx or idx != list(range(0, 2 * len(idx), 2)):
        raise ValueError(f"state dict does not look like a projector (layer indices {idx}); "
                         f"expected keys 0.weight, 2.weight, ... or linear_1.weight, linear_2.weight")
    ws = [sd[f"{i}.weight"] for i in idx]
    bias = f"{idx[0]}.bias" in sd
    m = MLPProjector(ws[0].shape[1], ws[-1].shape[0], hidden_dim=ws[0].shape[0] if len(ws) > 1 else None,
                     depth=len(ws), act=act, bias=bias, dtype=ws[0].dtype, **kw)
    m.load_state_dict(sd)
    return _loads_both_layouts(m)


__all__ = ["hf_to_seq", "projector_from_state_dict", "projector_from_type", "strip_prefix"]
