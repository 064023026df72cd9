"""Triton device helpers shared by the op families' kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowp(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Round fp32 ``x`` to ``dtype``. The interpreter converts fp32 to bf16 by truncation (GPUs round to
    nearest even), so under UPCAST (the interpreter with bf16 data) the rounding is done on the bits and
    the result stays fp32, holding a bf16 value exactly."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
