"""The LLaMA fused set: rotary position embedding on q and k in one kernel, and the SwiGLU activation
(alone, or with the down projection so the activation is never stored). The third member, the
residual add + RMSNorm in one pass, is :func:`mmfast.ops.norm.rms_norm` with ``residual=``.

* ``rotary_embedding(q, k, cos, sin, unsqueeze_dim=1)``: HF's ``apply_rotary_pos_emb`` (the
  ``rotate_half`` convention), q (B, HQ, S, D) and k (B, HK, S, D) (or (B, S, H, D) with
  ``unsqueeze_dim=2``), cos/sin (B or 1, S, D) broadcastable to (B, S, D). Forward and backward are one launch
  each for q and k together; only cos and sin are kept for the backward. ``inplace=True`` rotates q
  and k in their own memory when autograd is not recording (inference, generation); when it
  records, the outputs are new tensors (in place on the projections' views would make autograd copy
  the whole projection gradient in the backward). The kernel does not differentiate cos/sin: when
  they require grad the ``triton`` backends refuse (``reference`` then runs).
* ``swiglu(gate, up)``: ``silu(gate) · up``; keeps gate and up for the backward, not the product.
* ``swiglu_down(gate, up, weight, bias)``: ``F.linear(silu(gate) · up, weight, bias)``; the product
  is freed after the GEMM and re-emitted by the backward kernel for the weight gradient, so no
  (tokens × intermediate) activation beyond gate and up is kept between forward and backward.

Backend contract (see :mod:`mmfast.ops._dispatch`). Explicit-backward backends (``triton``,
``triton_interpret``: :mod:`mmfast.ops.backends.llama_triton`, fp32 inside, one rounding out)::

    rotary_embedding.forward(q (B, HQ, S, D), k (B, HK, S, D), cos (B, S, D), sin, inplace) -> (q_out, k_out)
    rotary_embedding.backward(dq_out, dk_out, cos, sin) -> (dq, dk)
    swiglu.forward(g, u) -> silu(g) · u
    swiglu.backward(g, u, da, overwrite_da, store_a) -> (dg, du, a | None)

(q/k views with unit stride in D, cos/sin broadcast to (B, S, D); g/u/da contiguous.) ``AUTOGRAD``
backends (``reference``: the plain compositions below, the test oracle) take the public call:
``forward(q, k, cos, sin, unsqueeze_dim)`` / ``forward(gate, up)``. Default order: triton,
triton_interpret, ``cpp`` (CPU, fp32: :mod:`mmfast.ops.backends.llama_cpp`; the rotary embedding with the
reference's roundings bit for bit in one call, SwiGLU in one pass each way), reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import Backend, Facts, Op, register
from mmfast.ops._host import autocast_inputs

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- references
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary_embedding_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF's ``apply_rotary_pos_emb``; results in q's and k's dtypes."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    qo = q * cos + _rotate_half(q) * sin
    ko = k * cos + _rotate_half(k) * sin
    return qo.to(q.dtype), ko.to(k.dtype)


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def swiglu_down_reference(gate, up, weight, bias=None):
    return F.linear(F.silu(gate) * up, weight, bias)


# --------------------------------------------------------------------------- backends
def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32, {"head_dim": 128, "heads": 32})


_TRITON = "mmfast.ops.backends.llama_triton"
ROTARY_OP = register(Op("rotary_embedding", example=_example))
ROTARY_OP.add("triton", f"{_TRITON}:ROTARY_TRITON")
ROTARY_OP.add("triton_interpret", f"{_TRITON}:ROTARY_INTERPRET")
ROTARY_OP.add("cpp", "mmfast.ops.backends.llama_cpp:ROTARY_CPP")  # CPU, fp32: the reference bit for bit
ROTARY_OP.add("reference", Backend(forward=rotary_embedding_reference, doc="HF's rotate_half composition"))
SWIGLU_OP = register(Op("swiglu", example=_example))
SWIGLU_OP.add("triton", f"{_TRITON}:SWIGLU_TRITON")
SWIGLU_OP.add("triton_interpret", f"{_TRITON}:SWIGLU_INTERPRET")
SWIGLU_OP.add("cpp", "mmfast.ops.backends.llama_cpp:SWIGLU_CPP")  # CPU, fp32: one pass, vectorised e^x
SWIGLU_OP.add("reference", Backend(forward=swiglu_reference, doc="F.silu(gate) * up"))


# --------------------------------------------------------------------------- autograd glue
class _RotaryFunction(torch.autograd.Function):
    """q, k in the caller's layout; ``transposed``: (B, S, H, D), viewed (B, H, S, D) inside (views and
    reshapes made inside the Function are not autograd nodes: less host time per call)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, be, transposed):
        if transposed:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        qo, ko = be.forward(_unit_last(q), _unit_last(k), cos, sin, False)
        ctx.save_for_backward(cos, sin)
        ctx.be, ctx.transposed = be, transposed
        return (qo.transpose(1, 2), ko.transpose(1, 2)) if transposed else (qo, ko)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        if ctx.transposed:
            dqo, dko = dqo.transpose(1, 2), dko.transpose(1, 2)
        dq, dk = ctx.be.backward(_unit_last(dqo), _unit_last(dko), cos, sin)
        if ctx.transposed:
            dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
        return dq, dk, None, None, None, None


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, be):
        ctx.save_for_backward(g, u)
        ctx.be = be
        return be.forward(g, u)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, da):
        g, u = ctx.saved_tensors
        dg, du, _ = ctx.be.backward(g, u, da.contiguous(), False, False)
        return dg, du, None


class _SwiGLUDownFunction(torch.autograd.Function):
    """out = a Wᵀ + b with a = silu(g)·u freed after the GEMM. Backward: da = dout W (a new buffer),
    one pass turns da into dg in place and writes du and a again, then dW = doutᵀ a, db = Σ dout.
    g, u: (..., I) contiguous, flattened to rows inside (not autograd nodes)."""

    @staticmethod
    def forward(ctx, g, u, weight, bias, be):
        a = be.forward(g.view(-1, g.shape[-1]), u.view(-1, u.shape[-1]))
        ctx.save_for_backward(g, u, weight)
        ctx.has_bias = bias is not None
        ctx.be = be
        return _down(a, weight, bias, g.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        g, u, weight = ctx.saved_tensors
        shape = g.shape
        g, u = g.view(-1, shape[-1]), u.view(-1, shape[-1])
        dout = dout.reshape(-1, dout.shape[-1]).contiguous()
        need_w = ctx.needs_input_grad[2]
        da = torch.mm(dout, weight)  # (M, I), ours: becomes dg in place
        dg, du, a = ctx.be.backward(g, u, da, True, need_w)
        dw = torch.mm(dout.t(), a) if need_w else None
        db = dout.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dg.view(shape), du.view(shape), dw, db, None


def _down(a, weight, bias, shape):
    """The down projection of the product rows ``a`` (M, I), in the gate's leading ``shape``."""
    out = torch.mm(a, weight.t()) if bias is None else torch.addmm(bias, a, weight.t())
    return out.view(*shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------- public API
def _check_float(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


def _backend(op, t, backend, **extra):
    # memoised on the call's device, dtype and extras (Op.choose): no Facts built on a repeated call
    return op.choose(backend, (t.device, t.dtype, *extra.values()), lambda: Facts.of([t], **extra))


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1, *, inplace: bool = False, backend: str | None = None):
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` with cos/sin unsqueezed at
    ``unsqueeze_dim`` (1: q is (B, H, S, D); 2: q is (B, S, H, D)), as HF's ``apply_rotary_pos_emb``.
    Results in q's dtype. ``inplace`` writes into q and k when autograd does not record the call."""
    _check_float("q", q)
    _check_float("k", k, q)
    _check_float("cos", cos, q)
    _check_float("sin", sin, q)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ((B, H, S, D) inputs) or 2 ((B, S, H, D)), got {unsqueeze_dim}")
    D = q.shape[-1]
    if D % 2 or k.shape[-1] != D:
        raise ValueError(f"q and k need the same even head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    # canonical (B, H, S, D) views
    qv, kv = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    B, HQ, S, _ = qv.shape
    if kv.shape[0] != B or kv.shape[2] != S:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch/sequence")
    if cos.dim() != 3:
        raise ValueError(f"cos/sin must be (B or 1, S, D), got shape {tuple(cos.shape)}")
    try:
        cos3, sin3 = torch.broadcast_to(cos, (B, S, D)), torch.broadcast_to(sin, (B, S, D))
    except RuntimeError:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to (B={B}, S={S}, D={D})") from None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos.requires_grad or sin.requires_grad)
    be = _backend(ROTARY_OP, q, backend, head_dim=D, heads=max(HQ, kv.shape[1]),
                  cos_grad=grad and (cos.requires_grad or sin.requires_grad))
    if not be.backward:  # AUTOGRAD: the public call, differentiable
        qo, ko = be.forward(q, k, cos, sin, unsqueeze_dim)
        if inplace and not grad:
            q.copy_(qo)
            k.copy_(ko)
            return q, k
        return qo, ko
    cos3, sin3 = _unit_last(cos3), _unit_last(sin3)
    if inplace and not grad and qv.stride(-1) == 1 and kv.stride(-1) == 1:
        be.forward(qv, kv, cos3, sin3, True)
        return q, k
    return _RotaryFunction.apply(q, k, cos3, sin3, be, unsqueeze_dim == 2)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1, *, inplace: bool = False,
                         backend: str | None = None):
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (``position_ids`` is accepted and unused, as
    there)."""
    return rotary_embedding(q, k, cos, sin, unsqueeze_dim, inplace=inplace, backend=backend)


def _check_pair(gate, up):
    _check_float("gate", gate)
    _check_float("up", up, gate)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate has dtype {gate.dtype} but up has {up.dtype}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) · up`` in one pass; the backward keeps gate and up, not the product."""
    gate, up = autocast_inputs(gate, up)
    _check_pair(gate, up)
    be = _backend(SWIGLU_OP, gate, backend)
    if not be.backward:
        return be.forward(gate, up)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return be.forward(gate.contiguous(), up.contiguous())  # nothing to record: no autograd.Function
    if not torch.is_autocast_enabled(gate.device.type):  # the autocast context costs ~5 µs of host time
        return _SwiGLUFunction.apply(gate.contiguous(), up.contiguous(), be)
    with torch.autocast(gate.device.type, enabled=False):
        return _SwiGLUFunction.apply(gate.contiguous(), up.contiguous(), be)


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, backend: str | None = None) -> torch.Tensor:
    """``F.linear(silu(gate) · up, weight, bias)``: LLaMA's MLP after its gate and up projections.
    The product is not kept for the backward (re-emitted there by the SwiGLU backward pass)."""
    gate, up, weight, bias = autocast_inputs(gate, up, weight, bias)
    _check_pair(gate, up)
    _check_float("weight", weight, gate)
    I = gate.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != I or weight.dtype != gate.dtype:
        raise ValueError(f"weight must be (N, {I}) {gate.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if bias is not None:
        _check_float("bias", bias, gate)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != gate.dtype:
            raise ValueError(f"bias must be ({weight.shape[0]},) {gate.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    be = _backend(SWIGLU_OP, gate, backend)
    if not be.backward:
        return F.linear(be.forward(gate, up), weight, bias)
    g, u, w = gate.contiguous(), up.contiguous(), weight.contiguous()
    autocast = torch.is_autocast_enabled(gate.device.type)
    if not (autocast or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)))):
        # nothing to record (inference): the Function's forward without the Function
        return _down(be.forward(g.view(-1, g.shape[-1]), u.view(-1, u.shape[-1])), w, bias, g.shape)
    if not autocast:
        return _SwiGLUDownFunction.apply(g, u, w, bias, be)
    with torch.autocast(gate.device.type, enabled=False):
        return _SwiGLUDownFunction.apply(g, u, w, bias, be)


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6, *, backend: str | None = None):
    """``s = x + residual; (rms_norm(s) · weight, s)`` in one pass (the decoder layer's residual add and
    the norm after it): :func:`mmfast.ops.norm.rms_norm` with ``residual=``."""
    from mmfast.ops.norm import rms_norm

    return rms_norm(x, weight, eps, residual, backend=backend)


__all__ = [
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "rotary_embedding",
    "rotary_embedding_reference",
    "swiglu",
    "swiglu_down",
    "swiglu_down_reference",
    "swiglu_reference",
]
