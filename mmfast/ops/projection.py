"""Projection ops: fused linear cross-entropy (the LM head), the MLP projector (LLaVA's mm_projector)
and CLIP's linear + L2-normalise head.

* ``fused_linear_cross_entropy`` — see :mod:`mmfast.ops._flce` for the math and the chunking.
* ``mlp_projector``  — ``Linear → GELU → Linear (→ GELU → Linear …)``; the bias + GELU after each
  hidden GEMM is one Triton pass that also keeps the pre-activation ``u`` for the backward. With
  ``recompute=True`` the activation ``h = gelu(u)`` is not stored: the backward re-emits it from
  ``u`` in the same pass that computes ``du = dh · gelu'(u)``.
* ``linear_l2_normalize`` — ``o = y / max(‖y‖, eps)``, ``y = x Wᵀ + b``; bias and normalisation are
  one row pass after the GEMM, and the backward ``dy = (g − o (g·o)) / ‖y‖`` one row pass before
  the two gradient GEMMs.

Backends: ``triton`` (CUDA), ``triton_interpret`` (the same kernels under Triton's interpreter) and
``reference`` (plain PyTorch, any device: for the FLCE this is the same chunked algorithm with the
row pass in PyTorch, so the CPU path never holds the (T × V) logits either). No ``cpp`` backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import Facts, Op, autocast_inputs, check_backend_name, eager_fast, register
from mmfast.ops._flce import (
    DEFAULT_CHUNK_BYTES,
    FLCEFunction,
    chunk_rows,
    fused_linear_cross_entropy_reference,
)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GELU_APPROX = {"gelu": False, "gelu_new": True, "gelu_tanh": True, "gelu_pytorch_tanh": True}


def _supports(backend: str, facts: Facts) -> list[str]:
    reasons = []
    if facts.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {facts.dtype} is not one of float32/float16/bfloat16")
    if backend in ("triton", "triton_interpret"):
        try:
            import mmfast.ops._projection_triton  # noqa: F401
        except ImportError as e:
            reasons.append(f"kernel module failed to import ({e})")
        n = facts.extra.get("row_width")
        if n is not None and n > 65536:
            reasons.append(f"row width {n} > 65536 (one row per program)")
    return reasons


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32)


_TRITON = "mmfast.ops._projection_triton"
FLCE_OP = register(Op(
    "fused_linear_cross_entropy",
    impls={"triton": _TRITON, "triton_interpret": _TRITON,
           "reference": "chunked plain PyTorch (the CPU path; never holds the T×V logits)"},
    supports=_supports, example=_example,
))
MLP_OP = register(Op(
    "mlp_projector",
    impls={"triton": _TRITON, "triton_interpret": _TRITON, "reference": "nn.functional Linear/GELU chain"},
    supports=_supports, example=_example,
))
L2_OP = register(Op(
    "linear_l2_normalize",
    impls={"triton": _TRITON, "triton_interpret": _TRITON, "reference": "F.normalize(F.linear(...))"},
    supports=_supports, example=_example,
))


def _select(op: Op, t: torch.Tensor, backend: str | None, **extra) -> str:
    check_backend_name(backend)
    return op.select(Facts.of([t], **extra), backend)


def _check_float(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input is {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


# --------------------------------------------------------------------------- fused linear cross-entropy
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    dweight_fp32: bool = True,
):
    """``cross_entropy(softcap(hidden @ weightᵀ + bias), target) + z_loss · lse²`` without the logits.

    hidden (..., H), weight (V, H), target (...) int64, bias (V,). ``reduction="mean"`` averages over
    rows whose target is not ``ignore_index`` (0, not NaN, when there are none); the z-loss term
    ``z_loss · lse²`` is added per non-ignored row before the reduction. ``chunk_size`` overrides
    the rows per chunk (default: as many as fit 256 MiB of logits on CUDA, 64 MiB elsewhere, or
    ``MMFAST_FLCE_CHUNK_MB`` MiB when set).
    ``dweight_fp32`` (default) sums the chunks' weight gradients in an fp32 (V, H) buffer; False
    accumulates in the weight's dtype instead (one rounding per chunk, no V×H×4-byte buffer).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    _check_float("hidden", hidden)
    _check_float("weight", weight, hidden)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[-1]}), got {tuple(weight.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} != hidden's leading shape {tuple(hidden.shape[:-1])}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    V = weight.shape[0]
    if bias is not None:
        _check_float("bias", bias, hidden)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be (V={V},), got {tuple(bias.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (T, H)
    t = target.reshape(-1).to(torch.int64).contiguous()  # (T,)
    if not torch.compiler.is_compiling() and t.numel():
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            raise ValueError(f"target has class indices outside [0, {V}) that are not ignore_index={ignore_index}, "
                             f"e.g. {int(t[bad][0])}")
    chosen = _select(FLCE_OP, hidden, backend, row_width=None)
    chunk = int(chunk_size) if chunk_size else chunk_rows(h.shape[0], V, h.element_size(), device=h.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.autocast(hidden.device.type, enabled=False):
        out = FLCEFunction.apply(
            h, weight.contiguous(), bias, t, int(ignore_index), float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), reduction, chunk, chosen, bool(dweight_fp32),
        )
    return out.reshape(target.shape) if reduction == "none" else out


# --------------------------------------------------------------------------- custom ops (kernel launchers)
# Opaque to torch.compile; each declares the buffer it overwrites in place.
@torch.library.custom_op("mmfast::bias_gelu_fwd", mutates_args=("y",))
def _bias_gelu_op(y: torch.Tensor, bias: torch.Tensor | None, approximate: bool, store_u: bool) -> torch.Tensor:
    from mmfast.ops._projection_triton import bias_gelu_fwd

    return bias_gelu_fwd(y, bias, approximate, store_u)


@_bias_gelu_op.register_fake
def _(y, bias, approximate, store_u):
    return torch.empty_like(y)


@torch.library.custom_op("mmfast::gelu_bwd", mutates_args=("dh",))
def _gelu_bwd_op(u: torch.Tensor, dh: torch.Tensor, approximate: bool, recompute_h: bool) -> torch.Tensor:
    from mmfast.ops._projection_triton import gelu_bwd

    h = gelu_bwd(u, dh, approximate, recompute_h)
    return h if h is not None else u.new_empty(0)


@_gelu_bwd_op.register_fake
def _(u, dh, approximate, recompute_h):
    return torch.empty_like(u) if recompute_h else u.new_empty(0)


@torch.library.custom_op("mmfast::bias_l2_fwd", mutates_args=())
def _bias_l2_op(y: torch.Tensor, bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from mmfast.ops._projection_triton import bias_l2_fwd

    return bias_l2_fwd(y, bias, eps)


@_bias_l2_op.register_fake
def _(y, bias, eps):
    return torch.empty_like(y), y.new_empty(y.shape[0], dtype=torch.float32)


@torch.library.custom_op("mmfast::l2_bwd", mutates_args=("dout",))
def _l2_bwd_op(out: torch.Tensor, dout: torch.Tensor, rnorm: torch.Tensor, eps: float) -> None:
    from mmfast.ops._projection_triton import l2_bwd

    l2_bwd(out, dout, rnorm, eps)


@_l2_bwd_op.register_fake
def _(out, dout, rnorm, eps):
    return None


_bias_gelu_call = eager_fast(_bias_gelu_op)
_gelu_bwd_call = eager_fast(_gelu_bwd_op)
_bias_l2_call = eager_fast(_bias_l2_op)
_l2_bwd_call = eager_fast(_l2_bwd_op)


# --------------------------------------------------------------------------- MLP projector
def _gelu_approx(act: str) -> bool:
    if act not in _GELU_APPROX:
        raise ValueError(f"act must be one of {sorted(_GELU_APPROX)}, got {act!r}")
    return _GELU_APPROX[act]


def mlp_projector_reference(x, params, act="gelu"):
    """``Linear → GELU → Linear …`` with ``params = [(W0, b0), (W1, b1), ...]``, in PyTorch."""
    approx = "tanh" if _gelu_approx(act) else "none"
    for i, (w, b) in enumerate(params):
        x = F.linear(x, w, b)
        if i < len(params) - 1:
            x = F.gelu(x, approximate=approx)
    return x


class _MLPFunction(torch.autograd.Function):
    """Forward: per hidden layer ``y = a Wᵀ`` then one pass ``u = y + b, h = gelu(u)`` (u kept); the last
    layer is ``addmm``. Backward, per layer from the top: ``dW = gᵀ a``, ``db = Σ_rows g``, ``dh = g W``,
    one pass ``du = dh · gelu'(u)`` in place over dh. When recomputing, ``a = h = gelu(u)`` is rebuilt
    for ``dW`` and freed before ``dh`` is allocated, so the two (rows × hidden) buffers never coexist:
    the backward peaks at two of them (u and h, then u and dh) instead of three."""

    @staticmethod
    def forward(ctx, x, approx, recompute, *params):
        ws, bs = params[0::2], params[1::2]
        a = x  # (M, K)
        us, hs = [], []
        for w, b in zip(ws[:-1], bs[:-1]):
            y = torch.mm(a, w.t())  # (M, N); becomes u in place
            a = _bias_gelu_call(y, b, approx, True)
            us.append(y)
            hs.append(None if recompute else a)
        out = torch.mm(a, ws[-1].t()) if bs[-1] is None else torch.addmm(bs[-1], a, ws[-1].t())
        ctx.save_for_backward(x, *ws, *us, *[h for h in hs if h is not None])
        ctx.cfg = (approx, recompute, len(ws), tuple(b is not None for b in bs))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        approx, recompute, n, has_b = ctx.cfg
        saved = ctx.saved_tensors
        x, ws, us = saved[0], saved[1:1 + n], saved[1 + n:2 * n]
        hs = list(saved[2 * n:]) if not recompute else [None] * (n - 1)
        needs = ctx.needs_input_grad[3:]
        dws, dbs = [None] * n, [None] * n
        g = g.contiguous()
        for i in range(n - 1, -1, -1):
            if needs[2 * i]:
                if i == 0:
                    a = x
                elif recompute:
                    a = _bias_gelu_call(us[i - 1], None, approx, False)  # h = gelu(u), a new buffer
                else:
                    a = hs[i - 1]
                dws[i] = torch.mm(g.t(), a)
                a = None  # a recomputed h is freed here, before dh exists
            if has_b[i] and needs[2 * i + 1]:
                dbs[i] = g.sum(0)
            if i > 0:
                dh = torch.mm(g, ws[i])  # (M, N_{i-1}); becomes du in place
                _gelu_bwd_call(us[i - 1], dh, approx, False)
            else:
                dh = torch.mm(g, ws[0]) if ctx.needs_input_grad[0] else None
            g = dh
        grads = [v for pair in zip(dws, dbs) for v in pair]
        return (g, None, None, *grads)


def mlp_projector(x: torch.Tensor, params, act: str = "gelu", *, recompute: bool = False, backend: str | None = None):
    """``Linear → GELU → Linear (→ GELU → Linear …)`` over the last dim of ``x``.

    ``params``: a list of ``(weight (N_i, K_i), bias (N_i,) or None)``; ``act``: "gelu" (erf) or
    "gelu_tanh"/"gelu_pytorch_tanh"/"gelu_new" (tanh form). ``recompute=True`` stores only the
    pre-activations and recomputes the activations in the backward.
    """
    approx = _gelu_approx(act)
    params = [(w, b) for w, b in params]
    if params:
        flat = autocast_inputs(x, *[t for pair in params for t in pair])
        x, params = flat[0], list(zip(flat[1::2], flat[2::2]))
    _check_float("x", x)
    if not params:
        raise ValueError("params must hold at least one (weight, bias) pair")
    k = x.shape[-1]
    for i, (w, b) in enumerate(params):
        _check_float(f"params[{i}].weight", w, x)
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"params[{i}].weight must be (N, {k}), got {tuple(w.shape)}")
        if b is not None:
            _check_float(f"params[{i}].bias", b, x)
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"params[{i}].bias must be ({w.shape[0]},), got {tuple(b.shape)}")
        k = w.shape[0]
    chosen = _select(MLP_OP, x, backend)
    if chosen == "reference" or len(params) == 1:
        return mlp_projector_reference(x, params, act)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    flat = [t.contiguous() if t is not None else None for pair in params for t in pair]
    with torch.autocast(x.device.type, enabled=False):
        out = _MLPFunction.apply(x2, approx, bool(recompute), *flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def bias_gelu(y: torch.Tensor, bias: torch.Tensor | None = None, act: str = "gelu", *, backend: str | None = None):
    """``gelu(y + bias)`` in one pass (forward only on the kernel path; differentiable via the reference
    elsewhere). Mainly a building block; :func:`mlp_projector` is the differentiable fused entry."""
    approx = _gelu_approx(act)
    _check_float("y", y)
    if bias is not None:
        _check_float("bias", bias, y)
        if tuple(bias.shape) != (y.shape[-1],):
            raise ValueError(f"bias must be ({y.shape[-1]},), got {tuple(bias.shape)}")
    chosen = _select(MLP_OP, y, backend)
    grad = torch.is_grad_enabled() and (y.requires_grad or (bias is not None and bias.requires_grad))
    if chosen == "reference" or grad:
        u = y if bias is None else y + bias
        return F.gelu(u, approximate="tanh" if approx else "none")
    y2 = y.reshape(-1, y.shape[-1]).contiguous()
    return _bias_gelu_call(y2, bias, approx, False).reshape(y.shape)  # store_u=False: y is only read


# --------------------------------------------------------------------------- linear + L2 normalise
def linear_l2_normalize_reference(x, weight, bias=None, eps=1e-6):
    return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)


class _LinearL2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y = torch.mm(x, weight.t())  # (M, D)
        out, rnorm = _bias_l2_call(y, bias, eps)
        ctx.save_for_backward(x, weight, out, rnorm)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, out, rnorm = ctx.saved_tensors
        dy = g.contiguous().clone()  # (M, D); becomes the gradient w.r.t. y in place
        _l2_bwd_call(out, dy, rnorm, ctx.eps)
        dx = torch.mm(dy, weight) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dy.t(), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear_l2_normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        eps: float = 1e-6, *, backend: str | None = None):
    """CLIP's projection head: ``y = x Wᵀ + b``, returned as ``y / max(‖y‖₂, eps)`` row-wise."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_float("x", x)
    _check_float("weight", weight, x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (D, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        _check_float("bias", bias, x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    chosen = _select(L2_OP, x, backend, row_width=weight.shape[0])
    if chosen == "reference":
        return linear_l2_normalize_reference(x, weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        out = _LinearL2Function.apply(x2, weight.contiguous(), bias, float(eps))
    return out.reshape(*x.shape[:-1], weight.shape[0])


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "bias_gelu",
    "chunk_rows",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "linear_l2_normalize",
    "linear_l2_normalize_reference",
    "mlp_projector",
    "mlp_projector_reference",
]
