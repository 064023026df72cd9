"""The SwiGLU backends' custom ops, one set per kernel: ``mmfast::<name>_fwd`` (a = silu(g)·u),
``mmfast::<name>_bwd`` (new dg, du, a) and ``mmfast::<name>_bwd_`` (dg written over da). Each is one opaque
node under torch.compile and, in eager mode, its Python body called directly
(:func:`mmfast.ops._host.eager_fast`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmfast.ops._host import eager_fast


def swiglu_ops(name: str, fwd: Callable[..., None], bwd: Callable[..., None]):
    """``(forward, backward)`` of the SwiGLU backend contract (:mod:`mmfast.ops.llama`) over the launchers
    ``fwd(g, u, a)`` (writes a) and ``bwd(g, u, da, dg, du, a | None)`` (writes dg, which may be da, du and,
    when given, a)."""

    @torch.library.custom_op(f"mmfast::{name}_fwd", mutates_args=())
    def fwd_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = torch.empty_like(g)
        fwd(g, u, a)
        return a

    @fwd_op.register_fake
    def _(g, u):
        return torch.empty_like(g)

    @torch.library.custom_op(f"mmfast::{name}_bwd", mutates_args=())
    def bwd_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor,
               store_a: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dg, du, a), new tensors (a empty unless ``store_a``)."""
        dg, du = torch.empty_like(g), torch.empty_like(u)
        a = torch.empty_like(g) if store_a else g.new_empty(0)
        bwd(g, u, da, dg, du, a if store_a else None)
        return dg, du, a

    @bwd_op.register_fake
    def _(g, u, da, store_a):
        return torch.empty_like(g), torch.empty_like(u), (torch.empty_like(g) if store_a else g.new_empty(0))

    @torch.library.custom_op(f"mmfast::{name}_bwd_", mutates_args=("da",))
    def bwd_inplace_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor,
                       store_a: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Overwrites ``da`` with dg; returns (du, a) (a empty unless ``store_a``)."""
        du = torch.empty_like(u)
        a = torch.empty_like(g) if store_a else g.new_empty(0)
        bwd(g, u, da, da, du, a if store_a else None)
        return du, a

    @bwd_inplace_op.register_fake
    def _(g, u, da, store_a):
        return torch.empty_like(u), (torch.empty_like(g) if store_a else g.new_empty(0))

    fwd_call, bwd_call, bwd_inplace_call = eager_fast(fwd_op), eager_fast(bwd_op), eager_fast(bwd_inplace_op)

    def backward(g, u, da, overwrite_da, store_a):
        if overwrite_da:
            du, a = bwd_inplace_call(g, u, da, store_a)
            return da, du, (a if store_a else None)
        dg, du, a = bwd_call(g, u, da, store_a)
        return dg, du, (a if store_a else None)

    return fwd_call, backward
