"""Projection modules: LLaVA's MLP projector, the fused LM-head loss and CLIP's normalised head."""
from __future__ import annotations

import re

import torch
from torch import nn

from mmfast.ops.projection import fused_linear_cross_entropy, linear_l2_normalize, mlp_projector

_LLAVA_TYPE = re.compile(r"^mlp(\d+)x_gelu$")
# Prefixes under which the projector sits in LLaVA / HF checkpoints.
_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")
_HF_KEY = re.compile(r"^linear_(\d+)\.(weight|bias)$")


class MLPProjector(nn.Module):
    """LLaVA's vision→language projector: ``Linear(in, hidden) → GELU → … → Linear(hidden, out)``.

    ``depth`` counts the Linear layers (``linear`` = 1, ``mlp2x_gelu`` = 2, ``mlpNx_gelu`` = N); the
    hidden width defaults to ``out_dim`` as in LLaVA. Parameters are registered under ``"0"``, ``"2"``,
    ``"4"`` … exactly like LLaVA's ``nn.Sequential`` (``mm_projector.0.weight``); HF's
    ``linear_1``/``linear_2`` keys are renamed on load, so both checkpoint layouts load directly.
    ``recompute=True`` stores the pre-activations only and recomputes the GELU in the backward.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 2, act: str = "gelu",
                 bias: bool = True, recompute: bool = False, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        for i in range(depth):
            self.add_module(str(2 * i), nn.Linear(dims[i], dims[i + 1], bias=bias, device=device, dtype=dtype))
        self.depth, self.act, self.recompute, self.backend = depth, act, recompute, backend
        self._register_load_state_dict_pre_hook(_rename_hf_keys)

    @classmethod
    def from_llava_type(cls, projector_type: str, in_dim: int, out_dim: int, **kw) -> MLPProjector:
        """``"linear"`` or ``"mlp{N}x_gelu"`` (LLaVA's ``mm_projector_type``)."""
        if projector_type == "linear":
            return cls(in_dim, out_dim, depth=1, **kw)
        m = _LLAVA_TYPE.match(projector_type)
        if not m:
            raise ValueError(f"projector_type must be 'linear' or 'mlp<N>x_gelu', got {projector_type!r}")
        return cls(in_dim, out_dim, depth=int(m.group(1)), **kw)

    @classmethod
    def from_state_dict(cls, state_dict: dict, act: str = "gelu", **kw) -> MLPProjector:
        """Build and load from a LLaVA (``mm_projector.0/.2``) or HF (``multi_modal_projector.linear_1/2``)
        state dict, with or without those prefixes; sizes and depth come from the weights."""
        sd = _strip_prefix(state_dict)
        sd = {_hf_to_seq(k): v for k, v in sd.items()}
        idx = sorted({int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()})
        if not idx or idx != list(range(0, 2 * len(idx), 2)):
            raise ValueError(f"state dict does not look like a projector (layer indices {idx}); "
                             f"expected keys 0.weight, 2.weight, ... or linear_1.weight, linear_2.weight")
        ws = [sd[f"{i}.weight"] for i in idx]
        bias = f"{idx[0]}.bias" in sd
        m = cls(ws[0].shape[1], ws[-1].shape[0], hidden_dim=ws[0].shape[0] if len(ws) > 1 else None,
                depth=len(ws), act=act, bias=bias, dtype=ws[0].dtype, **kw)
        m.load_state_dict(sd)
        return m

    def layers(self) -> list[nn.Linear]:
        return [getattr(self, str(2 * i)) for i in range(self.depth)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_projector(x, [(m.weight, m.bias) for m in self.layers()], self.act,
                             recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, act={self.act!r}, recompute={self.recompute}"


def _strip_prefix(sd: dict) -> dict:
    for p in _PREFIXES:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _hf_to_seq(key: str) -> str:
    m = _HF_KEY.match(key)
    return f"{2 * (int(m.group(1)) - 1)}.{m.group(2)}" if m else key


def _rename_hf_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: ``{prefix}linear_k.*`` → ``{prefix}{2(k-1)}.*`` (HF layout)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _hf_to_seq(key[len(prefix):])
        if new != key[len(prefix):]:
            state_dict[prefix + new] = state_dict.pop(key)


class FusedLinearCrossEntropyLoss(nn.Module):
    """``forward(hidden, weight, target, bias=None)`` = cross-entropy of ``hidden @ weightᵀ + bias``
    without materialising the logits; see :func:`mmfast.ops.fused_linear_cross_entropy`."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 z_loss: float = 0.0, softcap: float | None = None, backend: str | None = None):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend

    def forward(self, hidden, weight, target, bias=None):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction=self.reduction, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
        )


class LinearL2Normalize(nn.Linear):
    """CLIP's projection head with the normalisation: ``normalize(x Wᵀ + b)``; an ``nn.Linear`` otherwise."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-6,
                 device=None, dtype=None, backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_l2_normalize(x, self.weight, self.bias, self.eps, backend=self.backend)


__all__ = ["FusedLinearCrossEntropyLoss", "LinearL2Normalize", "MLPProjector"]
