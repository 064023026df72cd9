"""The projection ops through the Triton kernels of :mod:`mmfast.ops._projection_triton`.

The kernel launchers sit behind ``torch.library`` custom ops (opaque to torch.compile; each declares the
buffer it overwrites in place). Contracts (explicit backward; see :mod:`mmfast.ops.projection`):

MLP projector (``MLP_TRITON``/``MLP_INTERPRET``)::

    forward(x (M, K), ws, bs, approx, recompute) -> (out (M, N_last), saved: tuple of tensors)
    backward(saved, g (M, N_last), approx, recompute, has_bias, needs) -> (dx, [dW0, db0, dW1, db1, ...])
    bias_gelu(y (M, N), bias | None, approx) -> gelu(y + bias)            (forward only)

Linear + L2 normalise (``L2_TRITON``/``L2_INTERPRET``)::

    forward(x (M, K), weight (D, K), bias | None, eps) -> (out (M, D), saved)
    backward(saved, g, eps, needs) -> (dx, dweight, dbias)

FLCE (``FLCE_TRITON``/``FLCE_INTERPRET``): the row pass ``ce_rows`` of :mod:`mmfast.ops._flce` (loss, lse
and, in place, the logits' gradient: forward and backward in one pass over a chunk's logits).
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import Backend, Facts, KernelBackend
from mmfast.ops._host import eager_fast

MAX_ROW = 65536


# --------------------------------------------------------------------------- custom ops (kernel launchers)
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


bias_gelu_call = eager_fast(_bias_gelu_op)
gelu_bwd_call = eager_fast(_gelu_bwd_op)
bias_l2_call = eager_fast(_bias_l2_op)
l2_bwd_call = eager_fast(_l2_bwd_op)


# --------------------------------------------------------------------------- MLP projector
def mlp_forward(x, ws, bs, approx, recompute):
    """Per hidden layer ``y = a Wᵀ`` then one pass ``u = y + b, h = gelu(u)`` (u kept, h kept unless
    recomputing); the last layer is ``addmm``. Returns (out, saved = (x, *ws, *us, *hs))."""
    a = x  # (M, K)
    us, hs = [], []
    for w, b in zip(ws[:-1], bs[:-1]):
        y = torch.mm(a, w.t())  # (M, N); becomes u in place
        a = bias_gelu_call(y, b, approx, True)
        us.append(y)
        hs.append(None if recompute else a)
    out = torch.mm(a, ws[-1].t()) if bs[-1] is None else torch.addmm(bs[-1], a, ws[-1].t())
    return out, (x, *ws, *us, *[h for h in hs if h is not None])


def mlp_backward(saved, g, approx, recompute, has_b, needs):
    """Per layer from the top: ``dW = gᵀ a``, ``db = Σ_rows g``, ``dh = g W``, one pass ``du = dh · gelu'(u)``
    in place over dh. When recomputing, ``a = h = gelu(u)`` is rebuilt for ``dW`` and freed before ``dh`` is
    allocated, so the two (rows × hidden) buffers never coexist. ``needs`` = (dx, dW0, db0, dW1, ...)."""
    n = len(has_b)
    x, ws, us = saved[0], saved[1:1 + n], saved[1 + n:2 * n]
    hs = list(saved[2 * n:]) if not recompute else [None] * (n - 1)
    dws, dbs = [None] * n, [None] * n
    g = g.contiguous()
    for i in range(n - 1, -1, -1):
        if needs[1 + 2 * i]:
            if i == 0:
                a = x
            elif recompute:
                a = bias_gelu_call(us[i - 1], None, approx, False)  # h = gelu(u), a new buffer
            else:
                a = hs[i - 1]
            dws[i] = torch.mm(g.t(), a)
            a = None  # a recomputed h is freed here, before dh exists
        if has_b[i] and needs[2 + 2 * i]:
            dbs[i] = g.sum(0)
        if i > 0:
            dh = torch.mm(g, ws[i])  # (M, N_{i-1}); becomes du in place
            gelu_bwd_call(us[i - 1], dh, approx, False)
        else:
            dh = torch.mm(g, ws[0]) if needs[0] else None
        g = dh
    return g, [v for pair in zip(dws, dbs) for v in pair]


class _Rows(Backend):
    def supports(self, facts: Facts):
        n = facts.get("row_width")
        if n is not None and n > MAX_ROW:
            return [f"row width {n} > {MAX_ROW} (one row per program)"]
        return []


class TritonMLP(_Rows):
    doc = "cuBLAS GEMMs + one Triton pass for bias+GELU (pre-activation kept for the backward)"
    forward = staticmethod(mlp_forward)
    backward = staticmethod(mlp_backward)

    @staticmethod
    def bias_gelu(y, bias, approx):
        return bias_gelu_call(y, bias, approx, False)  # store_u=False: y is only read


# --------------------------------------------------------------------------- linear + L2 normalise
def l2_forward(x, weight, bias, eps):
    y = torch.mm(x, weight.t())  # (M, D)
    out, rnorm = bias_l2_call(y, bias, eps)
    return out, (x, weight, out, rnorm)


def l2_backward(saved, g, eps, needs):
    x, weight, out, rnorm = saved
    dy = g.contiguous().clone()  # (M, D); becomes the gradient w.r.t. y in place
    l2_bwd_call(out, dy, rnorm, eps)
    dx = torch.mm(dy, weight) if needs[0] else None
    dw = torch.mm(dy.t(), x) if needs[1] else None
    db = dy.sum(0) if needs[2] else None
    return dx, dw, db


class TritonL2(_Rows):
    doc = "cuBLAS GEMM + one Triton row pass for bias + L2 normalisation"
    forward = staticmethod(l2_forward)
    backward = staticmethod(l2_backward)


MLP_TRITON = TritonMLP(devices=("cuda",), needs=("triton",))
MLP_INTERPRET = TritonMLP(devices=("cpu",), needs=("triton_interpret",))
L2_TRITON = TritonL2(devices=("cuda",), needs=("triton",))
L2_INTERPRET = TritonL2(devices=("cpu",), needs=("triton_interpret",))
_ROWS = "mmfast.ops._projection_triton"
FLCE_TRITON = KernelBackend(_ROWS, "ce_rows", "ce_rows", devices=("cuda",), needs=("triton",),
                            doc="chunked cuBLAS GEMMs + a Triton row pass (loss and dlogits in one pass)")
FLCE_INTERPRET = KernelBackend(_ROWS, "ce_rows", "ce_rows", devices=("cpu",), needs=("triton_interpret",),
                               doc="the same under Triton's interpreter")
