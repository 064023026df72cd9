"""The projection ops as their plain PyTorch composition (``torch`` backends; autograd runs the backward).
Forward = the public call (see :mod:`mmfast.ops.projection`)::

    FLCE.forward(hidden, weight, target, bias, ignore_index=, label_smoothing=, reduction=, z_loss=, softcap=)
        F.linear + F.cross_entropy over the full (T, V) logits (fast for small vocabularies; T·V memory)
    MLP.forward(x, params, act)            F.linear / F.gelu chain
    L2.forward(x, weight, bias, eps)       F.normalize(F.linear(...))
"""
from __future__ import annotations

import torch.nn.functional as F

from mmfast.ops._dispatch import AUTOGRAD, Backend
from mmfast.ops._flce import fused_linear_cross_entropy_reference

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_tanh": "tanh", "gelu_pytorch_tanh": "tanh"}


def mlp(x, params, act="gelu"):
    for i, (w, b) in enumerate(params):
        x = F.linear(x, w, b)
        if i < len(params) - 1:
            x = F.gelu(x, approximate=_GELU[act])
    return x


def linear_l2(x, weight, bias=None, eps=1e-6):
    return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)


FLCE = Backend(forward=fused_linear_cross_entropy_reference, backward=AUTOGRAD,
               doc="F.linear + F.cross_entropy (materialises the T×V logits)")
MLP = Backend(forward=mlp, backward=AUTOGRAD, doc="F.linear / F.gelu chain")
L2 = Backend(forward=linear_l2, backward=AUTOGRAD, doc="F.normalize(F.linear(...))")
