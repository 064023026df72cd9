"""NExT-GPT stages of ``mmfast demo`` (see :mod:`mmfast.demo`), on the world's text<->image pairs.

* ``nextgpt_stage1``: encoding-side alignment (input projection, captioning LM loss), ZeRO-2 on 2 ranks.
  The image encoder is the CLIP the demo trained (its ViT as a transformers ``CLIPVisionModel``, frozen),
  and the LLM the tiny LLaVA's tuned language model (stage 2, LoRA merged; it has read the world's
  text), as NExT-GPT starts from a pretrained Vicuna. Without those stages the tiny preset's random
  parts stand in.
* ``nextgpt_stage2``: decoding-side alignment (output projection + signal-token rows; LM loss on the
  replies, which are the signal run alone for text->image requests and captions for the X->text negatives,
  and the per-token Euclidean alignment loss against the tiny Stable Diffusion's text encoder).
* ``nextgpt_eval``: text->image on held-out captions. The reply ``[IMG0]..[IMG3]`` is teacher-forced so
  every prompt yields an image; images come from the frozen tiny ``StableDiffusionPipeline`` and are
  scored with the demo's CLIP: CLIPSIM = mean cosine(image, its prompt), and the same on mismatched
  (rolled) pairs. The tiny decoder is random and frozen, so the two scores are expected to be close: the
  numbers check the plumbing, not image quality (a pretrained Stable Diffusion directory gives the real
  measurement). Free greedy generation is measured too: ``nextgpt_signal_emit_rate`` is the share of
  held-out text->image prompts whose reply starts an ``[IMG0]`` run, ``nextgpt_signal_emit_rate_captioning``
  the same for held-out captioning prompts (an image plus "Describe this image."), which should stay near 0.
"""
from __future__ import annotations

import json
from pathlib import Path


def add_args(p) -> None:
    p.add_argument("--nextgpt-steps1", type=int, default=60, help="NExT-GPT stage-1 steps")
    p.add_argument("--nextgpt-steps2", type=int, default=100, help="NExT-GPT stage-2 steps")
    p.add_argument("--nextgpt-batch-size", type=int, default=8, help="per rank")
    p.add_argument("--nextgpt-eval-prompts", type=int, default=32)
    p.add_argument("--nextgpt-emit-prompts", type=int, default=16,
                   help="held-out prompts of each kind for the free-generation signal emission rates")
    p.add_argument("--nextgpt-diffusion-steps", type=int, default=10)


def _dirs(ctx):
    return ctx.out / "nextgpt_stage1", ctx.out / "nextgpt_stage2"


def _clip_dir(ctx):
    d = ctx.clip_run / "final"
    return d if (d / "open_clip_config.json").is_file() else None


def _llava_dir(ctx):
    d = ctx.out / "llava_stage2" / "final"
    return d if (d / "config.json").is_file() else None


def _train(argv, out) -> dict:
    from mmfast.training.launch import run_in_process

    seconds = run_in_process("nextgpt", "NExT-GPT", argv)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-3:]  # the last logged steps, averaged: one batch is noisy
    mean = {k: sum(r[k] for r in tail) / len(tail) for k in tail[-1] if k in ("loss", "lm", "lm_signal", "align_image")}
    return {"seconds": seconds, "first": rows[0], **mean}


def _common(ctx, stage: int, out) -> list[str]:
    a = ctx.args
    return ["--nproc", str(a.nproc), "--stage", str(stage), "--data", str(ctx.world), "--out", str(out),
            "--batch-size", str(a.nextgpt_batch_size), "--seed", str(a.seed), "--log-every", "5", "--threads", "1"]


def nextgpt_stage1(ctx) -> dict:
    s1, _ = _dirs(ctx)
    clip = _clip_dir(ctx)
    argv = _common(ctx, 1, s1) + ["--model", "tiny", "--steps", str(ctx.args.nextgpt_steps1), "--lr", "5e-3"]
    if clip is not None:
        argv += ["--image-encoder", str(clip)]
    llm = _llava_dir(ctx)
    if llm is not None:
        argv += ["--llm", str(llm)]
    r = _train(argv, s1)
    return {"nextgpt_llm": str(llm or "tiny preset"), "nextgpt_stage1_final_loss": round(r["loss"], 4), "nextgpt_stage1_first_loss": round(r["first"]["loss"], 4),
            "nextgpt_stage1_seconds": round(r["seconds"], 1), "nextgpt_image_encoder": str(clip or "tiny preset")}


def nextgpt_stage2(ctx) -> dict:
    s1, s2 = _dirs(ctx)
    # The signal-token rows start from random and must outscore the frozen LLM's first reply token within a
    # hundred steps: they get a larger lr than the output projection.
    argv = _common(ctx, 2, s2) + ["--init-from", str(s1 / "final"), "--steps", str(ctx.args.nextgpt_steps2),
                                  "--lr", "2e-3", "--signal-lr", "2e-2"]
    r = _train(argv, s2)
    return {"nextgpt_stage2_alignment_loss": round(r["align_image"], 4),
            "nextgpt_stage2_first_alignment_loss": round(r["first"]["align_image"], 4),
            "nextgpt_stage2_signal_lm_loss": round(r["lm_signal"], 4),
            "nextgpt_stage2_first_signal_lm_loss": round(r["first"]["lm_signal"], 4),
            "nextgpt_stage2_final_loss": round(r["loss"], 4), "nextgpt_stage2_seconds": round(r["seconds"], 1)}


def _conditions(model, captions):
    """Teacher-forced text->image conditioning (N, Q, C) for ``captions``."""
    import random

    import torch

    from mmfast.models.nextgpt import data as nd

    rng = random.Random(0)
    items = [nd.tokenize_dialogue(nd.t2x_record("image", {"caption": c, "path": ""}, rng, reply_text=False),
                                  model.tokenizer, model.n_input_tokens) for c in captions]
    batch = nd.collate(items, model.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden, emb = model.hidden(batch["input_ids"], batch["attention_mask"], {})
        return model.output_proj["image"](model.signal_states("image", batch["input_ids"], hidden, emb))


def emit_rates(model, world, pairs, max_new_tokens: int = 12) -> dict:
    """Shares of free greedy replies holding ``[IMG0]``: for text->image prompts (cycling through the
    prompt templates) and for captioning prompts on the same pairs' images."""
    from mmfast.models.nextgpt import data as nd

    img0, n = model.signal_ids["image"][0], max(1, len(pairs))
    t2x = x2t = 0
    for i, p in enumerate(pairs):
        q = nd.T2X_PROMPTS["image"][i % len(nd.T2X_PROMPTS["image"])].format(c=p["caption"])
        t2x += img0 in model.generate(q, max_new_tokens=max_new_tokens, decode=False)["token_ids"]
        q = nd.X2T_PROMPTS["image"][i % len(nd.X2T_PROMPTS["image"])]
        x2t += img0 in model.generate(q, images=[str(Path(world) / p["path"])], max_new_tokens=max_new_tokens,
                                      decode=False)["token_ids"]
    return {"nextgpt_signal_emit_rate": round(t2x / n, 3), "nextgpt_signal_emit_rate_captioning": round(x2t / n, 3),
            "nextgpt_emit_prompts": len(pairs)}


def nextgpt_eval(ctx) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt import decoders as ndec
    from mmfast.models.nextgpt.model import load_pretrained

    a = ctx.args
    _, s2 = _dirs(ctx)
    model = load_pretrained(s2 / "final", device="cpu", kernels=False)
    pairs = nd.t2x_pairs(ctx.world, "image", "val")[: a.nextgpt_eval_prompts]
    captions = [p["caption"] for p in pairs]
    cond = _conditions(model, captions)
    images = ndec.decode("image", model.pipes["image"], cond, steps=a.nextgpt_diffusion_steps, seed=a.seed)
    samples = ctx.out / "nextgpt_samples"
    samples.mkdir(parents=True, exist_ok=True)
    pil = [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in images]
    for i, im in enumerate(pil[:8]):
        im.save(samples / f"val_{i:02d}.png")
    out = {"nextgpt_eval_prompts": len(captions), **emit_rates(model, ctx.world, pairs[: a.nextgpt_emit_prompts])}
    clip_dir = _clip_dir(ctx)
    if clip_dir is None:
        return {**out, "nextgpt_clipsim": None, "nextgpt_clipsim_random_pairs": None}
    from mmfast.models.clip.model import create_model, get_tokenizer, get_transforms

    clip = create_model(None, pretrained=clip_dir, device="cpu", kernels=False).eval()
    tf = get_transforms(clip, is_train=False)
    with torch.no_grad():
        img = clip.encode_image(torch.stack([tf(im) for im in pil]), normalize=True).float()  # (N, E)
        txt = clip.encode_text(get_tokenizer(clip)(captions), normalize=True).float()  # (N, E)
    matched = (img * txt).sum(-1)
    mismatched = (img * txt.roll(1, dims=0)).sum(-1)
    return {**out, "nextgpt_clipsim": round(float(matched.mean()), 4),
            "nextgpt_clipsim_random_pairs": round(float(mismatched.mean()), 4)}


__all__ = ["add_args", "emit_rates", "nextgpt_eval", "nextgpt_stage1", "nextgpt_stage2"]
