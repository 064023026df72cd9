"""Train NExT-GPT's tiny image decoder (a diffusers StableDiffusionPipeline) on a synthetic world's captions; the
audio decoder (``--modality audio``, an AudioLDMPipeline) is :mod:`.audio_decoder`, the video decoder
(``--modality video``, an AnimateDiffPipeline grown from the image one) :mod:`.video_decoder`.

    mmfast train decoder --nproc 2 --modality image --stage vae  --data WORLD --out runs/dec/vae  --steps 400
    mmfast train decoder --nproc 2 --modality image --stage unet --data WORLD --out runs/dec/unet --steps 3000 \
        --vae runs/dec/vae/final/vae

Two stages, as latent diffusion trains its autoencoder first (all parts tiny: see :data:`DEFAULT_SIZES`):

* ``--stage vae``: the ``AutoencoderKL`` (one 2x downscale) from random weights on reconstruction MSE plus a
  small KL term. Its export (``final/vae``, ``save_pretrained``) records ``scaling_factor`` = 1 / the standard
  deviation of its latents over the training images, so that the UNet sees unit-variance latents, as Stable
  Diffusion's 0.18215 does for its VAE.
* ``--stage unet``: the ``UNet2DConditionModel`` and the CLIP text encoder from random weights, on diffusers'
  ``DDPMScheduler`` noise-prediction loss, weighted by Min-SNR-gamma (``--snr-gamma``; Hang et al. 2023:
  min(SNR, gamma) / SNR, so the nearly clean timesteps do not dominate). The text encoder trains too, through
  the cross-attention: a random frozen one gives every caption nearly the same embedding (position embeddings
  dominate), so the object's name would barely reach the UNet (``--freeze-text-encoder`` keeps it random, for
  comparison). The VAE (``--vae``) is frozen: each rank encodes the training images once, before the first
  step, and every step samples the cached posterior (mean + std * noise), so no step pays for the encoder.
  The export (``final/pipeline``) is the whole pipeline with a DDIM scheduler.

A share ``--uncond-prob`` of captions is replaced by the empty caption, so that the pipeline's
classifier-free guidance (``guidance_scale`` > 1, negative prompt "") has an unconditional branch.

Everything runs under the engine (:mod:`.engine`): DeepSpeed ZeRO-2 on CPU ranks (gloo, fp32), checkpoints
every ``--save-every`` steps and ``--resume latest`` continuing exactly (the batch order is a function of
(seed, step); the diffusion noise, timesteps, posterior samples and caption drops draw from torch's generator,
whose state each checkpoint keeps). Outputs under ``--out``: ``metrics.jsonl``, ``checkpoints/stepN``,
``final/vae`` or ``final/pipeline`` (``save_pretrained``, safetensors:
``diffusers.DiffusionPipeline.from_pretrained(dir)`` loads the pipeline) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmfast.training import audio_decoder as A
from mmfast.training import engine as E
from mmfast.training import video_decoder as V
from mmfast.training.diffusion_parts import (
    BETAS,
    UNetModule,
    VAEModule,
    batches,
    encode_posteriors,
    export_pipeline,
    export_vae,
    load_vae,
    log_step,
    optimizer,
    token_ids,
    tokenizer,
)

MODALITIES = ("image", "audio", "video")
STAGES = {"image": ("vae", "unet"), "audio": ("vocoder", "vae", "unet"), "video": ("unet",)}
# 32 px images, latents 4 x 16 x 16; UNet cross-attention at 8x8 and 4x4 latents (and the mid block): at 16x16
# it would double the step time.
DEFAULT_SIZES = {"image_size": 32, "vae_channels": [16, 32], "unet_channels": [32, 64, 128],
                 "text_encoder": {"hidden_size": 64, "layers": 2, "heads": 4, "max_length": 24}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmfast train decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", required=True, help=f"decoder to train: one of {MODALITIES}")
    p.add_argument("--stage", default="unet", help="image: vae, unet; audio: vocoder, vae, unet; video: unet "
                   "(default unet; the others first)")
    p.add_argument("--data", required=True, help="synthetic-world folder (image: captions_train.csv + images/; "
                   "audio: t2x_audio.json + audio/; video: t2x_video.json + video/)")
    p.add_argument("--vae", default=None, help="--stage unet: the VAE stage's export (RUN/final/vae)")
    p.add_argument("--vocoder", default=None,
                   help="audio --stage unet: the vocoder stage's export (RUN/final/vocoder)")
    p.add_argument("--image-decoder", default=None,
                   help="video: the image decoder it starts from (a StableDiffusionPipeline folder: "
                        "mmfast/models/nextgpt/weights/image, or RUN/final/pipeline of --modality image)")
    p.add_argument("--frames", type=E.positive_int, default=4,
                   help="video: frames per clip, evenly spaced over the world's (first and last included)")
    p.add_argument("--prediction-type", default="v_prediction", choices=("v_prediction", "epsilon"),
                   help="video: what the UNet predicts (default the velocity, on a zero-terminal-SNR schedule; "
                        "epsilon: the noise on Stable Diffusion's schedule, as the image decoder it starts from)")
    p.add_argument("--reverse-pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="video: half of every batch is the other half's clips played backwards, their captions' "
                        "directions exchanged (a world clip reversed is a world clip of the opposite direction); "
                        "--batch-size must be even")
    p.add_argument("--image-size", type=E.positive_int, default=DEFAULT_SIZES["image_size"],
                   help="pixels per side (the world's images are resized to it; a multiple of 8)")
    p.add_argument("--max-samples", type=E.positive_int, default=None, help="first N caption rows only")
    E.add_common_args(p, batch_size=32, ds_config="zero2", steps=3000, epochs=False)
    p.add_argument("--lr", type=E.positive_float, default=1e-3)
    p.add_argument("--warmup", type=E.nonneg_int, default=None, help="warmup steps (default 5%% of the run)")
    p.add_argument("--kl-weight", type=E.nonneg_float, default=1e-4, help="--stage vae: weight of the KL term")
    p.add_argument("--snr-gamma", type=E.nonneg_float, default=None,
                   help="--stage unet: Min-SNR-gamma loss weighting (0: the plain MSE; default 5 for noise "
                        "prediction, 0 for velocity prediction (audio), which must weigh the noisiest steps fully)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="share of captions dropped (for guidance)")
    p.add_argument("--freeze-text-encoder", action="store_true", help="keep the random text encoder fixed")
    a = p.parse_args(argv)
    if a.modality not in MODALITIES:
        p.error(f"--modality {a.modality!r}: one of {MODALITIES}")
    if a.snr_gamma is None:
        velocity = a.modality == "audio" or (a.modality == "video" and a.prediction_type == "v_prediction")
        a.snr_gamma = 0.0 if velocity else 5.0
    if a.stage not in STAGES[a.modality]:
        p.error(f"--stage {a.stage!r}: --modality {a.modality} has the stages {STAGES[a.modality]}")
    if a.image_size % 8:
        p.error(f"--image-size {a.image_size}: must be a multiple of 8 (the VAE and UNet halve it three times)")
    if not 0.0 <= a.uncond_prob < 1.0:
        p.error(f"--uncond-prob {a.uncond_prob}: must be in [0, 1)")
    if a.modality == "video":
        if not a.image_decoder:
            p.error("--modality video needs --image-decoder (the image decoder pipeline it starts from)")
        if a.frames < 2:
            p.error(f"--frames {a.frames}: a video needs >= 2 frames")
        if a.reverse_pairs and a.batch_size % 2:
            p.error(f"--batch-size {a.batch_size}: --reverse-pairs needs an even batch (each clip beside its "
                    "reversal); or --no-reverse-pairs")
    elif a.stage == "unet" and not a.vae:
        p.error("--stage unet needs --vae (the folder `--stage vae` exported: RUN/final/vae)")
    if a.modality == "audio" and a.stage == "unet" and not a.vocoder:
        p.error("--modality audio --stage unet needs --vocoder (the folder `--stage vocoder` exported: "
                "RUN/final/vocoder)")
    return a


def precheck(args) -> None:
    d = Path(args.data)
    need = {"image": "captions_train.csv", "audio": "t2x_audio.json", "video": "t2x_video.json"}[args.modality]
    if not (d / need).is_file():
        media = " (made with media: mmfast data synth without --no-media)" if args.modality != "image" else ""
        raise FileNotFoundError(f"--data {d}: expected a synthetic-world folder holding {need}{media}")
    if args.modality == "video":
        if not (Path(args.image_decoder) / "model_index.json").is_file():
            raise FileNotFoundError(f"--image-decoder {args.image_decoder}: expected an image decoder pipeline folder "
                                    "(with model_index.json)")
    elif args.stage == "unet" and not (Path(args.vae) / "config.json").is_file():
        raise FileNotFoundError(f"--vae {args.vae}: expected the VAE stage's export (RUN/final/vae, with config.json)")
    if args.modality == "audio" and args.stage == "unet" and not (Path(args.vocoder) / "config.json").is_file():
        raise FileNotFoundError(f"--vocoder {args.vocoder}: expected the vocoder stage's export "
                                "(RUN/final/vocoder, with config.json)")


def build_vae(image_size: int, sizes: dict = DEFAULT_SIZES):
    from diffusers import AutoencoderKL

    vc = tuple(sizes["vae_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vc, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * len(vc), up_block_types=("UpDecoderBlock2D",) * len(vc),
                         layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=1.0)


def build_pipeline(image_size: int, sizes: dict = DEFAULT_SIZES, vae=None):
    """A StableDiffusionPipeline of the given sizes (DDPM scheduler for training): random UNet and text
    encoder, and ``vae`` (default: a random one)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer()
    tok.model_max_length = sizes["text_encoder"]["max_length"]
    te = sizes["text_encoder"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=te["hidden_size"],
                                        intermediate_size=4 * te["hidden_size"], num_hidden_layers=te["layers"],
                                        num_attention_heads=te["heads"], max_position_embeddings=te["max_length"],
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    vae = vae if vae is not None else build_vae(image_size, sizes)
    uc = tuple(sizes["unet_channels"])
    latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=uc,
                                layers_per_block=1,
                                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(uc) - 1),
                                up_block_types=("CrossAttnUpBlock2D",) * (len(uc) - 1) + ("UpBlock2D",),
                                cross_attention_dim=te["hidden_size"], attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(**BETAS), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_image(root: Path, rel: str, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from mmfast.utils.io import open_image, safe_join

    img = open_image(safe_join(root, rel)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class WorldImages:
    """A world split's caption rows over its distinct images, all decoded up front (8,000 images at 32 px
    are 98 MB of fp32): ``pixels`` (I, 3, S, S) in [-1, 1], ``image_of[row]`` and ``captions[row]``."""

    def __init__(self, world: Path, size: int, split: str = "train", max_samples: int | None = None):
        from mmfast.data.imagetext import read_image_text_csv

        rows = read_image_text_csv(Path(world) / f"captions_{split}.csv")[:max_samples]
        paths = sorted({r[0] for r in rows})
        index = {q: i for i, q in enumerate(paths)}
        self.pixels = torch.stack([load_image(Path(world), q, size) for q in paths])
        self.image_of = torch.tensor([index[r[0]] for r in rows])
        self.captions = [r[1] for r in rows]


def train_vae(run, args, data: WorldImages) -> int:
    vae = build_vae(args.image_size).to(run.device)
    module = VAEModule(vae, args.kl_weight)
    engine = run.initialize(module, *optimizer(run, args, list(module.parameters())))
    banner = f"image VAE {args.image_size}px, {len(data.pixels)} images, {sum(p.numel() for p in vae.parameters())} params"
    for step, idx in run.steps(batches(run, args, len(data.pixels)), args.steps, "train VAE", banner):
        loss = engine(data.pixels[idx].to(run.device, dtype=run.dtype))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            log_step(run, step, loss, module, ("loss", "recon", "kl"))
    state = run.gather_state(module)
    vae.load_state_dict({k[len("vae."):]: v for k, v in state.items()})
    mean, _ = encode_posteriors(vae.eval(), data.pixels.to(run.device))
    scaling = 1.0 / float(mean.float().std())
    run.export(lambda d: export_vae(vae, {k[len("vae."):]: v for k, v in state.items()}, scaling, Path(d) / "vae"))
    return run.finish({"modality": args.modality, "stage": "vae", "image_size": args.image_size,
                       "scaling_factor": scaling, "final": str(run.out / "final" / "vae")}, state)


def train_unet(run, args, data: WorldImages) -> int:
    vae = load_vae(args.vae).to(run.device).requires_grad_(False).eval()
    pipe = build_pipeline(args.image_size, vae=vae)
    pipe.text_encoder.to(run.device)
    pipe.unet.to(run.device)
    if args.freeze_text_encoder:
        pipe.text_encoder.requires_grad_(False)
    mean, std = encode_posteriors(vae, data.pixels.to(run.device))  # the same on every rank: no collective
    scale = vae.config.scaling_factor
    ids = token_ids(pipe, data.captions)
    module = UNetModule(pipe, args.uncond_prob, args.snr_gamma)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = run.initialize(module, *optimizer(run, args, params), exclude_frozen=args.freeze_text_encoder)
    banner = (f"image decoder {args.image_size}px, latents {tuple(mean.shape[1:])} x {scale:.3f}, "
              f"{len(data.captions)} pairs, {sum(p.numel() for p in params)} params train")
    for step, rows in run.steps(batches(run, args, len(data.captions)), args.steps, "train decoder", banner):
        j = data.image_of[rows]
        latents = (mean[j] + std[j] * torch.randn_like(std[j])) * scale
        loss = engine(latents.to(run.dtype), ids[rows].to(run.device))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            log_step(run, step, loss, module, ("loss", "mse"))
    state = run.gather_state(module)
    run.export(lambda d: export_pipeline(pipe, state, Path(d) / "pipeline"))
    return run.finish({"modality": args.modality, "stage": "unet", "image_size": args.image_size,
                       "vae": str(args.vae), "snr_gamma": args.snr_gamma,
                       "text_encoder": "frozen" if args.freeze_text_encoder else "trained",
                       "final": str(run.out / "final" / "pipeline")}, state)


@E.entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.modality == "video":
        run = E.Run(args, f"train_video_decoder_{args.stage}")
        return V.STAGES[args.stage](run, args, V.WorldVideos(Path(args.data), args.image_size, args.frames, "train",
                                                             args.max_samples))
    if args.modality == "audio":
        run = E.Run(args, f"train_audio_decoder_{args.stage}")
        return A.STAGES[args.stage](run, args, A.WorldAudio(Path(args.data), "train", args.max_samples))
    run = E.Run(args, f"train_decoder_{args.stage}")
    data = WorldImages(Path(args.data), args.image_size, "train", args.max_samples)
    return (train_vae if args.stage == "vae" else train_unet)(run, args, data)


if __name__ == "__main__":
    E.exit_rank(main())
