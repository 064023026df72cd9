"""Benchmark the fused CLIP loss against torch eager / torch.compile / open_clip / inf_cl.

Same as ``mmfast bench contrastive``; see ``python benchmarks/bench_contrastive.py --help``.
"""
import sys

from mmfast.bench.contrastive import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
