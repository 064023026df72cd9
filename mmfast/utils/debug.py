"""Debug aids the kernels use at run time (not test code): ``poison_`` fills a fresh output buffer so
that a kernel that leaves part of it unwritten shows up as NaN (tests turn it on per kernel module)."""
from __future__ import annotations

import torch


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN (or the dtype's max for ints) before a kernel writes it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)
