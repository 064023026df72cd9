"""``cpp``: the rotary embedding and the SwiGLU activation on CPU through ``mmfast._C`` (csrc/rotary.cpp,
csrc/swiglu.cpp).

One pass over q and k per call, each pair of a head row rotated in place or into new tensors, with every
product and sum rounded as the reference composition rounds it (no FMA): fp32 results equal
:func:`mmfast.ops.llama.rotary_embedding_reference` bit for bit, in one call instead of the reference's ten
tensor ops (two ``cat``, two ``neg``, four ``mul``, two ``add``): a decode step's call (q (32, 4, 1, 32), k
(32, 2, 1, 32)) takes 22.8 µs through ``rotary_embedding`` against the reference's 62.4 µs on this repository's
CPU machine (one thread, 2026-12-03). Contract as the Triton backend's (:mod:`.llama_triton`)::

    forward(q (B, HQ, S, D), k (B, HK, S, D), cos (B, S, D), sin, inplace) -> (q_out, k_out)
    backward(dq_out, dk_out, cos, sin) -> (dq, dk)

Refused, with the reason: bf16/fp16 (the kernel would round once where the reference rounds each op, and on
CPU the rotary keeps the reference's results) and cos/sin that require grad.

SwiGLU (fp32; contract as the Triton backend's)::

    forward(g, u) -> silu(g) · u
    backward(g, u, da, overwrite_da, store_a) -> (dg, du, a | None)

One vectorised pass each way (σ from simd.h's ``vexp``, ≤ 2 ulp): a decode step's activation (32 × 384)
takes 7.1 µs against 15.1 µs for ``F.silu(g) * u`` (one thread, 2026-12-03); results are within the error
bound, not the reference's bit for bit. Each call is a ``torch.library`` custom op under torch.compile (one opaque node),
the extension directly in eager mode.
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import Backend, Facts, cpp_extension
from mmfast.ops.backends._rope_ops import rope_ops
from mmfast.ops.backends._swiglu_ops import swiglu_ops

rotary_forward, rotary_backward = rope_ops("rope_cpp", lambda *a: cpp_extension().rope(*a))
swiglu_forward, swiglu_backward = swiglu_ops(
    "swiglu_cpp", lambda *a: cpp_extension().swiglu_fwd(*a), lambda *a: cpp_extension().swiglu_bwd(*a))


class CppRotary(Backend):
    doc = "C++ (mmfast._C): q and k in one pass, rounded as the reference (fp32: bit-equal)"

    def supports(self, facts: Facts):
        if facts.get("cos_grad"):
            return ["cos/sin require grad and the kernel does not differentiate them"]
        return []

    forward = staticmethod(rotary_forward)
    backward = staticmethod(rotary_backward)


ROTARY_CPP = CppRotary(devices=("cpu",), needs=("cpp",), dtypes=(torch.float32,),
                       cpp_kernel=("rope", "the rotary kernel"))


SWIGLU_CPP = Backend(devices=("cpu",), needs=("cpp",), dtypes=(torch.float32,),
                     cpp_kernel=("swiglu_fwd", "the SwiGLU kernels"), forward=swiglu_forward, backward=swiglu_backward,
                     doc="C++ (mmfast._C): one elementwise pass each way, vectorised e^x, fp32")
