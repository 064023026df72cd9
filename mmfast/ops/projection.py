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

Backends (contract: :mod:`mmfast.ops._dispatch`; default order = registration order below):
``triton`` (CUDA), ``triton_interpret`` (the same kernels under Triton's interpreter; both in
:mod:`mmfast.ops.backends.projection_triton`, whose docstring gives the explicit forward/backward
signatures), ``torch`` (the plain composition, :mod:`mmfast.ops.backends.projection_torch`; autograd runs
the backward) and ``reference`` (plain PyTorch, any device: for the FLCE this is the same chunked algorithm
with the row pass in PyTorch, so the CPU path never holds the (T × V) logits either; for the projector and
the L2 head the composition, as the oracle). ``AUTOGRAD`` backends take the public call's arguments.
For the FLCE the chunked driver and its autograd glue are :mod:`mmfast.ops._flce`; a backend there is
the row pass (``ce_rows``), which computes the loss and the logits' gradient in one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import (
    AUTOGRAD,
    Backend,
    Facts,
    KernelBackend,
    Op,
    check_backend_name,
    register,
)
from mmfast.ops._flce import (
    DEFAULT_CHUNK_BYTES,
    FLCEFunction,
    chunk_rows,
    count_targets,
    fused_linear_cross_entropy_reference,
)
from mmfast.ops._host import autocast_inputs

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GELU_APPROX = {"gelu": False, "gelu_new": True, "gelu_tanh": True, "gelu_pytorch_tanh": True}


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32)


_TRI = "mmfast.ops.backends.projection_triton"
_TORCH = "mmfast.ops.backends.projection_torch"
FLCE_OP = register(Op("fused_linear_cross_entropy", example=_example))
FLCE_OP.add("triton", f"{_TRI}:FLCE_TRITON")
FLCE_OP.add("triton_interpret", f"{_TRI}:FLCE_INTERPRET")
FLCE_OP.add("reference", KernelBackend("mmfast.ops._flce", "ce_rows_torch", "ce_rows_torch", devices=None,
                                       doc="chunked plain PyTorch (the CPU path; never holds the T×V logits)"))
FLCE_OP.add("torch", f"{_TORCH}:FLCE")
_CPU_ORDER = {"cpu": ("triton_interpret", "reference")}  # CPU results stay the reference's
MLP_OP = register(Op("mlp_projector", example=_example, device_order=_CPU_ORDER))
MLP_OP.add("triton", f"{_TRI}:MLP_TRITON")
MLP_OP.add("triton_interpret", f"{_TRI}:MLP_INTERPRET")
MLP_OP.add("torch", f"{_TORCH}:MLP")
MLP_OP.add("reference", Backend(devices=None, forward=lambda x, params, act="gelu": mlp_projector_reference(x, params, act),
                                doc="nn.functional Linear/GELU chain"))
L2_OP = register(Op("linear_l2_normalize", example=_example, device_order=_CPU_ORDER))
L2_OP.add("triton", f"{_TRI}:L2_TRITON")
L2_OP.add("triton_interpret", f"{_TRI}:L2_INTERPRET")
L2_OP.add("torch", f"{_TORCH}:L2")
L2_OP.add("reference", Backend(devices=None, forward=lambda x, w, b=None, eps=1e-6: linear_l2_normalize_reference(x, w, b, eps),
                               doc="F.normalize(F.linear(...))"))


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
    the rows per chunk (default: as many as fit 64 MiB of logits, or ``MMFAST_FLCE_CHUNK_MB`` MiB when
    set; on CUDA all rows when the whole (T, V) logits fit 256 MiB).
    ``dweight_fp32`` (default): with several chunks of a bf16/fp16 weight, the weight gradient is
    summed over all tokens in fp32 and rounded once, by vocabulary blocks (one more logits GEMM, no
    (V, H) fp32 buffer; see :mod:`mmfast.ops._flce`); False accumulates the chunks in the weight's
    dtype (one rounding per chunk, no extra GEMM).
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
    t = target.reshape(-1)  # (T,)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    t = t.contiguous()
    # eager: the range check and the mean's count in one reduction and one host read (None: counted on
    # the device inside the Function, as under torch.compile, where no host read may happen)
    n_valid = None if torch.compiler.is_compiling() or not t.numel() else count_targets(t, V, ignore_index)
    dev = hidden.device.type
    # the choice is memoised on (device type, dtype): a repeated call is a dictionary lookup
    be = FLCE_OP.choose(backend, (dev, hidden.dtype), lambda: Facts.of([hidden], row_width=None))
    if be.backward is AUTOGRAD:  # AUTOGRAD: the plain composition
        return be.forward(hidden, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction=reduction, z_loss=z_loss, softcap=softcap)
    chunk = int(chunk_size) if chunk_size else chunk_rows(t.shape[0], V, hidden.element_size(), device=dev)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # hidden goes in as the caller's (..., H): flattened to (T, H) inside the Function (no view node)
    args = (hidden, weight.contiguous(), bias, t, int(ignore_index), float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), reduction, chunk, be.name, bool(dweight_fp32), n_valid)
    if torch.is_autocast_enabled(dev):  # the GEMMs inside run in the inputs' dtype (cast above)
        with torch.autocast(dev, enabled=False):
            out = FLCEFunction.apply(*args)
    else:
        out = FLCEFunction.apply(*args)
    return out.reshape(target.shape) if reduction == "none" else out


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
    """The explicit-backward backends' glue (see :mod:`mmfast.ops.backends.projection_triton`)."""

    @staticmethod
    def forward(ctx, be, approx, recompute, x, *params):
        ws, bs = params[0::2], params[1::2]
        out, saved = be.forward(x, ws, bs, approx, recompute)
        ctx.save_for_backward(*saved)
        ctx.cfg = (be, approx, recompute, tuple(b is not None for b in bs))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        be, approx, recompute, has_b = ctx.cfg
        needs = ctx.needs_input_grad[3:]
        dx, grads = be.backward(ctx.saved_tensors, g, approx, recompute, has_b, needs)
        return (None, None, None, dx, *grads)


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
    be = MLP_OP.backend(_select(MLP_OP, x, backend))
    if be.backward is AUTOGRAD or len(params) == 1:  # AUTOGRAD backends; one layer is one F.linear
        return (be.forward if be.backward is AUTOGRAD else mlp_projector_reference)(x, params, act)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    flat = [t.contiguous() if t is not None else None for pair in params for t in pair]
    with torch.autocast(x.device.type, enabled=False):
        out = _MLPFunction.apply(be, approx, bool(recompute), x2, *flat)
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
    be = MLP_OP.backend(_select(MLP_OP, y, backend))
    grad = torch.is_grad_enabled() and (y.requires_grad or (bias is not None and bias.requires_grad))
    if not hasattr(be, "bias_gelu") or grad:
        u = y if bias is None else y + bias
        return F.gelu(u, approximate="tanh" if approx else "none")
    y2 = y.reshape(-1, y.shape[-1]).contiguous()
    return be.bias_gelu(y2, bias, approx).reshape(y.shape)


# --------------------------------------------------------------------------- linear + L2 normalise
def linear_l2_normalize_reference(x, weight, bias=None, eps=1e-6):
    return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)


class _LinearL2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, be, x, weight, bias, eps):
        out, saved = be.forward(x, weight, bias, eps)
        ctx.save_for_backward(*saved)
        ctx.cfg = (be, eps, bias is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        be, eps, has_bias = ctx.cfg
        need = ctx.needs_input_grad
        dx, dw, db = be.backward(ctx.saved_tensors, g, eps, (need[1], need[2], has_bias and need[3]))
        return None, dx, dw, db, None


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
    be = L2_OP.backend(_select(L2_OP, x, backend, row_width=weight.shape[0]))
    if be.backward is AUTOGRAD:  # AUTOGRAD backends
        return be.forward(x, weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        out = _LinearL2Function.apply(be, x2, weight.contiguous(), bias, float(eps))
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
