"""The video half of ``mmfast train decoder`` (issue #24): NExT-GPT's tiny text-to-video pipeline on a world's clips.

    mmfast train decoder --nproc 2 --modality video --stage unet --data WORLD --out runs/dec/vunet \\
        --image-decoder mmfast/models/nextgpt/weights/image

AnimateDiff's layout (an ``AnimateDiffPipeline``): the frames go one by one through an image VAE, a
``UNetMotionModel`` (an image UNet with a motion module, a temporal transformer with sinusoidal frame positions,
after every block) denoises the (4, F, h, w) latents conditioned on a CLIP text encoder's states, and the VAE
decodes the frames again. As AnimateDiff grows its video model from Stable Diffusion, ours starts from the
trained image decoder (``--image-decoder``, a ``StableDiffusionPipeline`` folder: the shipped one or
``--modality image``'s export):

* its VAE, frozen (each rank encodes every training frame once, before the first step);
* its text encoder, trained on;
* its UNet, every weight (``UNetMotionModel.from_unet2d`` with a diffusers ``MotionAdapter``), and motion modules
  whose output projections are zeroed, so that the video UNet starts out as exactly the image decoder run on
  every frame alone (a test checks it), and whose first temporal attention starts with a head that reads the
  frame positions (without it a frame's place hardly reached it: :func:`mmfast.models.nextgpt.decoders.video_unet`);
  the training teaches it the motion.

Why not ModelScope / ZeroScope's ``UNet3DConditionModel`` (``TextToVideoSDPipeline``): its temporal layers have no
frame positions (a frame knows where it is only from the zero padding of the temporal convolutions at the clip's
ends), and a frame's place is what sets where the object is drawn. Grown the same way from the image decoder
(2026-12-04, 4-frame clips, batch 8 per rank, lr 5e-4, velocity loss), after 1000 of 2000 steps its clips moved
the wrong way as often as not (direction 0.22 on 32 held-out prompts, chance 0.25; class 0.11) at guidance 3 and 8,
and each step cost 20 % more than this UNet's. Neither is trained to target yet: docs/nextgpt_decoders.md.

One stage, ``--stage unet``: velocity prediction at zero terminal SNR (:data:`VIDEO_BETAS`: why) with a share ``--uncond-prob``
of captions dropped to "" for guidance. With ``--reverse-pairs`` (the default) half of every batch is the other
half's clips played backwards under their reversed captions (:func:`reverse_caption`, :func:`with_reversals`): pairs
that differ only in the order of the frames and the direction's words. At equal steps (2,000, single movers, batch
16) they lifted the held-out direction from 0.28 to 0.44 (class 0.32 -> 0.27); after 4,000 the clips move along the
caption's axis in 63 of 64, but which way along it is still a coin toss (docs/nextgpt_decoders.md).
Clips are ``--frames`` frames evenly spaced over the world's GIFs (first and last included), at ``--image-size``
pixels. The export (``final/pipeline``) is a plain ``AnimateDiffPipeline`` folder with a DDIM scheduler.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmfast.data._media import DIRECTIONS
from mmfast.training import diffusion_parts as D

# Velocity prediction on Stable Diffusion's schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"; diffusers' ``rescale_betas_zero_snr``, trailing timesteps),
# the plain MSE. On SD's own schedule the last training step keeps 0.068 x the clean latents (0.090 at DDIM's first
# step), enough of a clip's layout for the UNet to read where its object starts and which way it moves from the
# noise instead of the caption: a UNet trained so (the noise-prediction recipe, 5,946 steps) drew clips whose
# direction followed the real clip leaked into its starting noise 0.69 of the time, the caption's 0.09 of the time
# (the caption's direction flipped), and 0.28 from pure noise (docs/nextgpt_decoders.md). With zero terminal SNR
# the last step holds nothing of the clip, and the layout must come from the caption. ``--prediction-type epsilon``
# keeps SD's schedule (noise prediction is undefined at zero SNR).
VIDEO_BETAS = {**D.BETAS, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
               "prediction_type": "v_prediction"}


def video_betas(prediction_type: str = "v_prediction") -> dict:
    """The video recipe's scheduler settings for ``prediction_type``: :data:`VIDEO_BETAS` for velocity prediction,
    Stable Diffusion's schedule (the image decoder's) for noise prediction."""
    if prediction_type == "v_prediction":
        return dict(VIDEO_BETAS)
    if prediction_type == "epsilon":
        return {**D.BETAS, "prediction_type": "epsilon"}
    raise ValueError(f"--prediction-type {prediction_type!r}: expected 'v_prediction' or 'epsilon'")


# A world mover starts at the side opposite its motion and crosses the frame in a straight line
# (mmfast.data._media._video), so its clip played backwards is a world clip of the opposite direction: the world's
# direction whose step is the negated one.
OPPOSITE = {d: next(o for o, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-x, -y))
            for d, (x, y) in DIRECTIONS.items()}


def reverse_caption(caption: str) -> str:
    """The caption of ``caption``'s clip played backwards: every mover's direction exchanged for its opposite
    ("a red car moving to the left and a blue star moving up" -> "... to the right and ... down")."""
    parts = []
    for part in caption.split(" and "):
        head, sep, direction = part.rpartition(" moving ")
        if not sep or direction not in OPPOSITE:
            raise ValueError(f"caption {caption!r}: {part!r} is not '<a colour class> moving <direction>'")
        parts.append(f"{head} moving {OPPOSITE[direction]}")
    return " and ".join(parts)


def with_reversals(latents: torch.Tensor, ids: torch.Tensor, ids_reversed: torch.Tensor):
    """A batch of (B, C, F, h, w) clip latents and their caption ids, followed by the same clips played backwards
    (frames reversed) with their reversed captions' ids (:func:`reverse_caption`): 2B clips in pairs that differ
    only in the order of their frames and the words of their directions."""
    return torch.cat([latents, latents.flip(2)]), torch.cat([ids, ids_reversed])


def frame_index(n: int, k: int) -> list[int]:
    """``k`` frame indices evenly spaced over ``n`` frames, the first and last included."""
    if n < k:
        raise ValueError(f"a clip of {n} frames cannot give {k}")
    return [int(i) for i in np.round(np.linspace(0, n - 1, k))]


class WorldVideos:
    """A world split's clips: ``pixels`` (N, F, 3, S, S) in [-1, 1] and ``captions``."""

    def __init__(self, world: Path, size: int, frames: int, split: str = "train", max_samples: int | None = None):
        from PIL import Image

        from mmfast.data.media import read_video, world_t2x

        records, _ = world_t2x(world, "video", split)
        records = records[:max_samples]
        if not records:
            raise ValueError(f"--data {world}: no {split} videos in t2x_video.json")
        clips = []
        for r in records:
            ims = read_video(r["path"])
            ims = [ims[i] for i in frame_index(len(ims), frames)]
            ims = [im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC) for im in ims]
            clips.append(np.stack([np.asarray(im, dtype=np.float32) for im in ims]))
        self.pixels = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3) / 127.5 - 1.0
        self.captions = [r["caption"] for r in records]


def build_pipeline(image_pipe, prediction_type: str = "v_prediction"):
    """An ``AnimateDiffPipeline`` (DDPM scheduler for training) from an image decoder pipeline: its VAE, tokenizer
    and text encoder, and the video UNet :func:`mmfast.models.nextgpt.decoders.video_unet` grows from its UNet."""
    from diffusers import AnimateDiffPipeline, DDPMScheduler

    from mmfast.models.nextgpt.decoders import video_unet

    return AnimateDiffPipeline(vae=image_pipe.vae, text_encoder=image_pipe.text_encoder, tokenizer=image_pipe.tokenizer,
                               unet=video_unet(image_pipe.unet), motion_adapter=None,
                               scheduler=DDPMScheduler(**video_betas(prediction_type)))


def train_unet(run, args, data: WorldVideos) -> int:
    from mmfast.models.nextgpt.shipped import read_pipeline
    image = read_pipeline(args.image_decoder)
    pipe = build_pipeline(image, args.prediction_type)
    vae = pipe.vae.to(run.device).requires_grad_(False).eval()
    pipe.text_encoder.to(run.device).requires_grad_(True).train()
    pipe.unet.to(run.device).train()
    n, f = data.pixels.shape[:2]
    mean, std = D.encode_posteriors(vae, data.pixels.flatten(0, 1).to(run.device))  # the same on every rank
    mean, std = (x.reshape(n, f, *x.shape[1:]).transpose(1, 2) for x in (mean, std))  # (N, 4, F, h, w)
    scale = vae.config.scaling_factor
    ids = D.token_ids(pipe, data.captions)
    ids_rev = D.token_ids(pipe, [reverse_caption(c) for c in data.captions]) if args.reverse_pairs else None
    module = D.UNetModule(pipe, args.uncond_prob, args.snr_gamma, context_per_frame=True)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = run.initialize(module, *D.optimizer(run, args, params))
    banner = (f"video decoder {args.image_size}px, latents {tuple(mean.shape[1:])} x {scale:.3f}, {n} clips, "
              f"{sum(p.numel() for p in params)} params train"
              + (", half of each batch its clips reversed" if args.reverse_pairs else ""))
    # --reverse-pairs: batch_size / 2 clips a rank, each followed by its reversal (with_reversals)
    per_rank = args.batch_size // 2 if args.reverse_pairs else args.batch_size
    for step, rows in run.steps(D.batches(run, args, n, per_rank), args.steps, "train decoder", banner):
        latents = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * scale
        cond = ids[rows]
        if args.reverse_pairs:
            latents, cond = with_reversals(latents, cond, ids_rev[rows])
        loss = engine(latents.to(run.dtype), cond.to(run.device))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            D.log_step(run, step, loss, module, ("loss", "mse"))
    state = run.gather_state(module)
    run.export(lambda d: D.export_pipeline(pipe, state, Path(d) / "pipeline",
                                           video_betas(args.prediction_type)))
    return run.finish({"modality": "video", "stage": "unet", "image_decoder": str(args.image_decoder),
                       "frames": f, "image_size": args.image_size, "snr_gamma": args.snr_gamma,
                       "prediction_type": args.prediction_type, "reverse_pairs": args.reverse_pairs,
                       "final": str(run.out / "final" / "pipeline")}, state)


STAGES = {"unet": train_unet}

__all__ = ["OPPOSITE", "STAGES", "VIDEO_BETAS", "WorldVideos", "build_pipeline", "frame_index", "reverse_caption",
           "video_betas", "with_reversals"]
