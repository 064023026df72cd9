"""CLIP stages of ``mmfast demo`` (see :mod:`mmfast.demo`): generate the world, train the tiny CLIP with
DeepSpeed ZeRO-2 on 2 processes, then zero-shot (single template vs the 80-template ensemble) and a linear
probe on the held-out split. Each stage takes the demo's context and returns summary keys.
"""
from __future__ import annotations

import json


def clip_world(ctx) -> dict:
    import time

    from mmfast.data._media import write_audio, write_videos
    from mmfast.data.synthetic import make_world

    a = ctx.args
    t0 = time.perf_counter()
    s = make_world(ctx.world, a.images, a.image_size, a.seed, media=False)
    # the clips and videos NExT-GPT's text->audio and text->video train and are judged on (not the image pairs of
    # the media set: the image stages read the captions)
    audio = write_audio(ctx.world, a.seed, a.audio_per_class)
    videos = write_videos(ctx.world, a.seed, a.image_size, a.videos)["n_videos"] if a.videos > 0 else 0
    return {"world_images": s["n_train"] + s["n_val"], "world_audio_clips": audio["n_audio"], "world_videos": videos,
            "world_seconds": round(time.perf_counter() - t0, 2)}


def clip_train(ctx) -> dict:
    from mmfast.training.launch import run_in_process

    a = ctx.args
    argv = ["--nproc", str(a.nproc), "--config", a.clip_model, "--data", str(ctx.world), "--out", str(ctx.clip_run),
            "--deepspeed-config", "zero2", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--lr", str(a.lr), "--warmup", str(max(1, a.steps // 10)), "--seed", str(a.seed),
            "--log-every", "10"]
    wall = run_in_process("clip", "CLIP", argv)
    train = json.loads((ctx.clip_run / "train_summary.json").read_text())
    last = json.loads((ctx.clip_run / "metrics.jsonl").read_text().strip().splitlines()[-1])
    return {"clip_train_seconds": round(wall, 1), "clip_train_loop_seconds": train["train_seconds"],
            "clip_train_steps": train["steps"], "clip_final_loss": round(last["loss"], 4)}


def clip_eval(ctx) -> dict:
    from mmfast.eval import zeroshot as zs
    from mmfast.models.clip.model import create_model

    model = create_model(None, pretrained=ctx.clip_run / "final", device="cpu", kernels=False).eval()
    ens = zs.zeroshot_eval(model, ctx.world, "openai_imagenet")
    single = zs.zeroshot_eval(model, ctx.world, "single")
    probe = zs.linear_probe(model, ctx.world)
    return {"clip_zeroshot_top1": round(ens["top1"], 4), "clip_zeroshot_top5": round(ens["top5"], 4),
            "clip_zeroshot_top1_single_template": round(single["top1"], 4),
            "clip_linear_probe_top1": round(probe["top1"], 4), "clip_eval_images": ens["n"]}
