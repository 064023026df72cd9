"""LayerNorm / RMSNorm with PyTorch's native ops (``F.layer_norm``, ``F.rms_norm``); autograd runs their
backward. Forward = the public call (see :mod:`mmfast.ops.norm`)::

    LAYER.forward(x, weight, bias, eps, residual) -> y, or (y, x + residual) with a residual
    RMS.forward(x, weight, eps, residual)         -> the same

The residual add is one more elementwise op (not fused); ``F.rms_norm`` computes its statistics in fp32
for low-precision inputs, as LLaMA's RMSNorm does.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmfast.ops._dispatch import AUTOGRAD, Backend
from mmfast.ops.norm import _add_residual
from mmfast.ops.norm import layer_norm_reference as layer_norm  # the reference is F.layer_norm already


def rms_norm(x, weight=None, eps=1e-6, residual=None):
    s = x if residual is None else _add_residual(x, residual)
    xs = s.to(x.dtype)
    if weight is not None and weight.dtype != x.dtype:
        # F.rms_norm wants one dtype; weight applied in fp32 then rounded, as the reference does.
        y = (F.rms_norm(xs.float(), (x.shape[-1],), None, eps) * weight.float()).to(x.dtype)
    else:
        y = F.rms_norm(xs, (x.shape[-1],), weight, eps)
    return y if residual is None else (y, s)


LAYER = Backend(forward=layer_norm, backward=AUTOGRAD, doc="F.layer_norm (native kernel)")
RMS = Backend(forward=rms_norm, backward=AUTOGRAD, doc="F.rms_norm (native kernel)")
