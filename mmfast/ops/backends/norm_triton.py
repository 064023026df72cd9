"""LayerNorm / RMSNorm through the Triton kernels (:mod:`mmfast.ops._norm_triton`), behind
``mmfast::norm_fwd`` / ``mmfast::norm_bwd`` custom ops so torch.compile keeps one opaque call per direction.

Contract (explicit backward; see :mod:`mmfast.ops.norm`)::

    forward(x (..., N), residual (..., N) | None, weight | None, bias | None, eps, is_rms)   # contiguous rows
        -> (y, s, stats)        # s: x + residual in residual's dtype (None or empty without one); stats (2, M) fp32
    backward(s, weight, dy, ds | None, stats, is_rms) -> (dx, dwb (2, N) fp32: dw, db)
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import Backend, Facts
from mmfast.ops._host import eager_fast

MAX_N = 65536
_K = []  # the kernel module's launchers, imported on the first call (not at this module's import)


def _kernels():
    if not _K:
        from mmfast.ops import _norm_triton

        _K.append(_norm_triton)
    return _K[0]


@torch.library.custom_op("mmfast::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, stats = _kernels().norm_fwd(x, residual, weight, bias, eps, is_rms,
                           residual.dtype if residual is not None else x.dtype)
    return y, (s if s is not None else x.new_empty(0)), stats


@_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    M = x.numel() // x.shape[-1]
    s = residual.new_empty(residual.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), s, torch.empty(2, M, device=x.device, dtype=torch.float32)


@torch.library.custom_op("mmfast::norm_bwd", mutates_args=())
def _norm_bwd_op(
    s: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, ds: torch.Tensor | None,
    stats: torch.Tensor, is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().norm_bwd(s, weight, dy, ds, stats, is_rms, dy.dtype)


@_norm_bwd_op.register_fake
def _(s, weight, dy, ds, stats, is_rms):
    return dy.new_empty(s.shape), torch.empty(2, s.shape[-1], device=s.device, dtype=torch.float32)


norm_fwd_call = eager_fast(_norm_fwd_op)
norm_bwd_call = eager_fast(_norm_bwd_op)


def forward(x, residual, weight, bias, eps, is_rms):
    """Under torch.compile the custom op (s an empty tensor without a residual); in eager mode the launcher
    the op's body runs, directly (s None without a residual: no placeholder allocated)."""
    if torch.compiler.is_compiling():
        return _norm_fwd_op(x, residual, weight, bias, eps, is_rms)
    return _kernels().norm_fwd(x, residual, weight, bias, eps, is_rms,
                               residual.dtype if residual is not None else x.dtype)


def backward(s, weight, dy, ds, stats, is_rms):
    if torch.compiler.is_compiling():
        return _norm_bwd_op(s, weight, dy, ds, stats, is_rms)
    return _kernels().norm_bwd(s, weight, dy, ds, stats, is_rms, dy.dtype)


class TritonNorm(Backend):
    doc = "Triton kernels, one row per program (fused residual add)"

    def supports(self, facts: Facts):
        n = facts.get("n")
        if n is not None and n > MAX_N:
            return [f"normalised size {n} > {MAX_N} (one row per program)"]
        return []

    forward = staticmethod(forward)
    backward = staticmethod(backward)


TRITON = TritonNorm(devices=("cuda",), needs=("triton",))
INTERPRET = TritonNorm(devices=("cpu",), needs=("triton_interpret",))
