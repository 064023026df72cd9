"""Modules of the LLaMA fused set over :mod:`mmfast.ops.llama` (the residual add + RMSNorm module is
:class:`mmfast.nn.RMSNorm`, ``forward(x, residual)``)."""
from __future__ import annotations

import torch
from torch import nn

from mmfast.ops.llama import rotary_embedding, swiglu, swiglu_down


class ApplyRotary(nn.Module):
    """``forward(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed)``: HF's ``apply_rotary_pos_emb``
    as one kernel for q and k (no parameters)."""

    def __init__(self, inplace: bool = False, backend: str | None = None):
        super().__init__()
        self.inplace, self.backend = inplace, backend

    def forward(self, q, k, cos, sin, unsqueeze_dim: int = 1):
        return rotary_embedding(q, k, cos, sin, unsqueeze_dim, inplace=self.inplace, backend=self.backend)


class SwiGLU(nn.Module):
    """``forward(gate, up) = silu(gate) · up`` in one pass (no parameters)."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up, backend=self.backend)


class SwiGLUMLP(nn.Module):
    """LLaMA's MLP with HF ``LlamaMLP``'s parameter names (``gate_proj``, ``up_proj``, ``down_proj``, so
    the state dict loads either way): ``down(silu(gate(x)) · up(x))`` with the product never kept for
    the backward."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias,
                           backend=self.backend)


__all__ = ["ApplyRotary", "SwiGLU", "SwiGLUMLP"]
