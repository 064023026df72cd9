"""Benchmark mmfast flash attention against SDPA (flash / efficient / cuDNN), FlexAttention and flash-attn.

Same as ``mmfast bench attention``; see ``python benchmarks/bench_attention.py --help``.
"""
import sys

from mmfast.bench.attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
