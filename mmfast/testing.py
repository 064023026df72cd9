"""Helpers for error-bound tests (used by tests/ and the GPU suite).

The rule: a kernel's error against a high-precision reference may be at most ``factor`` times
PyTorch's own error when it computes the same function in the kernel's dtype, plus a small ``atol``
for values that PyTorch happens to compute exactly.
"""
from __future__ import annotations

import torch


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN (or the dtype's max for ints) before a kernel writes it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_error_bound(
    out: torch.Tensor,
    ref: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """Require ``max|out - ref| <= factor * max|torch_lowp - ref| + atol``.

    ``ref`` is computed in fp64 (or fp32), ``torch_lowp`` by PyTorch in the kernel's dtype.
    ``atol`` defaults to a few ulps of the reference's magnitude in the output dtype.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output or overflow)"
    if atol is None:
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        atol = 4 * eps * max(scale, 1e-3)
    err = max_err(out, ref)
    bound = factor * max_err(torch_lowp, ref) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch lowp error x{factor} + {atol:.1e})"
