"""LLaVA and POPE stages of ``mmfast demo`` (see :mod:`mmfast.demo`).

* ``llava_stage1``: feature alignment, projector only, ``plain`` template, DeepSpeed ZeRO-2 on 2 ranks.
  The vision tower is the CLIP the demo just trained (its ViT converted to a transformers
  ``CLIPVisionModel``, frozen), or the tiny preset's own tower when the CLIP stages did not run.
* ``llava_stage2``: end-to-end, the tiny LLM and the projector in full (``--llava-lora`` for LoRA,
  merged into the export), ``vicuna_v1``, ZeRO-2 (``--llava-ds-config zero3`` for ZeRO-3, about 40 % slower
  per step on 2 CPU ranks), on a mixture of every yes/no record and a share of the other types.
* ``llava_eval``: a few held-out questions, and yes/no accuracy on the held-out ``yesno`` turns.
* ``pope``: POPE's random / popular / adversarial question sets built from the held-out objects,
  polled through the evaluation adapter (``config.json`` says ``"mmfast_model": "llava"``), scored.
"""
from __future__ import annotations

import json

POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_POSITIVES = 3  # the paper's: images with at least 3 objects, each asked about 3 of them


def add_args(p) -> None:
    p.add_argument("--llava-steps1", type=int, default=40, help="LLaVA stage-1 steps")
    # Stage 2 underfits (yes/no accuracy on training images = held-out): at a fixed budget, more and smaller
    # steps help; 1000 x 8 per rank beat 500 x 16 (POPE random F1 0.752 vs 0.726), and 1500 steps beat 1000
    # (0.786 vs 0.773 on 500 POPE images) for +40 s; 2300 steps after a 300-step CLIP gave 0.798. 1000 since
    # 2026-12-03, to keep the demo within 10 minutes on a slower machine (POPE random F1 0.827 at 1500 steps
    # and a 600-step CLIP, 0.810 at 1000 steps and a 450-step CLIP, on that machine).
    p.add_argument("--llava-steps2", type=int, default=1000, help="LLaVA stage-2 steps")
    p.add_argument("--llava-batch-size", type=int, default=8, help="per rank")
    p.add_argument("--llava-lr2", type=float, default=1e-3, help="stage-2 learning rate")
    # POPE random F1 at 1500 steps: 0.786 with 5 % of the other records, 0.790 with 2 %, 0.809 with none (one
    # run each, about +-0.01 apart from run to run); 2 % keeps some open answers and saves about 10 s.
    p.add_argument("--llava-other-share", type=float, default=0.02,
                   help="stage-2 mixture: this share of the conversation / detail / reasoning records, beside "
                        "every yes/no record")
    p.add_argument("--llava-ds-config", default="zero2", help="stage-2 DeepSpeed config (zero3 is about 40 %% slower "
                   "per step on 2 CPU ranks)")
    # The class token beside the 16 patch tokens (LLaVA's "cls_patch"): POPE random F1 0.813 vs 0.809 with
    # "patch" (500 images, yes/no records only); it mostly helps reject absent objects (0.887 vs 0.857).
    p.add_argument("--llava-vision-select-feature", default="cls_patch", choices=("patch", "cls_patch"),
                   help="image tokens: the patches, or the class token and the patches")
    p.add_argument("--llava-image-attention", default="causal", choices=("causal", "bidirectional"),
                   help="stage-2 attention among the image tokens")
    p.add_argument("--llava-vision-tower-lr", type=float, default=None,
                   help="stage 2 also tunes the vision tower at this learning rate (default: frozen)")
    p.add_argument("--llava-lora", action="store_true", help="stage 2 with LoRA instead of full tuning")
    p.add_argument("--llava-lora-r", type=int, default=64)
    p.add_argument("--llava-eval-questions", type=int, default=100)
    # The paper's 500 images per setting: 3,000 questions (F1's standard error about 0.008, 0.018 at 100).
    p.add_argument("--pope-images", type=int, default=500, help="POPE images per setting (x6 questions)")


def _dirs(ctx):
    return ctx.out / "llava_stage1", ctx.out / "llava_stage2", ctx.out / "pope"


def _vision_args(ctx) -> list[str]:
    clip = ctx.clip_run / "final"
    if (clip / "open_clip_config.json").is_file():
        return ["--model", str(clip), "--llm", "tiny"]
    return ["--model", "tiny"]


def _train(argv: list[str], out) -> dict:
    from mmfast.training.launch import run_in_process

    seconds = run_in_process("llava", "LLaVA", argv)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-5:]  # the last logged steps, averaged: one batch is noisy
    return {"seconds": seconds, "loss": sum(r["loss"] for r in tail) / len(tail),
            "tokens_per_s": rows[-1]["tokens_per_s"]}


def llava_stage1(ctx) -> dict:
    a = ctx.args
    s1, _, _ = _dirs(ctx)
    argv = ["--nproc", str(a.nproc), "--stage", "1", *_vision_args(ctx), "--data", str(ctx.world),
            "--out", str(s1), "--steps", str(a.llava_steps1), "--batch-size", str(a.llava_batch_size),
            "--lr", "2e-3", "--seed", str(a.seed), "--log-every", "5", "--threads", "1",
            "--vision-select-feature", a.llava_vision_select_feature]
    r = _train(argv, s1)
    return {"llava_stage1_final_loss": round(r["loss"], 4), "llava_stage1_seconds": round(r["seconds"], 1),
            "llava_vision_tower": _vision_args(ctx)[1]}


def stage2_mixture(world, out, other_share: float, seed: int) -> dict:
    """Write the stage-2 data mixture (like LLaVA-1.5's mix of instruction and VQA sets): every yes/no
    record of the world and a seeded ``other_share`` of each other type. Returns the count per type.

    The tiny LLM starts untrained and has about a thousand small steps: spent mostly on grounded yes/no
    questions it learns to look at the image; spread evenly over the long descriptions it does not."""
    import random
    from collections import Counter

    from mmfast.data.llava import load_llava_json
    from mmfast.utils.io import atomic_write_json

    if not 0.0 <= other_share <= 1.0:
        raise ValueError(f"other_share must be in [0, 1], got {other_share}")
    records = load_llava_json(world / "llava_instruct_train.json")
    rng = random.Random(seed)
    mix = [r for r in records if r.get("type") == "yesno" or rng.random() < other_share]
    for r in mix:
        r.pop("image_path", None)  # resolved again against --image-folder
    atomic_write_json(out, mix, indent=None)
    return dict(Counter(r.get("type", "?") for r in mix))


def llava_stage2(ctx) -> dict:
    a = ctx.args
    s1, s2, _ = _dirs(ctx)
    s2.mkdir(parents=True, exist_ok=True)
    mix = s2 / "stage2_mixture.json"
    counts = stage2_mixture(ctx.world, mix, a.llava_other_share, a.seed)
    argv = ["--nproc", str(a.nproc), "--stage", "2", *_vision_args(ctx), "--data", str(mix),
            "--image-folder", str(ctx.world), "--out", str(s2), "--steps", str(a.llava_steps2),
            "--batch-size", str(a.llava_batch_size), "--pretrain-mm-projector", str(s1 / "mm_projector.bin"),
            "--lr", str(a.llava_lr2), "--mm-projector-lr", "1e-3", "--group-by-modality-length",
            "--deepspeed-config", a.llava_ds_config, "--seed", str(a.seed), "--log-every", "5", "--threads", "1",
            "--image-attention", a.llava_image_attention, "--vision-select-feature", a.llava_vision_select_feature]
    if a.llava_vision_tower_lr is not None:
        argv += ["--tune-vision-tower", "--vision-tower-lr", str(a.llava_vision_tower_lr)]
    if a.llava_lora:
        argv += ["--lora", "--lora-r", str(a.llava_lora_r), "--lora-alpha", str(2 * a.llava_lora_r),
                 "--lora-dropout", "0", "--merge-lora",
                 # The tiny LLM was never pretrained: its embeddings and head train in full beside LoRA.
                 "--lora-modules-to-save", "lm_head,embed_tokens"]
    r = _train(argv, s2)
    return {"llava_stage2_final_loss": round(r["loss"], 4), "llava_stage2_seconds": round(r["seconds"], 1),
            "llava_stage2_tokens_per_s": r["tokens_per_s"],
            **{f"llava_stage2_records_{k}": v for k, v in sorted(counts.items())}}


def _load(ctx):
    from mmfast.models.llava.model import load_pretrained

    return load_pretrained(_dirs(ctx)[1] / "final", device="cpu", kernels=False)


def llava_eval(ctx) -> dict:
    from mmfast.data.llava import load_llava_json
    from mmfast.eval.pope import parse_pope
    from mmfast.utils.io import open_image

    llava = _load(ctx)
    records = load_llava_json(ctx.world / "llava_instruct_val.json")
    yesno = [r for r in records if r.get("type") == "yesno"]
    images, questions, labels = [], [], []
    for r in yesno:
        conv = r["conversations"]
        for i in range(0, len(conv), 2):
            images.append(r["image_path"])
            questions.append(conv[i]["value"].replace("<image>", "").strip())
            labels.append(parse_pope(conv[i + 1]["value"]))
    n = min(ctx.args.llava_eval_questions, len(questions))
    answers = []
    for s in range(0, n, 32):
        imgs = [open_image(p) for p in images[s: min(n, s + 32)]]
        answers += llava.answer(imgs, questions[s: min(n, s + 32)], max_new_tokens=8)
    preds = [parse_pope(a) for a in answers]
    acc = sum(p == lab for p, lab in zip(preds, labels)) / max(1, n)
    # A few open questions about held-out images, for a look at the answers.
    shown = [r for r in records if r.get("type") == "conversation"][:3]
    demo_q = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in shown]
    demo_a = llava.answer([open_image(r["image_path"]) for r in shown], demo_q, max_new_tokens=24)
    for r, q, ans in zip(shown, demo_q, demo_a):
        print(f"  [{r['image']}] Q: {q}\n    A: {ans}\n    (reference: {r['conversations'][1]['value']})")
    for q, ans in list(zip(questions, answers))[:3]:
        print(f"  Q: {q}  A: {ans}")
    # The yes-ratio of the answers shows a model that says "no" to everything (its accuracy is then the
    # share of "no" labels, not chance).
    yes_ratio = sum(p == "yes" for p in preds) / max(1, n)
    return {"llava_yesno_accuracy": round(acc, 4), "llava_yesno_yes_ratio": round(yes_ratio, 4),
            "llava_yesno_questions": n}


def pope(ctx) -> dict:
    from mmfast.eval import pope as P
    from mmfast.eval.adapters import get_adapter
    from mmfast.eval.pope_poll import poll

    _, s2, out = _dirs(ctx)
    out.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter(s2 / "final", device="cpu", dtype="float32", max_new_tokens=8)
    records = P.load_annotations(ctx.world / "objects_val.jsonl")
    n_images = min(ctx.args.pope_images, sum(len(r["objects"]) >= POPE_POSITIVES for r in records))
    if n_images < ctx.args.pope_images:  # a smaller --images world: fewer POPE images, said out loud
        print(f"  POPE: only {n_images} held-out images have {POPE_POSITIVES}+ objects; asking about those, "
              f"not {ctx.args.pope_images}")
    if n_images < 1:
        raise RuntimeError(f"POPE needs held-out images with at least {POPE_POSITIVES} objects; the world has none "
                           "(raise --images)")
    results, keys = {}, {"pope_images": n_images}
    for setting in POPE_SETTINGS:
        qs = P.build_questions(records, setting, num_images=n_images, num_positive=POPE_POSITIVES, seed=ctx.args.seed)
        P.write_jsonl(out / f"questions_{setting}.jsonl", qs)
        answers = out / f"answers_{setting}.jsonl"
        if answers.exists():
            answers.unlink()  # a demo run answers afresh
        # No LLaVA-1.5 suffix: the tiny model was never taught that instruction.
        poll(adapter, qs, ctx.world, answers, batch_size=32, prompt_suffix="")
        m = P.score(qs, answers)
        results[setting] = m
        for k in ("f1", "accuracy", "yes_ratio"):
            keys[f"pope_{setting}_{k}"] = round(m[k], 4)
    print(P.format_table(results))
    from mmfast.utils.io import atomic_write_json

    atomic_write_json(out / "scores.json", {"model": str(s2 / "final"), "results": results})
    return keys


__all__ = ["add_args", "llava_eval", "llava_stage1", "llava_stage2", "pope"]
