"""LayerNorm backward tile sweep (GPU): fwd+bwd time of mmfast's Triton LayerNorm for a few
backward tile sizes and warp caps, beside torch, at the issue's shape (36,928 × 1024, bf16).

    python benchmarks/sweep_norm_bwd.py [--out results.csv]

Prints one line per setting and writes them as CSV; the library's defaults are
``mmfast.ops._norm_triton._TILE`` and ``_BWD_MAX_WARPS``.
"""
from __future__ import annotations

import argparse
import csv
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--rows", type=int, default=36928)
    p.add_argument("--cols", type=int, default=1024)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_norm_bwd: needs CUDA", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    import mmfast.ops._norm_triton as NT
    from mmfast.ops.norm import layer_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(a.rows, a.cols, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(a.cols, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    b = torch.randn(a.cols, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dy = torch.randn(a.rows, a.cols, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(fn):
        def step():
            return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
        ref = torch.autograd.grad(torch.nn.functional.layer_norm(x.float(), (a.cols,), w.float(), b.float(), 1e-5),
                                  (x, w, b), dy.float())
        got = step()
        err = max(((g_ - r).abs().max() / r.abs().max()).item() for g_, r in zip(got, ref))
        return do_bench(step, return_mode="median"), err

    from mmfast.ops._flce import _addmm_fp32_supported

    print("flce: torch.addmm(out_dtype=float32) usable for the fp32 dW sum:", _addmm_fp32_supported(x.device))
    rows = []
    ms, err = run(lambda x, w, b: torch.nn.functional.layer_norm(x, (a.cols,), w, b, 1e-5))
    rows.append({"provider": "torch-eager", "tile": "", "max_warps": "", "ms": ms, "rel_err": err})
    for tile in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            NT._TILE, NT._BWD_MAX_WARPS = tile, warps
            ms, err = run(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"))
            rows.append({"provider": "mmfast-triton", "tile": tile, "max_warps": warps, "ms": ms, "rel_err": err})
    gbytes = 5 * a.rows * a.cols * 2 / 1e9
    for r in rows:
        r["gbps"] = gbytes / (r["ms"] * 1e-3)
        print(f"{r['provider']:<14} tile {r['tile']!s:>5} warps<={r['max_warps']!s:>2}  "
              f"{r['ms']:.4f} ms  {r['gbps']:7.1f} GB/s  rel.err {r['rel_err']:.1e}")
    if a.out:
        with open(a.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
