"""The shared Triton helpers (mmfast/ops/_triton_util.py), run under the interpreter."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mmfast.ops._triton_util import lowp


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, lowp(tl.load(x_ptr + i), y_ptr.dtype.element_ty, UPCAST).to(y_ptr.dtype.element_ty))


def test_lowp_rounds_to_nearest_even_like_the_gpu():
    """Under the interpreter a plain fp32 -> bf16 conversion truncates (a bias of about -0.3 % on random
    data, which the contrastive and attention gradients inherited); lowp(UPCAST) gives torch's (and the
    GPU's) round-to-nearest-even bits, ties included."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's conversion is what this checks")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=g) * torch.logspace(-8, 8, 1024)
    bits = x.view(torch.int32)
    x[:256] = ((bits[:256] & ~0xFFFF) | 0x8000).view(torch.float32)  # exact ties between two bf16 values
    want = x.to(torch.bfloat16)
    y = torch.empty(1024, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, y, 1024, UPCAST=True)
    assert torch.equal(y, want)
