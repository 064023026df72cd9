"""Benchmark the fused projection ops (linear + cross-entropy, MLP projector, LayerNorm) against
torch eager / torch.compile / Liger-Kernel.

Same as ``mmfast bench projection``; see ``python benchmarks/bench_projection.py --help``.
"""
import sys

from mmfast.bench.projection import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
