"""``mmfast bench contrastive``: the CLIP (or SigLIP) loss, mmfast's backends vs the usual ways of computing it.

Workload: normalised image/text features (N, d) and a learnable log-scale τ (``logit_scale =
exp(τ)``, as CLIP trains it); the loss is the symmetric InfoNCE (``--loss siglip``: the sigmoid loss with a
learnable bias). Modes: ``fwd`` is the forward of a training step (autograd records, so memory includes
what backward will keep); ``fwd+bwd`` adds ``torch.autograd.grad`` w.r.t. both features and τ (and the bias).

Providers: ``mmfast-<backend>`` for each kernel backend that runs here (on CUDA ``mmfast-gemm``, row
chunks through cuBLAS with a Triton softmax stage, and ``mmfast-triton``, the fused kernels; on CPU
``mmfast-cpp``), ``torch-eager`` (full logits + ``F.cross_entropy`` / ``logsigmoid``), ``torch-compile``
(the same function through ``torch.compile``), ``open_clip`` (``ClipLoss`` / ``SigLipLoss``) and
``inf_cl`` (``inf_cl.cal_inf_loss``, CLIP, CUDA only, when installed); on request also
``mmfast-triton-split`` (the fused kernels' deterministic split backward).

FLOPs: the logits GEMM is 2N²d; forward = 2N²d, forward + backward = 8N²d (the logits again, dI = G·T,
dT = Gᵀ·I: what a scheme that never stores the logits must do). On CUDA each case also records
``gemm_tflops``: a plain bf16 ``torch.mm`` of the logits' shape, (N, d) × (d, N), timed in the same run,
so a row's TFLOP/s reads as a fraction of what cuBLAS reaches on that card for that size.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from mmfast.bench import harness

DTYPES = harness.DTYPES
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


def eager_siglip_loss(img, txt, logit_scale, logit_bias):
    """SigLIP as its reference code writes it: full (N, N) logits, ±1 labels, ``-logsigmoid`` summed / N."""
    logits = logit_scale * img @ txt.t() + logit_bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def eager_clip_loss(img, txt, logit_scale):
    """What a training script writes: full (N, N) logits and two cross-entropies."""
    logits = logit_scale * img @ txt.t()  # (N, N)
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _stepper(loss_fn, case, mode, device):
    img, txt, log_scale = _inputs(case, device)
    if case.get("loss") == "siglip":
        bias = torch.tensor(-10.0, device=device).requires_grad_()
        leaves = (img, txt, log_scale, bias)

        def loss_of():
            return loss_fn(img, txt, log_scale.exp(), bias)
    else:
        leaves = (img, txt, log_scale)

        def loss_of():
            return loss_fn(img, txt, log_scale.exp())

    def step():
        loss = loss_of()
        if mode == "fwd+bwd":
            return torch.autograd.grad(loss, leaves)
        return loss

    return step


def _mmfast(backend):
    def setup(case, mode):
        from mmfast.ops.contrastive import CLIP_OP, SIGLIP_OP, clip_loss, select_backend, siglip_loss

        device = case["device"]
        probe = torch.empty(1, 1, device=device, dtype=DTYPES[case["dtype"]])
        siglip = case.get("loss") == "siglip"
        select_backend(SIGLIP_OP if siglip else CLIP_OP, probe, backend)  # refusal reasons become the row's error
        if siglip:
            return _stepper(lambda i, t, s, b: siglip_loss(i, t, s, b, backend=backend), case, mode, device)
        return _stepper(lambda i, t, s: clip_loss(i, t, s, backend=backend), case, mode, device)

    return setup


def _mmfast_split(case, mode):
    """mmfast's fused Triton loss with the split backward (dB from a second pass over the transposed
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


def _eager_fn(case):
    return eager_siglip_loss if case.get("loss") == "siglip" else eager_clip_loss


def _eager(case, mode):
    return _stepper(_eager_fn(case), case, mode, case["device"])


def _compiled(case, mode):
    fn = torch.compile(_eager_fn(case), dynamic=False)
    return _stepper(fn, case, mode, case["device"])


def _open_clip(case, mode):
    if case.get("loss") == "siglip":
        from open_clip.loss import SigLipLoss

        return _stepper(SigLipLoss(), case, mode, case["device"])
    from open_clip.loss import ClipLoss

    return _stepper(ClipLoss(), case, mode, case["device"])


def _inf_cl(case, mode):
    if case["device"] != "cuda":
        raise RuntimeError("inf_cl runs on CUDA only")
    if case.get("loss") == "siglip":
        raise RuntimeError("inf_cl has no SigLIP loss")
    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    if not dist.is_initialized():  # inf_cl asks the process group for its rank: a group of one
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)

    def loss(i, t, s):
        out = (cal_inf_loss(i, t, scale=s) + cal_inf_loss(t, i, scale=s)) / 2
        return out.mean()

    return _stepper(loss, case, mode, "cuda")


def providers(device: str, names: list[str] | None = None) -> dict:
    """Provider name -> setup. mmfast's backends for the device first; ``names`` picks a subset."""
    # Order matters under --budget-s (each provider gets a fair share of what is left):
    # mmfast first, the compiler (slow first calls, one per size) last.
    if device == "cuda":
        table = {"mmfast-gemm": _mmfast("gemm"), "mmfast-triton": _mmfast("triton")}
    else:
        table = {"mmfast-cpp": _mmfast("cpp")}
    table.update({"torch-eager": _eager, "open_clip": _open_clip})
    if device == "cuda":
        table["inf_cl"] = _inf_cl
    table.update({"mmfast-reference": _mmfast("reference"), "torch-compile": _compiled})
    if device == "cuda":
        table["mmfast-triton-split"] = _mmfast_split
    if names:
        return harness.select_providers(table, names)
    table.pop("mmfast-triton-split", None)  # by name only
    return table


def flops(case: dict, mode: str) -> float:
    mm = 2.0 * case["N"] ** 2 * case["d"]
    return mm if mode == "fwd" else 4 * mm


def gemm_tflops(n: int, d: int, dtype: torch.dtype) -> float:
    """cuBLAS's rate (TFLOP/s) on the logits' GEMM, (n, d) × (d, n) in ``dtype``: median of triton's do_bench."""
    import triton

    a = torch.randn(n, d, device="cuda", dtype=dtype)
    b = torch.randn(n, d, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: torch.mm(a, b.t()), return_mode="median")
    return 2.0 * n * n * d / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast bench contrastive", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "contrastive")
    p.add_argument("--quick", action="store_true", help="small sweep (about a minute on CPU)")
    p.add_argument("--sizes", help="comma-separated batch sizes N (overrides the defaults)")
    p.add_argument("--dim", type=int, help="feature dim d (CPU default 256, GPU 768)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="feature dtype (CPU default fp32, GPU bf16)")
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="which loss (default clip)")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.sweep_cli(_parser(), argv, _sweep)


def _sweep(args: argparse.Namespace, device: str, modes: list[str]) -> int:
    """The contrastive sweep after parsing (:func:`mmfast.bench.harness.sweep_cli`)."""
    gpu = device == "cuda"
    if args.sizes:
        sizes = harness.int_list(args.sizes, "", "--sizes")
        if sizes is None:
            return 2
    else:
        sizes = (GPU_QUICK_SIZES if args.quick else GPU_SIZES) if gpu else (CPU_QUICK_SIZES if args.quick else CPU_SIZES)
    dim = args.dim or (GPU_DIM if gpu else (CPU_QUICK_DIM if args.quick else CPU_DIM))
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    if not sizes or any(s <= 0 for s in sizes) or dim <= 0:
        print(f"bad arguments: sizes {sizes}, dim {dim}", file=sys.stderr)
        return 2
    names = harness.provider_names(args)
    if names is None and args.quick and not gpu:
        names = ["mmfast-cpp", "torch-eager", "open_clip"]  # torch.compile's first call alone takes a minute
    table = providers(device, names)
    stem = "contrastive" if args.loss == "clip" else "contrastive-siglip"
    out = harness.results_csv(args, stem, device)
    cases = []
    for n in sizes:
        case = {"N": n, "d": dim, "dtype": dtype, "device": device, "loss": args.loss}
        if gpu:
            try:
                case["gemm_tflops"] = round(gemm_tflops(n, dim, DTYPES[dtype]), 1)
            except torch.OutOfMemoryError:  # the (N, N) product itself does not fit: no yardstick
                torch.cuda.empty_cache()
            print(f"N={n}: {dtype} GEMM (N, d) x (d, N): {case.get('gemm_tflops', 'out of memory')} TFLOP/s")
        cases.append(case)
    rows = harness.run(
        stem, table, cases, x_key="N", device=device, modes=modes, flops=flops,
        budget_s=args.budget_s, out_csv=out, plot=not args.no_plot,
        **({"reps": 2, "max_s": 3.0} if args.quick and not gpu else {}),
    )
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
