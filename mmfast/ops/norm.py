"""LayerNorm and RMSNorm, optionally fused with the residual add, forward and backward.

    s = x + residual          (when ``residual`` is given; returned as the new residual stream)
    LayerNorm: y = (s − mean(s)) / √(var(s) + eps) · w + b
    RMSNorm:   y = s / √(mean(s²) + eps) · w

The statistics are fp32 whatever the input dtype; ``y`` has ``x``'s dtype and the new residual has
``residual``'s dtype (keep the residual stream in fp32 by passing an fp32 residual).

Backend contract (see :mod:`mmfast.ops._dispatch`). Explicit-backward backends (``triton``,
``triton_interpret``: :mod:`mmfast.ops.backends.norm_triton`; ``cpp``, fp32 on CPU:
:mod:`mmfast.ops.backends.norm_cpp`) take contiguous rows, (..., N) in the
caller's shape (M = numel / N rows; outputs in the input's shape)::

    forward(x (..., N), residual (..., N) | None, weight | None, bias | None, eps, is_rms) -> (y, s, stats (2, M))
    backward(s, weight, dy, ds | None, stats, is_rms) -> (dx, dwb (2, N))

``s`` is the new residual (None or an empty tensor without one), ``stats`` the fp32 mean and rstd of the M rows,
``dwb`` the fp32 column sums dw (row 0) and db (row 1). ``AUTOGRAD`` backends
(``torch``: :mod:`mmfast.ops.backends.norm_torch`; ``reference``: below) take the public call:
``forward(x, weight, bias, eps, residual)`` (LayerNorm) / ``forward(x, weight, eps, residual)`` (RMSNorm).
Default order: triton, triton_interpret, cpp, torch, reference (CPU: triton_interpret, cpp, reference, torch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts, Op, check_backend_name, register
from mmfast.ops._host import once_differentiable

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32, {"n": 4096})


# --------------------------------------------------------------------------- reference
def _add_residual(x, residual):
    return (x.float() + residual.float()).to(residual.dtype)


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5, residual=None):
    s = x if residual is None else _add_residual(x, residual)
    y = F.layer_norm(s.to(x.dtype), (x.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


def rms_norm_reference(x, weight=None, eps=1e-6, residual=None):
    s = x if residual is None else _add_residual(x, residual)
    s32 = s.float()
    y = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


# --------------------------------------------------------------------------- backends
_TRITON = "mmfast.ops.backends.norm_triton"
_CPP = "mmfast.ops.backends.norm_cpp:CPP"
_CPU_ORDER = {"cpu": ("triton_interpret", "cpp", "reference")}


def _norm_op(name: str, torch_backend: str, reference) -> Op:
    """One norm op and its backends; LayerNorm and RMSNorm share every kernel (``is_rms`` picks the
    statistics) and differ only in their torch backend and reference."""
    op = register(Op(name, example=_example, device_order=_CPU_ORDER))
    op.add("triton", f"{_TRITON}:TRITON")
    op.add("triton_interpret", f"{_TRITON}:INTERPRET")
    op.add("cpp", _CPP)
    op.add("torch", f"mmfast.ops.backends.norm_torch:{torch_backend}")
    op.add("reference", Backend(devices=None, forward=reference, doc="plain PyTorch, statistics in fp32"))
    return op


LAYER_NORM_OP = _norm_op("layer_norm", "LAYER", layer_norm_reference)
RMS_NORM_OP = _norm_op("rms_norm", "RMS", rms_norm_reference)


def __getattr__(name):  # the custom-op launchers moved to the triton backend module
    if name in ("_norm_fwd_call", "_norm_bwd_call"):
        from mmfast.ops.backends import norm_triton

        return getattr(norm_triton, name[1:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _NormFunction(torch.autograd.Function):
    """x, residual: (..., N) in the caller's shape; returns y, or (y, s) with a residual (s: the new
    residual). The rows go to the backend as they are, (..., N) made contiguous here: no reshape before or
    after the Function, so no view nodes in the graph and the outputs are not views (they stay
    modifiable in place)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, backend):
        x = x.contiguous()
        if residual is not None:
            residual = residual.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        y, s, stats = backend.forward(x, residual, weight, None if bias is None else bias.contiguous(), eps, is_rms)
        ctx.save_for_backward(x if residual is None else s, weight, stats)
        ctx.cfg = (is_rms, residual is not None, None if residual is None else residual.dtype,
                   None if bias is None else bias.dtype)
        ctx.backend = backend
        if residual is None:
            return y
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds=None):
        s, weight, stats = ctx.saved_tensors
        is_rms, has_res, res_dtype, bias_dtype = ctx.cfg
        need = ctx.needs_input_grad
        ds = ds.contiguous() if (has_res and ds is not None) else None
        dx, dwb = ctx.backend.backward(s, weight, dy.contiguous(), ds, stats, is_rms)  # dwb (2, N) fp32
        dres = None
        if has_res and need[1]:
            dres = dx.to(res_dtype) if res_dtype != dx.dtype else dx.clone()
        dw = db = None
        if weight is not None and need[2]:
            dw, db = dwb.unbind(0)  # one call for both views
            dw = dw if weight.dtype == torch.float32 else dw.to(weight.dtype)
            if bias_dtype is not None and need[3]:
                db = db if bias_dtype == torch.float32 else db.to(bias_dtype)
            else:
                db = None
        elif bias_dtype is not None and need[3]:
            db = dwb[1] if bias_dtype == torch.float32 else dwb[1].to(bias_dtype)
        return (dx if need[0] else None), dres, dw, db, None, None, None


# --------------------------------------------------------------------------- public API
def _check(name, x, weight, bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    xd = x.device  # one device object for the comparisons below
    for pname, p, shape in (("weight", weight, (n,)), ("bias", bias, (n,)), ("residual", residual, x.shape)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.shape != shape:
            want = f"have x's shape {tuple(shape)}" if pname == "residual" else f"be a ({n},) tensor"
            raise ValueError(f"{name}: {pname} must {want}, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if p.device != xd:
            raise ValueError(f"{name}: {pname} is on {p.device} but x is on {x.device}")
        if p.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {pname} has dtype {p.dtype}; expected a floating dtype")


def _run(op, x, weight, bias, eps, residual, is_rms, backend):
    check_backend_name(backend)
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"{op.name}: eps must be > 0, got {eps}")
    n = x.shape[-1]
    # the choice is memoised on (device, dtype, N): a repeated call is a dictionary lookup
    be = op.choose(backend, (x.device, x.dtype, n), lambda: Facts.of([x], n=n))
    if be.backward is AUTOGRAD:  # AUTOGRAD: the backend's forward is the public call, differentiable
        return be.forward(x, weight, eps, residual) if is_rms else be.forward(x, weight, bias, eps, residual)
    if not (torch.is_grad_enabled() and _any_requires_grad(x, residual, weight, bias)):
        # nothing for autograd to record (inference): the backend's forward without the autograd.Function
        y, s, _ = be.forward(x.contiguous(), None if residual is None else residual.contiguous(),
                             None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
                             eps, is_rms)
        return y if residual is None else (y, s)
    return _NormFunction.apply(x, residual, weight, bias, eps, is_rms, be)


def _any_requires_grad(*ts):
    return any(t is not None and t.requires_grad for t in ts)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, residual=None, *, backend: str | None = None):
    """LayerNorm over the last dim; with ``residual`` returns ``(y, x + residual)``."""
    _check("layer_norm", x, weight, bias, residual)
    return _run(LAYER_NORM_OP, x, weight, bias, eps, residual, False, backend)


def rms_norm(x, weight=None, eps: float = 1e-6, residual=None, *, backend: str | None = None):
    """RMSNorm over the last dim (LLaMA's, statistics in fp32); with ``residual`` returns ``(y, x + residual)``."""
    _check("rms_norm", x, weight, None, residual)
    return _run(RMS_NORM_OP, x, weight, None, eps, residual, True, backend)


__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]
