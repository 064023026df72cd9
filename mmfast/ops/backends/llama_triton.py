"""The LLaMA fused set through the Triton kernels of :mod:`mmfast.ops._llama_triton`, behind
``torch.library`` custom ops (:mod:`._rope_ops`, :mod:`._swiglu_ops`: one opaque node each under torch.compile;
each declares what it overwrites).

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

from mmfast.ops._dispatch import Backend, Facts
from mmfast.ops.backends._rope_ops import rope_ops
from mmfast.ops.backends._swiglu_ops import swiglu_ops

MAX_HEAD_DIM = 256
MAX_HEADS = 128

_K = []  # the kernel module, imported on the first launch (an import statement per call costs ~1 µs)


def _kernels():
    if not _K:
        import mmfast.ops._llama_triton as k

        _K.append(k)
    return _K[0]


# the kernel module is looked up at the launch, so importing this module imports no Triton kernel
rotary_forward, rotary_backward = rope_ops("rope", lambda *a: _kernels().rope(*a))
swiglu_forward, swiglu_backward = swiglu_ops(
    "swiglu", lambda *a: _kernels().swiglu_fwd(*a), lambda *a: _kernels().swiglu_bwd(*a))


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
    forward = staticmethod(swiglu_forward)
    backward = staticmethod(swiglu_backward)


ROTARY_TRITON = TritonRotary(devices=("cuda",), needs=("triton",))
ROTARY_INTERPRET = TritonRotary(devices=("cpu",), needs=("triton_interpret",))
SWIGLU_TRITON = TritonSwiGLU(devices=("cuda",), needs=("triton",))
SWIGLU_INTERPRET = TritonSwiGLU(devices=("cpu",), needs=("triton_interpret",))
