"""Projection modules: an MLP projector (LLaVA's shape), the fused LM-head loss and CLIP's normalised head.

Checkpoint layouts (LLaVA's ``mm_projector.*`` and HF's ``multi_modal_projector.linear_k.*``) are the LLaVA
system's business: :mod:`mmfast.models.llava.projector` builds and loads these modules from them."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.projection import fused_linear_cross_entropy, linear_l2_normalize, mlp_projector


class MLPProjector(nn.Module):
    """LLaVA's vision→language projector: ``Linear(in, hidden) → GELU → … → Linear(hidden, out)``.

    ``depth`` counts the Linear layers (``linear`` = 1, ``mlp2x_gelu`` = 2, ``mlpNx_gelu`` = N); the
    hidden width defaults to ``out_dim`` as in LLaVA. Parameters are registered under ``"0"``, ``"2"``,
    ``"4"`` … exactly like LLaVA's ``nn.Sequential`` (``mm_projector.0.weight``).
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

    def layers(self) -> list[nn.Linear]:
        return [getattr(self, str(2 * i)) for i in range(self.depth)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_projector(x, [(m.weight, m.bias) for m in self.layers()], self.act,
                             recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, act={self.act!r}, recompute={self.recompute}"


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
