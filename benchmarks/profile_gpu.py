"""Where the time goes (GPU): torch.profiler over mmfast's LayerNorm forward + backward and one
mmfast CLIP ViT-B/16 training step, the two rows of the H100 run that mmfast lost by the widest
margin. For each: wall ms per iteration, the GPU's busy ms per iteration (the sum of kernel
times), and the top operators by self CUDA time and by self CPU time. Wall far above busy means
the host (Python, launches, dispatch) is the bottleneck, not the kernels.

    python benchmarks/profile_gpu.py [--out profile.txt] [--batch 128]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

_OUT = None  # --out: rewritten after each profile, so a run cut by its time limit keeps what it has


def _flush(out):
    if _OUT:
        with open(_OUT, "w") as f:
            f.write("\n\n".join(out) + "\n")


def _profile(name, step, iters, out):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / iters * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / iters / 1e3
    head = f"==== {name}: wall {wall:.3f} ms/iter, GPU busy {busy:.3f} ms/iter (kernel time summed)"
    print(head)
    out.append(head)
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        table = events.table(sort_by=key, row_limit=15, max_name_column_width=60)
        out.append(f"-- by {key}\n{table}")
        print("\n".join(table.splitlines()[:8]))
    _flush(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu: needs CUDA", file=sys.stderr)
        return 2
    global _OUT
    _OUT = a.out
    out: list[str] = []
    rc = 0
    try:
        from mmfast.ops.norm import layer_norm

        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(36928, 1024, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        dy = torch.randn_like(x)
        _profile("layer_norm 36928x1024 bf16 fwd+bwd (mmfast triton)",
                 lambda: torch.autograd.grad(layer_norm(x, w, b, 1e-5, backend="triton"), (x, w, b), dy), 20, out)
        _profile("layer_norm 36928x1024 bf16 fwd+bwd (torch)",
                 lambda: torch.autograd.grad(torch.nn.functional.layer_norm(x, (1024,), w, b), (x, w, b), dy), 20, out)
    except Exception as e:  # noqa: BLE001  (report and go on to the next profile)
        out.append(f"layer_norm profile failed: {type(e).__name__}: {e}")
        print(out[-1])
        rc = 1
    try:
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_train_clip import (
            _setup,  # the benchmark's own step: the model, data and optimizer it times
        )

        case = {"batch": a.batch, "model": "ViT-B-16", "dtype": "bf16", "device": "cuda", "grad_ckpt": False}
        _profile(f"CLIP ViT-B/16 train step, batch {a.batch}, bf16 autocast (mmfast kernels)",
                 _setup(True)(case, "train_step"), 3, out)
    except Exception as e:  # noqa: BLE001
        out.append(f"CLIP profile failed: {type(e).__name__}: {e}")
        print(out[-1])
        rc = 1
    _flush(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
