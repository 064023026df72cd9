"""LLaVA training step, mmfast vs plain transformers: tokens/s and peak memory for the same model and batch.

One step = vision tower (frozen, no grad) → projector → language model → next-token loss over the
text tokens → backward → AdamW on the projector and the LLM (stage-2 full tuning). Providers:

* ``transformers``: ``LlavaForConditionalGeneration`` with ``attn_implementation="sdpa"``, the LM head's
  full (tokens, vocab) logits and ``F.cross_entropy``;
* ``mmfast``: the same model after ``mmfast.patch`` (flash attention, norms, the LLaMA fused set,
  projector) with the loss from ``mmfast.ops.fused_linear_cross_entropy`` (no logits tensor);
* ``liger`` (when ``liger_kernel`` is installed): transformers after ``apply_liger_kernel_to_llama``
  (RoPE, RMSNorm, SwiGLU) with the loss from ``LigerFusedLinearCrossEntropyLoss``. Liger patches
  ``transformers.models.llama`` for the whole process, so it always runs last.

Shapes (weights random, the tokenizer irrelevant):
* ``tiny`` (CPU default): the tiny preset, batch 8, 16 image + 112 text tokens, fp32;
* ``llava7b-trunc`` (GPU default): LLaVA-1.5-7B's shapes — ViT-L/14-336 (576 image tokens), LLaMA-7B
  (4096 wide, 32 heads, vocab 32000) — truncated to ``--layers`` layers of each, sequence 2048, bf16;
* ``anchor`` (issue #23's target shape): the same dimensions truncated to 4 LLM + 4 vision layers, batch 4,
  sequence 2048 (576 image tokens), bf16, AdamW; providers transformers, mmfast, liger.

Rows go to ``benchmarks/results/train_llava_<device>.csv``; tokens/s = batch·seq / step time.

    python benchmarks/bench_train_llava.py [--gpu|--cpu] [--shape tiny|llava7b-trunc|anchor] [--batch 8] [--layers 2]
"""
from __future__ import annotations

import argparse
import sys

import torch

from mmfast.bench import harness

ANCHOR = {"layers": 4, "vision_layers": 4, "batch": 4, "seq": 2048}


def _liger():
    """``(apply_liger_kernel_to_llama, LigerFusedLinearCrossEntropyLoss)``; ImportError when not installed."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, apply_liger_kernel_to_llama

    return apply_liger_kernel_to_llama, LigerFusedLinearCrossEntropyLoss


def build_model(shape: str, layers: int, kernels: bool, device: str, dtype, vision_layers: int | None = None,
                liger: bool = False):
    """(HF LLaVA model, vision image size, image tokens per image, text vocab)."""
    from mmfast.models.llava import model as ml

    if liger:  # class-level patch of transformers' LLaMA, before the model is built
        apply, _ = _liger()
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    if shape == "tiny":
        llava = ml.build_llava("tiny", kernels=kernels, seed=0, device=device)
        model = llava.model
    else:
        from mmfast.bench.llava import llava7b_trunc

        model = llava7b_trunc(layers, vision_layers if vision_layers is not None else layers + 1, device)
        model.model.vision_tower.requires_grad_(False)
        if kernels:
            import mmfast

            mmfast.patch(model)
    model.to(dtype)
    v = model.config.vision_config
    return model, v.image_size, (v.image_size // v.patch_size) ** 2, model.config.text_config.vocab_size


def _liger_loss(model, batch):
    """LLaVA's next-token loss with Liger's fused linear cross-entropy (no logits), as ``llava_loss``."""
    from mmfast.models.llava import model as ml

    _, LCE = _liger()
    hidden = ml.forward_hidden(model, batch["input_ids"], batch.get("attention_mask"),
                               batch.get("pixel_values")).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = batch["labels"][:, 1:].reshape(-1)
    keep = target != -100
    return LCE()(model.lm_head.weight, h[keep], target[keep])


def _setup(kernels: bool, liger: bool = False):
    def setup(case: dict, mode: str):
        from mmfast.models.llava import model as ml

        device, b, seq = case["device"], case["batch"], case["seq"]
        dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
        model, size, n_img, vocab = build_model(case["shape"], case["layers"], kernels, device, dtype,
                                                case.get("vision_layers"), liger)
        if case["grad_ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        g = torch.Generator().manual_seed(0)
        image_id = model.config.image_token_id
        ids = torch.randint(5, min(vocab, 32000) - 1, (b, seq), generator=g)
        ids[ids == image_id] = 5
        ids[:, 1: 1 + n_img] = image_id  # BOS, the image, then text
        labels = ids.clone()
        labels[:, : 1 + n_img + 16] = -100  # image and a prompt unsupervised
        batch = {"input_ids": ids.to(device), "labels": labels.to(device),
                 "attention_mask": torch.ones_like(ids).to(device),
                 "pixel_values": torch.randn(b, 3, size, size, generator=g).to(device, dtype)}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=device == "cuda")

        return harness.train_step(
            opt, lambda: _liger_loss(model, batch) if liger else ml.llava_loss(model, batch, fused=kernels))

    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train_llava", description=__doc__.split("\n\n")[0])
    harness.add_device_args(p, helps=False)
    p.add_argument("--shape", choices=("tiny", "llava7b-trunc", "anchor"),
                   help="CPU default tiny, GPU llava7b-trunc; anchor: 4+4 layers, batch 4, seq 2048")
    p.add_argument("--layers", type=int, default=2, help="LLM layers (and vision layers - 1) of llava7b-trunc")
    p.add_argument("--batch", help="comma-separated batch sizes (CPU default 8, GPU 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (CPU 128, GPU 2048)")
    return harness.add_train_step_args(p, "train_llava",
                                       providers_help="comma-separated (default transformers,mmfast; anchor adds liger)")


def main(argv: list[str] | None = None) -> int:
    a, device = harness.parse_device(_parser(), argv)
    if device is None:
        return 2
    gpu = device == "cuda"
    shape = a.shape or ("llava7b-trunc" if gpu else "tiny")
    anchor = shape == "anchor"
    seq = a.seq or (2048 if shape != "tiny" else 128)
    layers = ANCHOR["layers"] if anchor else a.layers
    batches = harness.int_list(a.batch, str(ANCHOR["batch"]) if anchor else "1" if gpu else "8")
    if batches is None:
        return 2
    table = {"transformers": _setup(False), "mmfast": _setup(True), "liger": _setup(False, liger=True)}
    names = [n.strip() for n in (a.providers or ("transformers,mmfast,liger" if anchor else "transformers,mmfast"))
             .split(",") if n.strip()]
    names = [n for n in names if n != "liger"] + (["liger"] if "liger" in names else [])  # liger patches globally
    case = {"seq": seq, "shape": shape, "layers": layers, "vision_layers": ANCHOR["vision_layers"] if anchor else None}
    rows = harness.train_step_sweep("train_llava", table, names, batches, case, a, device)
    if rows is None:
        return 2
    base = {r.x: r for r in rows if r.provider == "transformers" and not r.error}
    for r in rows:
        if r.error:
            print(f"{r.provider:<13} batch {r.x:<4} error: {r.error}")
            continue
        tps = r.x * seq / r.median_ms * 1e3
        rel = ""
        if r.provider != "transformers" and r.x in base:
            b0 = base[r.x]
            rel = f"  ({b0.median_ms / r.median_ms:.2f}x tokens/s, {r.peak_mem_mib / b0.peak_mem_mib:.2f}x memory)"
        print(f"{r.provider:<13} batch {r.x:<4} {tps:10.1f} tokens/s  peak {r.peak_mem_mib:9.1f} MiB "
              f"({r.mem_method}){rel}")
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
