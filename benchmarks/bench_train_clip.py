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

        def loss_of():
            with amp:
                img = model.encode_image(images, normalize=True)  # (B, E)
                txt = model.encode_text(texts, normalize=True)  # (B, E)
                return loss_fn(img, txt, model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())

        return harness.train_step(opt, loss_of)

    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train_clip", description=__doc__.split("\n\n")[0])
    harness.add_device_args(p, helps=False)
    p.add_argument("--model", help="preset or open_clip name (CPU default tiny, GPU ViT-B-16)")
    p.add_argument("--batch", help="comma-separated batch sizes (CPU default 64, GPU 256)")
    return harness.add_train_step_args(p, "train_clip", providers_default="open_clip,mmfast")


def main(argv: list[str] | None = None) -> int:
    a, device = harness.parse_device(_parser(), argv)
    if device is None:
        return 2
    gpu = device == "cuda"
    model = a.model or ("ViT-B-16" if gpu else "tiny")
    batches = harness.int_list(a.batch, "256" if gpu else "64")
    if batches is None:
        return 2
    table = {"open_clip": _setup(False), "mmfast": _setup(True)}
    names = [n.strip() for n in a.providers.split(",") if n.strip()]
    rows = harness.train_step_sweep("train_clip", table, names, batches, {"model": model}, a, device)
    if rows is None:
        return 2
    for r in rows:
        if not r.error:
            print(f"{r.provider:<10} batch {r.x:<5} {r.x / r.median_ms * 1e3:9.1f} samples/s  "
                  f"peak {r.peak_mem_mib:8.1f} MiB ({r.mem_method})")
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
