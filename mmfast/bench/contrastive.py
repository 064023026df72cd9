"""``mmfast bench contrastive``: the CLIP loss, fused vs the usual ways of computing it.

Workload: normalised image/text features (N, d) and a learnable log-scale τ (``logit_scale =
exp(τ)``, as CLIP trains it); the loss is the symmetric InfoNCE. Modes: ``fwd`` is the forward
of a training step (autograd records, so memory includes what backward will keep); ``fwd+bwd``
adds ``torch.autograd.grad`` w.r.t. both features and τ.

Providers: ``mmfast-<backend>`` for each kernel backend that runs here, ``torch-eager`` (full
logits + ``F.cross_entropy``), ``torch-compile`` (the same function through ``torch.compile``),
``open_clip`` (``open_clip.loss.ClipLoss``) and ``inf_cl`` (``inf_cl.cal_inf_loss``, CUDA only,
when installed); on CUDA also ``mmfast-triton-split`` (the deterministic split backward: dB from a
second pass instead of atomics; on the H100 the default fused backward took 10.3 ms at N=8192
against open_clip's 1.9 ms).

FLOPs (model FLOPs; recomputation inside fused kernels is not counted): the logits matmul is
2N²d; forward = 2N²d, forward + backward = 6N²d (dI = G·T and dT = Gᵀ·I).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmfast.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SIZES, CPU_DIM, CPU_QUICK_SIZES, CPU_QUICK_DIM = [2048, 4096, 8192, 16384], 256, [512, 1024, 2048], 128
GPU_SIZES, GPU_DIM, GPU_QUICK_SIZES = [8192, 16384, 32768, 65536, 131072], 768, [8192, 32768]


# --------------------------------------------------------------------------- inputs and losses
def _inputs(case: dict, device: str):
    g = torch.Generator(device=device).manual_seed(case["N"])
    n, d, dtype = case["N"], case["d"], DTYPES[case["dtype"]]
    img = F.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(dtype).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), device=device).requires_grad_()
    return img, txt, log_scale


def eager_clip_loss(img, txt, logit_scale):
    """What a training script writes: full (N, N) logits and two cross-entropies."""
    logits = logit_scale * img @ txt.t()  # (N, N)
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _stepper(loss_fn, case, mode, device):
    img, txt, log_scale = _inputs(case, device)

    def step():
        loss = loss_fn(img, txt, log_scale.exp())
        if mode == "fwd+bwd":
            return torch.autograd.grad(loss, (img, txt, log_scale))
        return loss

    return step


def _mmfast(backend):
    def setup(case, mode):
        from mmfast.ops.contrastive import CLIP_OP, clip_loss, select_backend

        device = case["device"]
        probe = torch.empty(1, 1, device=device, dtype=DTYPES[case["dtype"]])
        select_backend(CLIP_OP, probe, backend)  # refusal reasons become the row's error
        return _stepper(lambda i, t, s: clip_loss(i, t, s, backend=backend), case, mode, device)

    return setup


def _mmfast_split(case, mode):
    """mmfast's Triton loss with the split backward (dB from a second pass over the transposed
    problem instead of fp32 atomics; ``MMFAST_CONTRASTIVE_BWD=split`` around each step)."""
    inner = _mmfast("triton")(case, mode)

    def step():
        old = os.environ.get("MMFAST_CONTRASTIVE_BWD")
        os.environ["MMFAST_CONTRASTIVE_BWD"] = "split"
        try:
            return inner()
        finally:
            if old is None:
                del os.environ["MMFAST_CONTRASTIVE_BWD"]
            else:
                os.environ["MMFAST_CONTRASTIVE_BWD"] = old

    return step


def _eager(case, mode):
    return _stepper(eager_clip_loss, case, mode, case["device"])


def _compiled(case, mode):
    fn = torch.compile(eager_clip_loss, dynamic=False)
    return _stepper(fn, case, mode, case["device"])


def _open_clip(case, mode):
    from open_clip.loss import ClipLoss

    return _stepper(ClipLoss(), case, mode, case["device"])


def _inf_cl(case, mode):
    if case["device"] != "cuda":
        raise RuntimeError("inf_cl runs on CUDA only")
    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    if not dist.is_initialized():  # inf_cl asks the process group for its rank: a group of one
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)

    def loss(i, t, s):
        out = (cal_inf_loss(i, t, scale=s) + cal_inf_loss(t, i, scale=s)) / 2
        return out.mean()

    return _stepper(loss, case, mode, "cuda")


def providers(device: str, names: list[str] | None = None) -> dict:
    """Provider name -> setup. The fused backend for the device first; ``names`` picks a subset."""
    fused = "triton" if device == "cuda" else "cpp"
    # Order matters under --budget-s (each provider gets a fair share of what is left):
    # the fused kernel first, the compiler (slow first calls, one per size) last.
    table = {f"mmfast-{fused}": _mmfast(fused), "torch-eager": _eager, "open_clip": _open_clip}
    if device == "cuda":
        table["mmfast-triton-split"] = _mmfast_split
        table["inf_cl"] = _inf_cl
    table.update({"mmfast-reference": _mmfast("reference"), "torch-compile": _compiled})
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(table)}")
        table = {n: table[n] for n in names}
    return table


def flops(case: dict, mode: str) -> float:
    mm = 2.0 * case["N"] ** 2 * case["d"]
    return mm if mode == "fwd" else 3 * mm


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast bench contrastive", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "contrastive")
    p.add_argument("--quick", action="store_true", help="small sweep (about a minute on CPU)")
    p.add_argument("--sizes", help="comma-separated batch sizes N (overrides the defaults)")
    p.add_argument("--dim", type=int, help="feature dim d (CPU default 256, GPU 768)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="feature dtype (CPU default fp32, GPU bf16)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = harness.pick_device(args, "mmfast bench contrastive")
    if device is None:
        return 2
    gpu = device == "cuda"
    if args.sizes:
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            print(f"--sizes must be comma-separated integers, got {args.sizes!r}", file=sys.stderr)
            return 2
    else:
        sizes = (GPU_QUICK_SIZES if args.quick else GPU_SIZES) if gpu else (CPU_QUICK_SIZES if args.quick else CPU_SIZES)
    dim = args.dim or (GPU_DIM if gpu else (CPU_QUICK_DIM if args.quick else CPU_DIM))
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    modes = harness.modes_of(args)
    if modes is None:
        return 2
    if not sizes or any(s <= 0 for s in sizes) or dim <= 0:
        print(f"bad arguments: sizes {sizes}, dim {dim}", file=sys.stderr)
        return 2
    names = harness.provider_names(args)
    if names is None and args.quick and not gpu:
        names = ["mmfast-cpp", "torch-eager", "open_clip"]  # torch.compile's first call alone takes a minute
    table = providers(device, names)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"contrastive_{harness.device_slug(device)}.csv"
    cases = [{"N": n, "d": dim, "dtype": dtype, "device": device} for n in sizes]
    rows = harness.run(
        "contrastive", table, cases, x_key="N", device=device, modes=modes, flops=flops,
        budget_s=args.budget_s, out_csv=out, plot=not args.no_plot,
        **({"reps": 2, "max_s": 3.0} if args.quick and not gpu else {}),
    )
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
