"""LayerNorm / RMSNorm modules over :mod:`mmfast.ops.norm`, with the optional fused residual add."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.norm import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension (same parameters and state dict).

    ``forward(x, residual=None)``: with ``residual`` returns ``(norm(x + residual), x + residual)``.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: str | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias=bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm normalises the last dimension only; got normalized_shape {self.normalized_shape}")
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual, backend=self.backend)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: ``y = x / √(mean(x²) + eps) · weight`` (statistics in fp32); parameter ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, backend: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


__all__ = ["LayerNorm", "RMSNorm"]
