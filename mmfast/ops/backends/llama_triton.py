"""The LLaMA fused set through the Triton kernels of :mod:`mmfast.ops._llama_triton`, behind
``torch.library`` custom ops (one opaque node each under torch.compile; each declares what it overwrites).

Contracts (explicit backward; see :mod:`mmfast.ops.llama`)::

    ROTARY_*.forward(q (B, HQ, S, D), k (B, HK, S, D), cos (B, S, D), sin, inplace) -> (q_out, k_out)
    ROTARY_*.backward(dq_out, dk_out, cos, sin) -> (dq, dk)
    SWIGLU_*.forward(g, u) -> a = silu(g) · u
    SWIGLU_*.backward(g, u, da, overwrite_da, store_a) -> (dg, du, a | None)

q/k/outputs/gradients: strided with unit stride in D (``inplace``: the outputs are q and k themselves);
cos/sin strided (stride 0 where broadcast), unit stride in D. g, u, da: contiguous, one shape;
``overwrite_da``: dg is written over da (the caller owns it); ``store_a``: the product is re-emitted.
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import Backend, Facts
from mmfast.ops._host import eager_fast
from mmfast.ops.backends._rope_ops import rope_ops

MAX_HEAD_DIM = 256
MAX_HEADS = 128

_K = []  # the kernel module, imported on the first launch (an import statement per call costs ~1 µs)


def _kernels():
    if not _K:
        import mmfast.ops._llama_triton as k

        _K.append(k)
    return _K[0]


@torch.library.custom_op("mmfast::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    a = torch.empty_like(g)
    _kernels().swiglu_fwd(g, u, a)
    return a


@_swiglu_fwd_op.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("mmfast::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor,
                   store_a: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dg, du, a), new tensors (a empty unless ``store_a``)."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    a = torch.empty_like(g) if store_a else g.new_empty(0)
    _kernels().swiglu_bwd(g, u, da, dg, du, a if store_a else None)
    return dg, du, a


@_swiglu_bwd_op.register_fake
def _(g, u, da, store_a):
    return torch.empty_like(g), torch.empty_like(u), (torch.empty_like(g) if store_a else g.new_empty(0))


@torch.library.custom_op("mmfast::swiglu_bwd_", mutates_args=("da",))
def _swiglu_bwd_inplace_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor,
                           store_a: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrites ``da`` with dg; returns (du, a) (a empty unless ``store_a``)."""
    du = torch.empty_like(u)
    a = torch.empty_like(g) if store_a else g.new_empty(0)
    _kernels().swiglu_bwd(g, u, da, da, du, a if store_a else None)
    return du, a


@_swiglu_bwd_inplace_op.register_fake
def _(g, u, da, store_a):
    return torch.empty_like(u), (torch.empty_like(g) if store_a else g.new_empty(0))


swiglu_fwd_call = eager_fast(_swiglu_fwd_op)
swiglu_bwd_call = eager_fast(_swiglu_bwd_op)
swiglu_bwd_inplace_call = eager_fast(_swiglu_bwd_inplace_op)


# the kernel module is looked up at the launch, so importing this module imports no Triton kernel
rotary_forward, rotary_backward = rope_ops("rope", lambda *a: _kernels().rope(*a))


def swiglu_backward(g, u, da, overwrite_da, store_a):
    if overwrite_da:
        du, a = swiglu_bwd_inplace_call(g, u, da, store_a)
        return da, du, (a if store_a else None)
    dg, du, a = swiglu_bwd_call(g, u, da, store_a)
    return dg, du, (a if store_a else None)


class TritonRotary(Backend):
    doc = "Triton: q and k of one position in one program, cos/sin read once"

    def supports(self, facts: Facts):
        reasons = []
        d, h = facts.get("head_dim"), facts.get("heads")
        if d is not None and d > MAX_HEAD_DIM:
            reasons.append(f"head dim {d} > {MAX_HEAD_DIM}")
        if h is not None and h > MAX_HEADS:
            reasons.append(f"{h} heads > {MAX_HEADS} (one program rotates every head of a position)")
        if facts.get("cos_grad"):
            reasons.append("cos/sin require grad and the kernel does not differentiate them")
        return reasons

    forward = staticmethod(rotary_forward)
    backward = staticmethod(rotary_backward)


class TritonSwiGLU(Backend):
    doc = "Triton: one elementwise pass each way, fp32 inside"
    forward = staticmethod(swiglu_fwd_call)
    backward = staticmethod(swiglu_backward)


ROTARY_TRITON = TritonRotary(devices=("cuda",), needs=("triton",))
ROTARY_INTERPRET = TritonRotary(devices=("cpu",), needs=("triton_interpret",))
SWIGLU_TRITON = TritonSwiGLU(devices=("cuda",), needs=("triton",))
SWIGLU_INTERPRET = TritonSwiGLU(devices=("cpu",), needs=("triton_interpret",))
