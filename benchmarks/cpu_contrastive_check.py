"""CPU check of the fused contrastive loss (cpp backend) against PyTorch eager on the full logits.

Each provider runs in a fresh subprocess so that its peak memory (ru_maxrss after the first
fwd+bwd minus ru_maxrss once the inputs exist) is its own. Times are wall-clock fwd+bwd, median
of ``--reps`` runs after one warm-up, plus the process CPU seconds of the same runs (on a shared
machine wall time includes waiting for a core; CPU time does not). The real harness is
``mmfast bench`` (mmfast/bench/).

    .venv/bin/python benchmarks/cpu_contrastive_check.py --n 16384 --d 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROVIDERS = ("eager", "cpp", "reference")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from mmfast.ops import contrastive as C

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    a = F.normalize(torch.randn(args.n, args.d, generator=g), dim=-1).to(dtype).requires_grad_()
    b = F.normalize(torch.randn(args.n, args.d, generator=g), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    target = torch.arange(args.n)

    def eager():
        z = scale * (a @ b.t())  # (N, N)
        return (F.cross_entropy(z, target) + F.cross_entropy(z.t(), target)) / 2

    fns = {
        "eager": eager,
        "cpp": lambda: C.clip_loss(a, b, scale, backend="cpp"),
        "reference": lambda: C.clip_loss(a, b, scale, backend="reference"),
    }
    fn = fns[args.provider]
    base = _rss_mib()
    times, cpu = [], []
    for _ in range(args.reps + 1):
        a.grad = b.grad = scale.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del loss
        if len(times) == 1:
            peak = _rss_mib() - base
    return {
        "provider": args.provider,
        "n": args.n,
        "d": args.d,
        "dtype": args.dtype,
        "threads": args.threads,
        "median_s": statistics.median(times[1:]),
        "min_s": min(times[1:]),
        "max_s": max(times[1:]),
        "first_s": times[0],
        "cpu_s": statistics.median(cpu[1:]),
        "extra_peak_mib": peak,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--providers", default="eager,cpp")
    p.add_argument("--provider", help=argparse.SUPPRESS)  # set in the child process
    args = p.parse_args(argv)
    if args.provider:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for prov in args.providers.split(","):
        if prov not in PROVIDERS:
            p.error(f"unknown provider {prov!r}; expected some of {PROVIDERS}")
        cmd = [sys.executable, __file__, "--provider", prov, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{prov:>9}: median {r['median_s']:.3f} s (min {r['min_s']:.3f}, max {r['max_s']:.3f}, "
            f"first {r['first_s']:.3f}), cpu {r['cpu_s']:.3f} s, extra peak {r['extra_peak_mib']:.0f} MiB",
            flush=True,
        )
    if len(rows) >= 2:
        r0, r1 = rows[0], rows[1]
        print(
            f"speed-up {r0['provider']}/{r1['provider']}: wall {r0['median_s'] / r1['median_s']:.2f}x, "
            f"cpu {r0['cpu_s'] / r1['cpu_s']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
