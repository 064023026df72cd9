"""LLaVA and POPE stages of ``mmfast demo`` (see :mod:`mmfast.demo`).

* ``llava_stage1``: feature alignment, projector only, ``plain`` template, DeepSpeed ZeRO-2 on 2 ranks.
  The vision tower is the CLIP the demo just trained (its ViT converted to a transformers
  ``CLIPVisionModel``, frozen), or the tiny preset's own tower when the CLIP stages did not run.
* ``llava_stage2``: end-to-end with LoRA on the tiny LLM (+ the projector), ``vicuna_v1``, ZeRO-3,
  LoRA merged into the exported llava-hf directory.
* ``llava_eval``: a few held-out questions, and yes/no accuracy on the held-out ``yesno`` turns.
* ``pope``: POPE's random / popular / adversarial question sets built from the held-out objects,
  polled through the evaluation adapter (``config.json`` says ``"mmfast_model": "llava"``), scored.
"""
from __future__ import annotations

import json
import time

POPE_SETTINGS = ("random", "popular", "adversarial")


def add_args(p) -> None:
    p.add_argument("--llava-steps1", type=int, default=40, help="LLaVA stage-1 steps")
    p.add_argument("--llava-steps2", type=int, default=150, help="LLaVA stage-2 (LoRA) steps")
    p.add_argument("--llava-batch-size", type=int, default=16, help="per rank")
    p.add_argument("--llava-lr2", type=float, default=3e-3, help="stage-2 LoRA learning rate")
    p.add_argument("--llava-lora-r", type=int, default=64)
    p.add_argument("--llava-eval-questions", type=int, default=100)
    p.add_argument("--pope-images", type=int, default=30, help="POPE images per setting (x6 questions)")


def _dirs(ctx):
    return ctx.out / "llava_stage1", ctx.out / "llava_stage2", ctx.out / "pope"


def _vision_args(ctx) -> list[str]:
    clip = ctx.clip_run / "final"
    if (clip / "open_clip_config.json").is_file():
        return ["--model", str(clip), "--llm", "tiny"]
    return ["--model", "tiny"]


def _train(argv: list[str], out) -> dict:
    from mmfast.train_launch import llava_main

    t0 = time.perf_counter()
    rc = llava_main(argv)
    if rc != 0:
        raise RuntimeError(f"LLaVA training failed (exit code {rc}); see the output above")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-5:]  # the last logged steps, averaged: one batch is noisy
    return {"seconds": time.perf_counter() - t0, "loss": sum(r["loss"] for r in tail) / len(tail),
            "tokens_per_s": rows[-1]["tokens_per_s"]}


def llava_stage1(ctx) -> dict:
    a = ctx.args
    s1, _, _ = _dirs(ctx)
    argv = ["--nproc", str(a.nproc), "--stage", "1", *_vision_args(ctx), "--data", str(ctx.world),
            "--out", str(s1), "--steps", str(a.llava_steps1), "--batch-size", str(a.llava_batch_size),
            "--lr", "2e-3", "--seed", str(a.seed), "--log-every", "5", "--threads", "1"]
    r = _train(argv, s1)
    return {"llava_stage1_final_loss": round(r["loss"], 4), "llava_stage1_seconds": round(r["seconds"], 1),
            "llava_vision_tower": _vision_args(ctx)[1]}


def llava_stage2(ctx) -> dict:
    a = ctx.args
    s1, s2, _ = _dirs(ctx)
    argv = ["--nproc", str(a.nproc), "--stage", "2", *_vision_args(ctx), "--data", str(ctx.world),
            "--out", str(s2), "--steps", str(a.llava_steps2), "--batch-size", str(a.llava_batch_size),
            "--pretrain-mm-projector", str(s1 / "mm_projector.bin"), "--lora", "--lora-r", str(a.llava_lora_r),
            "--lora-alpha", str(2 * a.llava_lora_r), "--lora-dropout", "0", "--merge-lora",
            # The tiny LLM was never pretrained: its embeddings and head train in full beside LoRA.
            "--lora-modules-to-save", "lm_head,embed_tokens",
            "--lr", str(a.llava_lr2), "--mm-projector-lr", "1e-3", "--group-by-modality-length",
            "--seed", str(a.seed), "--log-every", "5", "--threads", "1"]
    r = _train(argv, s2)
    return {"llava_stage2_final_loss": round(r["loss"], 4), "llava_stage2_seconds": round(r["seconds"], 1),
            "llava_stage2_tokens_per_s": r["tokens_per_s"]}


def _load(ctx):
    from mmfast.models.llava import load_pretrained

    return load_pretrained(_dirs(ctx)[1] / "final", device="cpu", kernels=False)


def llava_eval(ctx) -> dict:
    from mmfast.data.llava import load_llava_json
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
            labels.append("yes" if conv[i + 1]["value"].lower().startswith("yes") else "no")
    n = min(ctx.args.llava_eval_questions, len(questions))
    answers = []
    for s in range(0, n, 32):
        imgs = [open_image(p) for p in images[s: min(n, s + 32)]]
        answers += llava.answer(imgs, questions[s: min(n, s + 32)], max_new_tokens=4)
    preds = ["yes" if a.lower().startswith("yes") else "no" if a.lower().startswith("no") else "other" for a in answers]
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
    adapter = get_adapter(s2 / "final", device="cpu", dtype="float32", max_new_tokens=4)
    records = P.load_annotations(ctx.world / "objects_val.jsonl")
    results, keys = {}, {}
    for setting in POPE_SETTINGS:
        qs = P.build_questions(records, setting, num_images=ctx.args.pope_images, num_positive=3, seed=ctx.args.seed)
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
