"""The norm backends' custom ops, one pair per kernel: ``mmfast::<name>_fwd`` and ``mmfast::<name>_bwd``. Under
torch.compile each direction is one opaque node; in eager mode the launchers run directly (no placeholder for
an absent residual, no dispatcher round trip: :func:`mmfast.ops._host.eager_fast`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmfast.ops._host import eager_fast


def norm_ops(name: str, fwd: Callable, bwd: Callable):
    """``(forward, backward, fwd_call, bwd_call)`` of the norm backend contract (:mod:`mmfast.ops.norm`) over
    the launchers ``fwd(x, residual, weight, bias, eps, is_rms, residual_dtype) -> (y, s | None, stats)`` and
    ``bwd(s, weight, dy, ds, stats, is_rms, dx_dtype) -> (dx, dwb)``; ``fwd_call``/``bwd_call`` are the
    custom ops as :func:`eager_fast` calls them (``.op``: the op itself)."""

    @torch.library.custom_op(f"mmfast::{name}_fwd", mutates_args=())
    def fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, s, stats = fwd(x, residual, weight, bias, eps, is_rms, residual.dtype if residual is not None else x.dtype)
        return y, (s if s is not None else x.new_empty(0)), stats

    @fwd_op.register_fake
    def _(x, residual, weight, bias, eps, is_rms):
        M = x.numel() // x.shape[-1]
        s = residual.new_empty(residual.shape) if residual is not None else x.new_empty(0)
        return x.new_empty(x.shape), s, torch.empty(2, M, device=x.device, dtype=torch.float32)

    @torch.library.custom_op(f"mmfast::{name}_bwd", mutates_args=())
    def bwd_op(s: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, ds: torch.Tensor | None,
               stats: torch.Tensor, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return bwd(s, weight, dy, ds, stats, is_rms, dy.dtype)

    @bwd_op.register_fake
    def _(s, weight, dy, ds, stats, is_rms):
        return dy.new_empty(s.shape), torch.empty(2, s.shape[-1], device=s.device, dtype=torch.float32)

    def forward(x, residual, weight, bias, eps, is_rms):
        """Under torch.compile the custom op (s an empty tensor without a residual); in eager mode the
        launcher, directly (s None without a residual: no placeholder allocated)."""
        if torch.compiler.is_compiling():
            return fwd_op(x, residual, weight, bias, eps, is_rms)
        return fwd(x, residual, weight, bias, eps, is_rms, residual.dtype if residual is not None else x.dtype)

    def backward(s, weight, dy, ds, stats, is_rms):
        if torch.compiler.is_compiling():
            return bwd_op(s, weight, dy, ds, stats, is_rms)
        return bwd(s, weight, dy, ds, stats, is_rms, dy.dtype)

    return forward, backward, eager_fast(fwd_op), eager_fast(bwd_op)
