"""NExT-GPT stages of ``mmfast demo`` (see :mod:`mmfast.demo`), on the world's text<->image pairs.

* ``nextgpt_stage1``: encoding-side alignment (input projection, captioning LM loss), ZeRO-2 on 2 ranks.
  The image encoder is the CLIP the demo trained (its ViT as a transformers ``CLIPVisionModel``, frozen),
  and the LLM the tiny LLaVA's tuned language model (stage 2, LoRA merged; it has read the world's
  text), as NExT-GPT starts from a pretrained Vicuna. Without those stages the tiny preset's random
  parts stand in.
* ``nextgpt_stage2``: decoding-side alignment for images and audio (output projections + signal-token rows;
  LM loss on the replies, which are the signal run alone for text->X requests and captions for the
  X->text negatives, and the per-token Euclidean alignment loss against each decoder's text encoder).
* ``nextgpt_stage3``: modality-switching instruction tuning (the LLM's LoRA on two-turn MosIT dialogues among
  stage 2's records; the output projections stay as stage 2 aligned them), ``--nextgpt-steps3`` (0 skips it).
* ``nextgpt_eval``: text->image on held-out prompts (one per validation image, naming its main object)
  through the trained tiny image decoder shipped in the package (``shipped:image``, issue #24): fed its own
  text encoder (the ceiling: ``nextgpt_t2i_top1_decoder``) and through NExT-GPT, the LLM's ``[IMG0]..[IMG3]``
  states teacher-forced through the output projection (``nextgpt_t2i_top1``). Both are judged by the demo's
  CLIP: zero-shot top-1 of the requested main object (16 classes, chance 0.06) and the CLIPSIM margin
  (matched minus mismatched pairs); ``nextgpt_samples.png`` shows the first prompts with both images. Free
  greedy generation is measured too: ``nextgpt_signal_emit_rate`` is the share of held-out text->image
  prompts whose reply starts an ``[IMG0]`` run, ``nextgpt_signal_emit_rate_captioning`` the same for held-out
  captioning prompts (an image plus "Describe this image."), which should stay near 0, and
  ``nextgpt_signal_emit_rate_two_turn`` (``_audio``) the share of two-turn exchanges (the model captions a
  held-out image, then is asked for an image / a sound) whose second reply opens that run. The model measured is
  stage 3's when the demo ran it (``nextgpt_evaluated``), else the last stage-2 run's.
  Text->audio the same way, for the captions of the world's held-out clips (one per class), through the
  shipped audio decoder (``shipped:audio``): fed its own text encoder (``nextgpt_t2a_top1_decoder``) and through
  NExT-GPT's ``[AUD0..]`` states (``nextgpt_t2a_top1``), judged by a classifier of the world's real train clips
  (:mod:`mmfast.eval.t2a`); the clips are written to ``nextgpt_samples_audio/``.
  With ``--videos N`` text->video the same way, for the captions of the world's first held-out single-mover
  videos, through the preset's video decoder (the tiny preset's is still random): ``nextgpt_t2v_top1`` (the requested class, per frame) and
  ``nextgpt_t2v_direction_acc`` (the requested motion), judged by a classifier of the world's real train frames
  and the frames' foreground path (:mod:`mmfast.eval.t2v`), beside the decoder fed its own text encoder
  (``*_decoder``); the GIFs are written to ``nextgpt_samples_video/``.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path


def add_args(p) -> None:
    p.add_argument("--nextgpt-steps1", type=int, default=60, help="NExT-GPT stage-1 steps")
    p.add_argument("--nextgpt-steps2", type=int, default=2000, help="NExT-GPT stage-2 steps")
    p.add_argument("--nextgpt-steps2-audio", type=int, default=1000,
                   help="NExT-GPT stage-2 steps of the audio output projection (after the image run)")
    p.add_argument("--nextgpt-steps2-video", type=int, default=1000,
                   help="NExT-GPT stage-2 steps of the video output projection (after the audio run)")
    p.add_argument("--nextgpt-steps3", type=int, default=300,
                   help="NExT-GPT stage-3 steps (LoRA instruction tuning after stage 2; 0 skips it)")
    p.add_argument("--nextgpt-video-prompts", type=int, default=32,
                   help="held-out text->video prompts (the first val videos with one mover)")
    p.add_argument("--nextgpt-batch-size", type=int, default=8, help="per rank")
    p.add_argument("--nextgpt-eval-prompts", type=int, default=64,
                   help="held-out text->image prompts (one per val image naming its main object)")
    p.add_argument("--nextgpt-emit-prompts", type=int, default=16,
                   help="held-out prompts of each kind for the free-generation signal emission rates")
    p.add_argument("--nextgpt-diffusion-steps", type=int, default=20, help="DDIM steps of the image decoder")
    p.add_argument("--nextgpt-guidance", type=float, default=4.0, help="classifier-free guidance of the image decoder")
    p.add_argument("--nextgpt-audio-guidance", type=float, default=3.0,
                   help="classifier-free guidance of the audio decoder")
    p.add_argument("--nextgpt-video-guidance", type=float, default=3.0,
                   help="classifier-free guidance of the video decoder")


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
    mean = {k: sum(r[k] for r in tail) / len(tail) for k in tail[-1]
            if k in ("loss", "lm", "lm_signal", "align_image", "align_audio", "align_video")}
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


def _media(ctx) -> list[str]:
    return [m for m in ("audio", "video") if (Path(ctx.world) / f"t2x_{m}.json").is_file()]


def nextgpt_stage2(ctx) -> dict:
    s1, s2 = _dirs(ctx)
    # The signal-token rows start from random and must outscore the frozen LLM's first reply token within a
    # hundred steps: they get a larger lr than the output projection. The projection needs far longer: on the
    # demo world, NExT-GPT's t2i top-1 was 0.03 after 100 steps, 0.58 after 600, 0.80 after 1500, 0.86
    # after 2000 (decoder alone 0.95); an lr of 5e-3 instead of 2e-3 collapsed it (0.05 after 600).
    argv = _common(ctx, 2, s2) + ["--init-from", str(s1 / "final"), "--steps", str(ctx.args.nextgpt_steps2),
                                  "--lr", "2e-3", "--signal-lr", "2e-2"]
    r = _train(argv, s2)
    media = {}
    chain = _stage2_chain(ctx)
    for prev, run in itertools.pairwise(chain):
        media.update(_stage2_media(ctx, run.name.rsplit("_", 1)[1], prev))
    return {**media, "nextgpt_stage2_alignment_loss": round(r["align_image"], 4),
            "nextgpt_stage2_first_alignment_loss": round(r["first"]["align_image"], 4),
            "nextgpt_stage2_signal_lm_loss": round(r["lm_signal"], 4),
            "nextgpt_stage2_first_signal_lm_loss": round(r["first"]["lm_signal"], 4),
            "nextgpt_stage2_final_loss": round(r["loss"], 4), "nextgpt_stage2_seconds": round(r["seconds"], 1)}


def _stage3_dir(ctx) -> Path:
    return ctx.out / "nextgpt_stage3"


def _evaluated(ctx) -> Path:
    """The run ``nextgpt_eval`` measures: stage 3 when the demo runs it, else the last stage-2 run."""
    return _stage3_dir(ctx) if getattr(ctx.args, "nextgpt_steps3", 0) > 0 else _stage2_chain(ctx)[-1]


STAGE3_LR = 1e-3  # LoRA + input projections; 2e-4 left the two-turn requests where stage 2 had them (docs)
STAGE3_MOSIT_SHARE = 0.25  # of stage 3's records; at 0.5 a captioning prompt in 16 opened a run (docs)


def nextgpt_stage3(ctx) -> dict:
    """Stage 3, modality-switching instruction tuning: the LLM's LoRA (and the input projections) on two-turn
    MosIT dialogues (understand an image or a sound, then produce one) shuffled among stage 2's records (requests
    and captioning negatives, each medium's pairs repeated as in its stage-2 run), after the last stage-2 run.
    The output projections stay as stage 2 aligned them; the alignment loss still reaches the LoRA through them,
    so it learns to keep the signal states they read. Nothing when ``--nextgpt-steps3 0``."""

    a = ctx.args
    if a.nextgpt_steps3 <= 0:
        return {"nextgpt_stage3_steps": 0}
    out, media = _stage3_dir(ctx), _media(ctx)
    argv = _common(ctx, 3, out) + ["--init-from", str(_stage2_chain(ctx)[-1] / "final"),
                                   "--steps", str(a.nextgpt_steps3), "--lr", str(STAGE3_LR),
                                   "--modalities", ",".join(["image", *media]), "--projections", "",
                                   "--mosit-share", str(STAGE3_MOSIT_SHARE), *_media_mix(ctx, media)]
    r = _train(argv, out)
    return {"nextgpt_stage3_steps": a.nextgpt_steps3, "nextgpt_stage3_final_loss": round(r["loss"], 4),
            "nextgpt_stage3_first_loss": round(r["first"]["loss"], 4),
            "nextgpt_stage3_alignment_loss": round(r["align_image"], 4),
            "nextgpt_stage3_seconds": round(r["seconds"], 1)}


def _stage2_chain(ctx) -> list[Path]:
    """The stage-2 runs' folders in order, each starting from the one before: the image run, then the audio and
    video projections' runs where the world has clips and videos (the last one is the model evaluated)."""
    _, s2 = _dirs(ctx)
    return [s2] + [ctx.out / f"nextgpt_stage2_{m}" for m in _media(ctx)]


MEDIA_NEGATIVES = 0.25  # share of a medium's (repeated) pairs also given as captioning negatives in its run


def _media_mix(ctx, media: list[str]) -> list[str]:
    """``--repeat`` / ``--negatives`` of a run over the image records and those of ``media``: each medium's pairs
    repeated to about as many records as the image pairs' requests and negatives, a :data:`MEDIA_NEGATIVES`
    share of them captioning negatives (every image pair one)."""
    from mmfast.models.nextgpt import data as nd

    n_image = len(nd.t2x_pairs(ctx.world, "image"))
    repeat = {m: max(1, round(2 * n_image / max(1, len(nd.t2x_pairs(ctx.world, m))))) for m in media}
    return ["--repeat", ",".join(f"{m}={k}" for m, k in repeat.items()),
            "--negatives", ",".join(["image=1", *(f"{m}={MEDIA_NEGATIVES}" for m in media)])]


def _stage2_media(ctx, modality: str, prev: Path) -> dict:
    """Stage 2 for audio or video, after the run before it: that modality's output projection on its text->X
    records, among the image run's records (text->image requests and captioning negatives) and those of the
    media trained before it (each medium's pairs repeated to about as many records as the image ones, with a
    :data:`MEDIA_NEGATIVES` share of captioning negatives), where the LM-head rows of every signal token so far
    learn which run, if any, a prompt opens. No embedding row moves: those shape the states the output
    projections read, and the image projection was fitted to them in the image run.

    What was measured on the way (docs/nextgpt_decoders.md, the demo world): trained among the image run's
    records the audio projection hardly learned (the world's 496 clips are 6 % of the pairs: alignment loss
    1.0, the norm of its targets; t2a top-1 0.06); alone, with every row fixed, it learned (t2a 0.94) but
    NExT-GPT never opened an ``[AUD0]`` run by itself; with the ``[IMG]`` rows' embeddings trained on as well
    every run opened where it should, but t2i fell from 0.83 to 0.70."""

    out = ctx.out / f"nextgpt_stage2_{modality}"
    steps = getattr(ctx.args, f"nextgpt_steps2_{modality}")
    media = _media(ctx)[: _media(ctx).index(modality) + 1]  # this one and those trained before it
    argv = _common(ctx, 2, out) + ["--init-from", str(prev / "final"), "--steps", str(steps), "--lr", "2e-3",
                                   "--signal-lr", "2e-2", "--modalities", ",".join(["image", *media]),
                                   *_media_mix(ctx, media),
                                   "--rows", "", "--head-rows", ",".join(["image", *media]),
                                   "--projections", modality]
    r = _train(argv, out)
    return {f"nextgpt_stage2_{modality}_alignment_loss": round(r[f"align_{modality}"], 4),
            f"nextgpt_stage2_{modality}_first_alignment_loss": round(r["first"][f"align_{modality}"], 4),
            f"nextgpt_stage2_{modality}_seconds": round(r["seconds"], 1)}


def _conditions(model, captions, modality: str = "image"):
    """Teacher-forced text->``modality`` conditioning (N, Q, C) for ``captions``."""
    import random

    import torch

    from mmfast.models.nextgpt import data as nd

    rng = random.Random(0)
    items = [nd.tokenize_dialogue(nd.t2x_record(modality, {"caption": c, "path": ""}, rng, reply_text=False),
                                  model.tokenizer, model.n_input_tokens) for c in captions]
    batch = nd.collate(items, model.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden, emb = model.hidden(batch["input_ids"], batch["attention_mask"], {})
        return model.output_proj[modality](model.signal_states(modality, batch["input_ids"], hidden, emb))


def _opens_run(model, token_ids) -> bool:
    """Whether a reply holds the first signal token of any modality."""
    return any(ids[0] in token_ids for ids in model.signal_ids.values())


def _emission(model, world, modality: str, pairs, max_new_tokens: int) -> tuple[float, float]:
    """Shares of free greedy replies to ``modality`` pairs: text->X prompts (cycling through the prompt templates)
    whose reply holds that modality's first signal token, and captioning prompts on the same media whose reply
    opens any signal run."""
    from mmfast.models.nextgpt import data as nd

    first, asks, tells = model.signal_ids[modality][0], nd.T2X_PROMPTS[modality], nd.X2T_PROMPTS[modality]
    t2x = x2t = 0
    for i, p in enumerate(pairs):
        q = asks[i % len(asks)].format(c=p["caption"])
        t2x += first in model.generate(q, max_new_tokens=max_new_tokens, decode=False)["token_ids"]
        media = {f"{modality}s": [str(Path(world) / p["path"])]}
        x2t += _opens_run(model, model.generate(tells[i % len(tells)], **media, max_new_tokens=max_new_tokens,
                                                decode=False)["token_ids"])
    n = max(1, len(pairs))
    return round(t2x / n, 3), round(x2t / n, 3)


def emit_rates(model, world, pairs, max_new_tokens: int = 12) -> dict:
    """:func:`_emission` of text->image pairs: ``[IMG0]`` after requests, any run after image captioning."""
    asked, captioning = _emission(model, world, "image", pairs, max_new_tokens)
    return {"nextgpt_signal_emit_rate": asked, "nextgpt_signal_emit_rate_captioning": captioning,
            "nextgpt_emit_prompts": len(pairs)}


def audio_emit_rate(model, world, pairs, max_new_tokens: int = 12) -> dict:
    """:func:`_emission` of text->audio pairs: whether NExT-GPT, asked for a sound, answers with an ``[AUD0]``
    run, and any run after audio captioning."""
    asked, captioning = _emission(model, world, "audio", pairs, max_new_tokens)
    return {"nextgpt_signal_emit_rate_audio": asked, "nextgpt_signal_emit_rate_captioning_audio": captioning,
            "nextgpt_emit_prompts_audio": len(pairs)}


def two_turn_emit_rate(model, world, pairs, modality: str, max_new_tokens: int = 12) -> float:
    """Share of two-turn exchanges (the model's own caption of a held-out image, then a request for
    ``modality``: the ``pairs``' captions, cycling through the prompt templates) whose second reply opens that
    modality's run: what stage 3 teaches."""
    from mmfast.models.nextgpt import data as nd

    first, tell, asks = model.signal_ids[modality][0], nd.X2T_PROMPTS["image"][0], nd.T2X_PROMPTS[modality]
    images = nd.t2x_pairs(world, "image", "val")[: len(pairs)]
    hits = 0
    for i, (img, p) in enumerate(zip(images, pairs)):
        path = [str(Path(world) / img["path"])]
        caption = model.generate(tell, images=path, max_new_tokens=max_new_tokens)["text"]
        history = [{"from": "human", "value": nd.PLACEHOLDERS["image"] + "\n" + tell},
                   {"from": "gpt", "value": caption}]
        q = asks[i % len(asks)].format(c=p["caption"])
        hits += first in model.generate(q, images=path, history=history, max_new_tokens=max_new_tokens,
                                        decode=False)["token_ids"]
    return round(hits / max(1, min(len(images), len(pairs))), 3)


def _clip_scores(clip, classes: list[str], images, captions: list[str], labels: list[int]) -> dict:
    """The demo CLIP's zero-shot top-1 of ``images`` against ``labels`` and the CLIPSIM margin (matched minus
    mismatched pairs), as ``mmfast eval t2i`` computes them."""
    import torch

    from mmfast.eval import t2i
    from mmfast.eval.zeroshot import SINGLE_TEMPLATE, zeroshot_classifier

    w = zeroshot_classifier(clip, classes, [SINGLE_TEMPLATE])
    s = t2i.scores(t2i.clip_image_features(clip, torch.as_tensor(images)), t2i.clip_text_features(clip, captions), w,
                   torch.tensor(labels))
    return {"top1": round(s["top1"], 4), "margin": round(s["margin"], 4), "clipsim": round(s["clipsim"], 4),
            "clipsim_mismatched": round(s["clipsim_mismatched"], 4)}


def save_samples(path: Path, prompts: list[str], columns: dict, scale: int = 4, rows: int = 8) -> None:
    """A PNG grid: one row per prompt (its text, then one image per column: e.g. the decoder fed its own text
    encoder, and the NExT-GPT path), for a person to look at."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    n = min(rows, len(prompts))
    side = next(iter(columns.values())).shape[1] * scale
    text_w, pad = 360, 4
    grid = Image.new("RGB", (text_w + len(columns) * (side + pad), 18 + n * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((text_w + c * (side + pad), 2), name, fill="black")
    for r in range(n):
        y = 18 + r * (side + pad)
        draw.multiline_text((4, y + 2), "\n".join(textwrap.wrap(prompts[r], 58)), fill="black")
        for c, imgs in enumerate(columns.values()):
            im = Image.fromarray((np.clip(np.asarray(imgs[r]), 0, 1) * 255).round().astype(np.uint8))
            grid.paste(im.resize((side, side), Image.NEAREST), (text_w + c * (side + pad), y))
    grid.save(path)


def _audio_eval(ctx, model) -> dict:
    """Text->audio for the world's held-out clips' captions through the shipped audio decoder, fed its own text
    encoder and through NExT-GPT, judged by the classifier of the world's real train clips (:mod:`mmfast.eval.t2a`);
    the clips are written to ``nextgpt_samples_audio/``. Nothing when the world has no clips."""
    import torch

    from mmfast.data._media import write_wav
    from mmfast.eval.t2a import SAMPLE_RATE, AudioJudge, load_clips
    from mmfast.models.nextgpt import decoders as ndec

    a = ctx.args
    if not (Path(ctx.world) / "t2x_audio.json").is_file():
        return {"nextgpt_t2a_top1": None}
    pipe = model.pipes["audio"]
    judge = AudioJudge.fit(ctx.world)
    waves, labels, captions = load_clips(ctx.world, "val")
    kw = {"steps": a.nextgpt_diffusion_steps, "seed": a.seed, "guidance_scale": a.nextgpt_audio_guidance,
          "audio_length_in_s": waves.shape[1] / SAMPLE_RATE}
    alone = torch.as_tensor(ndec.decode("audio", pipe, ndec.text_condition("audio", pipe, captions), **kw))
    through = torch.as_tensor(ndec.decode("audio", pipe, _conditions(model, captions, "audio"), **kw))
    folder = ctx.out / "nextgpt_samples_audio"
    for i, (x, y) in enumerate(zip(alone, through)):
        write_wav(folder / f"{i:02d}_decoder.wav", x.numpy())
        write_wav(folder / f"{i:02d}_nextgpt.wav", y.numpy())
    dec, ng = judge.accuracy(alone, labels), judge.accuracy(through, labels)
    return {"nextgpt_t2a_top1": round(ng, 4), "nextgpt_t2a_top1_decoder": round(dec, 4),
            "nextgpt_t2a_top1_ratio": round(ng / dec, 3) if dec else None,
            "nextgpt_t2a_real_top1": round(judge.accuracy(waves, labels), 4), "nextgpt_t2a_prompts": len(labels),
            "nextgpt_audio_decoder": str(model.cfg["decoders"]["audio"])}


def _video_eval(ctx, model) -> dict:
    """Text->video for the world's first held-out single-mover videos' captions through the shipped video decoder,
    fed its own text encoder and through NExT-GPT, judged per frame by the classifier of the world's real train
    frames and by the foreground's path (:mod:`mmfast.eval.t2v`); the GIFs are written to
    ``nextgpt_samples_video/``. Nothing when the world has no videos."""
    from mmfast.eval.t2v import FrameJudge, as_gifs, judge, load_videos, save_gifs
    from mmfast.models.nextgpt import decoders as ndec

    a = ctx.args
    if not (Path(ctx.world) / "t2x_video.json").is_file():
        return {"nextgpt_t2v_top1": None, "nextgpt_t2v_direction_acc": None}
    pipe = model.pipes["video"]
    frames = FrameJudge.fit(ctx.world, seed=a.seed)
    real, captions, movers = (x[: a.nextgpt_video_prompts] for x in load_videos(ctx.world, "val", single=True))
    kw = {"steps": a.nextgpt_diffusion_steps, "seed": a.seed, "guidance_scale": a.nextgpt_video_guidance,
          "num_frames": real[0].shape[0]}
    # judged as their GIFs hold them (at most 256 colours a frame)
    alone = as_gifs(ndec.decode("video", pipe, ndec.text_condition("video", pipe, captions), **kw))
    through = as_gifs(ndec.decode("video", pipe, _conditions(model, captions, "video"), **kw))
    folder = ctx.out / "nextgpt_samples_video"
    names = [f"{i:02d}_{m[0][0]}_{m[0][1].replace(' ', '_')}" for i, m in enumerate(movers)]
    save_gifs(alone, folder, [f"{n}_decoder.gif" for n in names])
    save_gifs(through, folder, [f"{n}_nextgpt.gif" for n in names])
    dec, ng, ceiling = judge(frames, alone, movers), judge(frames, through, movers), judge(frames, real, movers)
    return {"nextgpt_t2v_top1": round(ng["top1"], 4), "nextgpt_t2v_direction_acc": round(ng["direction_acc"], 4),
            "nextgpt_t2v_top1_decoder": round(dec["top1"], 4),
            "nextgpt_t2v_direction_acc_decoder": round(dec["direction_acc"], 4),
            "nextgpt_t2v_top1_ratio": round(ng["top1"] / dec["top1"], 3) if dec["top1"] else None,
            "nextgpt_t2v_direction_ratio": round(ng["direction_acc"] / dec["direction_acc"], 3)
            if dec["direction_acc"] else None,
            "nextgpt_t2v_real_top1": round(ceiling["top1"], 4),
            "nextgpt_t2v_real_direction_acc": round(ceiling["direction_acc"], 4), "nextgpt_t2v_prompts": len(captions),
            "nextgpt_video_decoder": str(model.cfg["decoders"]["video"])}


def nextgpt_eval(ctx) -> dict:
    """Text->image on held-out prompts through the shipped trained decoder: fed its own text encoder (the
    ceiling) and through NExT-GPT (LLM + output projection), both judged by the demo's CLIP; then the
    free-generation emission rates."""
    from mmfast.eval import t2i
    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt import decoders as ndec
    from mmfast.models.nextgpt.model import load_pretrained

    a = ctx.args
    model = load_pretrained(_evaluated(ctx) / "final", device="cpu", kernels=False)
    pipe = model.pipes["image"]
    rows = t2i.heldout_prompts(ctx.world, a.nextgpt_eval_prompts)
    prompts, labels = [r[1] for r in rows], [r[2] for r in rows]
    g, steps = a.nextgpt_guidance, a.nextgpt_diffusion_steps
    alone = t2i.generate(pipe, prompts, seed=a.seed, steps=steps, guidance_scale=g, batch_size=len(prompts))
    through = ndec.decode("image", pipe, _conditions(model, prompts), steps=steps, seed=a.seed, guidance_scale=g)
    ctx.out.mkdir(parents=True, exist_ok=True)
    save_samples(ctx.out / "nextgpt_samples.png", prompts, {"decoder (its text encoder)": alone, "NExT-GPT": through})
    pairs = nd.t2x_pairs(ctx.world, "image", "val")[: a.nextgpt_emit_prompts]
    out = {"nextgpt_eval_prompts": len(prompts), "nextgpt_guidance": g, "nextgpt_diffusion_steps": steps,
           "nextgpt_image_decoder": str(model.cfg["decoders"]["image"]), **emit_rates(model, ctx.world, pairs)}
    out["nextgpt_signal_emit_rate_two_turn"] = two_turn_emit_rate(model, ctx.world, pairs, "image")
    if (Path(ctx.world) / "t2x_audio.json").is_file():
        audio = nd.t2x_pairs(ctx.world, "audio", "val")[: a.nextgpt_emit_prompts]
        out.update(audio_emit_rate(model, ctx.world, audio))
        out["nextgpt_signal_emit_rate_two_turn_audio"] = two_turn_emit_rate(model, ctx.world, audio, "audio")
    out["nextgpt_evaluated"] = _evaluated(ctx).name
    out.update(_audio_eval(ctx, model))
    out.update(_video_eval(ctx, model))
    clip_dir = _clip_dir(ctx)
    if clip_dir is None:
        return {**out, "nextgpt_t2i_top1": None, "nextgpt_clipsim_margin": None}
    from mmfast.models.clip.model import create_model

    clip = create_model(None, pretrained=clip_dir, device="cpu", kernels=False).eval()
    classes = json.loads((Path(ctx.world) / "classes.json").read_text(encoding="utf-8"))
    dec = _clip_scores(clip, classes, alone, prompts, labels)
    ng = _clip_scores(clip, classes, through, prompts, labels)
    return {**out, "nextgpt_t2i_top1": ng["top1"], "nextgpt_clipsim_margin": ng["margin"],
            "nextgpt_clipsim": ng["clipsim"], "nextgpt_clipsim_random_pairs": ng["clipsim_mismatched"],
            "nextgpt_t2i_top1_decoder": dec["top1"], "nextgpt_clipsim_margin_decoder": dec["margin"],
            "nextgpt_t2i_top1_ratio": round(ng["top1"] / dec["top1"], 3) if dec["top1"] else None}


__all__ = ["add_args", "audio_emit_rate", "emit_rates", "nextgpt_eval", "nextgpt_stage1", "nextgpt_stage2",
           "nextgpt_stage3", "save_samples", "two_turn_emit_rate"]
