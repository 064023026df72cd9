"""CLIP training step, mmfast vs plain open_clip: samples/s and peak memory for the same model and batch.

One step = forward of both towers, the contrastive loss, backward and an AdamW update (one process;
the multi-rank loss is exercised by tests/training). Providers:

* ``open_clip``: ``create_model(..., kernels=False)`` + ``open_clip.loss.ClipLoss`` (full N×N logits);
* ``mmfast``: ``create_model(..., kernels=True)`` (``mmfast.patch``: fused attention / norm /
  projection where rules exist) + ``mmfast.ops.clip_loss`` (fused, no N×N logits).

Defaults: CPU — the ``tiny`` preset, batch 64, fp32; GPU — ViT-B-16, batch 256, bf16 autocast.
Rows go to ``benchmarks/results/train_clip_<device>.csv`` (harness columns; samples/s is printed
and equals ``batch / median_ms · 1000``).

    python benchmarks/bench_train_clip.py [--gpu|--cpu] [--model NAME] [--batch 64,128] [--budget-s 120]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from mmfast.bench import harness

MAX_LOGIT_SCALE = math.log(100.0)


def _setup(kernels: bool):
    def setup(case: dict, mode: str):
        import open_clip

        from mmfast.models.clip.model import create_model, get_tokenizer

        device, b = case["device"], case["batch"]
        torch.manual_seed(0)
        model = create_model(case["model"], device=device, kernels=kernels)
        if case["grad_ckpt"]:
            model.set_grad_checkpointing(True)
        model.train()
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        images = torch.randn(b, 3, *size, device=device)
        tok = get_tokenizer(model)
        texts = tok([f"a photo of {i} red stars next to a small blue car" for i in range(b)]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and case["dtype"] == "bf16")
        if kernels:
            from mmfast.ops import clip_loss as loss_fn
        else:
            oc_loss = open_clip.loss.ClipLoss()

            def loss_fn(img, txt, scale):
                return oc_loss(img, txt, scale)

        def step():
            with amp:
                img = model.encode_image(images, normalize=True)  # (B, E)
                txt = model.encode_text(texts, normalize=True)  # (B, E)
                loss = loss_fn(img, txt, model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train_clip", description=__doc__.split("\n\n")[0])
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true")
    dev.add_argument("--cpu", action="store_true")
    p.add_argument("--model", help="preset or open_clip name (CPU default tiny, GPU ViT-B-16)")
    p.add_argument("--batch", help="comma-separated batch sizes (CPU default 64, GPU 256)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--providers", default="open_clip,mmfast")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="CSV path (default benchmarks/results/train_clip_<device>.csv)")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.gpu and not torch.cuda.is_available():
        print("bench_train_clip: --gpu given but torch.cuda is not available", file=sys.stderr)
        return 2
    device = "cuda" if (a.gpu or (torch.cuda.is_available() and not a.cpu)) else "cpu"
    gpu = device == "cuda"
    model = a.model or ("ViT-B-16" if gpu else "tiny")
    try:
        batches = [int(x) for x in (a.batch or ("256" if gpu else "64")).split(",") if x.strip()]
    except ValueError:
        print(f"--batch must be comma-separated integers, got {a.batch!r}", file=sys.stderr)
        return 2
    table = {"open_clip": _setup(False), "mmfast": _setup(True)}
    names = [n.strip() for n in a.providers.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not batches or min(batches) <= 0:
        print(f"bad arguments: providers {unknown or names} (known {list(table)}), batches {batches}", file=sys.stderr)
        return 2
    cases = [{"batch": b, "model": model, "dtype": "bf16" if gpu else "fp32", "device": device,
              "grad_ckpt": a.grad_checkpointing} for b in batches]
    out = Path(a.out) if a.out else Path("benchmarks/results") / f"train_clip_{harness.device_slug(device)}.csv"
    rows = harness.run("train_clip", {n: table[n] for n in names}, cases, x_key="batch", device=device,
                       modes=("train_step",), budget_s=a.budget_s, out_csv=out, plot=not a.no_plot,
                       reps=a.reps, warmup=2, max_s=60.0)
    for r in rows:
        if not r.error:
            print(f"{r.provider:<10} batch {r.x:<5} {r.x / r.median_ms * 1e3:9.1f} samples/s  "
                  f"peak {r.peak_mem_mib:8.1f} MiB ({r.mem_method})")
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
