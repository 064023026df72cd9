"""``cpp`` backend of the contrastive losses: thin wrappers over ``mmfast._C`` (csrc/contrastive.cpp).

The kernels are tiled like the GPU ones (row blocks over OpenMP threads, GEMM tiles of the logits,
online log-sum-exp), so memory stays O((M + K)·d) whatever the batch. Importing this module raises
ImportError when the extension is missing or was built without the contrastive kernels; the
dispatcher reports that as the reason the ``cpp`` backend is unavailable. The contract (shapes,
sums not means) is in :mod:`mmfast.ops.contrastive`.
"""

from __future__ import annotations

import torch

from mmfast.ops._dispatch import cpp_extension

_C = cpp_extension()
if not hasattr(_C, "contrastive_clip_fwd"):
    raise ImportError("mmfast._C has no contrastive kernels; rebuild it: python setup.py build_ext --inplace")


def clip_fwd(
    a: torch.Tensor, b: torch.Tensor, scale, bias, label_smoothing: float, offset: int, symmetric: bool
):
    """-> (loss_sum fp32 0-d, lse_row fp64 (M,), lse_col fp64 (K,) or None)."""
    return _C.contrastive_clip_fwd(
        a.contiguous(), b.contiguous(), scale, bias, float(label_smoothing), int(offset), bool(symmetric)
    )


def clip_bwd(a, b, scale, bias, label_smoothing, offset, symmetric, lse_row, lse_col, grad):
    """-> (da, db, dscale, dbias or None); ``grad`` is d(total)/d(loss_sum)."""
    return _C.contrastive_clip_bwd(
        a.contiguous(),
        b.contiguous(),
        scale,
        bias,
        float(label_smoothing),
        int(offset),
        bool(symmetric),
        lse_row.contiguous(),
        None if lse_col is None else lse_col.contiguous(),
        grad,
    )


def siglip_fwd(a, b, scale, bias, offset: int) -> torch.Tensor:
    """-> Σ_ij softplus(−y_ij z_ij) as an fp32 0-d tensor."""
    return _C.contrastive_siglip_fwd(a.contiguous(), b.contiguous(), scale, bias, int(offset))


def siglip_bwd(a, b, scale, bias, offset: int, grad):
    """-> (da, db, dscale, dbias)."""
    return _C.contrastive_siglip_bwd(a.contiguous(), b.contiguous(), scale, bias, int(offset), grad)
