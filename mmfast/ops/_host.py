"""Host-side integer helpers for kernel launches.

Plain Python on purpose: recent Triton makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
functions whose every host call unwraps its arguments (several µs each), and a norm or a small
epilogue launch is only a few µs of GPU time.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, n - 1).bit_length()
