"""Train NExT-GPT's tiny image decoder (a diffusers StableDiffusionPipeline) on a synthetic world's captions.

    mmfast train decoder --nproc 2 --modality image --data WORLD --out runs/dec --steps 600

What trains, jointly, from random weights (all three are tiny: see :data:`DEFAULT_SIZES`):

* the UNet (``UNet2DConditionModel``): diffusers' ``DDPMScheduler`` noise-prediction loss
  (:func:`mmfast.models.nextgpt.decoders.diffusion_loss`) on the VAE's latents of the image;
* the CLIP text encoder, through the UNet's cross-attention: a random frozen text encoder gives every
  caption nearly the same embedding (position embeddings dominate), so the words that name the object
  would barely reach the UNet. ``--freeze-text-encoder`` keeps it random, for comparison;
* the VAE (``AutoencoderKL``, one 2x downscale): reconstruction MSE plus a small KL term, so that its
  latents hold the image (a random VAE's do not). The diffusion loss sees the latents without gradient;
  the VAE converges within the first few hundred steps, and the UNet trains on its latents throughout.

A share ``--uncond-prob`` of captions is replaced by the empty caption, so that the pipeline's
classifier-free guidance (``guidance_scale`` > 1, negative prompt "") has an unconditional branch.

Everything runs under the engine (:mod:`.engine`): DeepSpeed ZeRO-2 on CPU ranks (gloo, fp32), checkpoints
every ``--save-every`` steps and ``--resume latest`` continuing exactly (the batch order is a function of
(seed, step); the diffusion noise, timesteps and caption drops draw from torch's generator, whose state each
checkpoint keeps). Outputs under ``--out``: ``metrics.jsonl``, ``checkpoints/stepN``,
``final/pipeline`` (``save_pretrained``, safetensors: ``diffusers.DiffusionPipeline.from_pretrained(dir)``
loads it, with a DDIM scheduler for few-step sampling) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmfast.training import engine as E

MODALITIES = ("image",)  # audio and video: not yet (docs/nextgpt_decoders.md)
# Sizes that train a recognisable 32 px decoder in a few minutes on 2 CPU ranks.
# UNet cross-attention at 8x8 and 4x4 latents (and the mid block): at 16x16 it would double the step time.
DEFAULT_SIZES = {"image_size": 32, "vae_channels": [16, 32], "unet_channels": [32, 64, 128],
                 "text_encoder": {"hidden_size": 64, "layers": 2, "heads": 4, "max_length": 24}}
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "clip_sample": False, "steps_offset": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmfast train decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", required=True, help=f"decoder to train: one of {MODALITIES}")
    p.add_argument("--data", required=True, help="synthetic-world folder (captions_train.csv + images/)")
    p.add_argument("--image-size", type=E.positive_int, default=DEFAULT_SIZES["image_size"],
                   help="pixels per side (the world's images are resized to it; a multiple of 8)")
    p.add_argument("--max-samples", type=E.positive_int, default=None, help="first N caption rows only")
    E.add_common_args(p, batch_size=16, ds_config="zero2", steps=600, epochs=False)
    p.add_argument("--lr", type=E.positive_float, default=1e-3)
    p.add_argument("--warmup", type=E.nonneg_int, default=None, help="warmup steps (default 5%% of the run)")
    p.add_argument("--recon-weight", type=E.nonneg_float, default=1.0, help="weight of the VAE reconstruction loss")
    p.add_argument("--kl-weight", type=E.nonneg_float, default=1e-4, help="weight of the VAE's KL term")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="share of captions dropped (for guidance)")
    p.add_argument("--freeze-text-encoder", action="store_true", help="keep the random text encoder fixed")
    a = p.parse_args(argv)
    if a.modality not in MODALITIES:
        p.error(f"--modality {a.modality!r}: only {MODALITIES} can be trained yet (audio/video: not implemented)")
    if a.image_size % 8:
        p.error(f"--image-size {a.image_size}: must be a multiple of 8 (the VAE and UNet halve it three times)")
    if not 0.0 <= a.uncond_prob < 1.0:
        p.error(f"--uncond-prob {a.uncond_prob}: must be in [0, 1)")
    return a


def precheck(args) -> None:
    d = Path(args.data)
    if not (d / "captions_train.csv").is_file():
        raise FileNotFoundError(f"--data {d}: expected a synthetic-world folder holding captions_train.csv")


def tokenizer():
    """The tiny LLM's tokenizer (the same one NExT-GPT's tiny decoders stand in with)."""
    from transformers import AutoTokenizer

    from mmfast.models.llava import model as llava

    pre = llava.load_preset("tiny")
    return AutoTokenizer.from_pretrained(str(llava.PRESET_DIR / pre["tokenizer"]), local_files_only=True)


def build_pipeline(image_size: int, sizes: dict = DEFAULT_SIZES):
    """A random StableDiffusionPipeline of the given sizes (DDPM scheduler for training)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer()
    tok.model_max_length = sizes["text_encoder"]["max_length"]
    te = sizes["text_encoder"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=te["hidden_size"],
                                        intermediate_size=4 * te["hidden_size"], num_hidden_layers=te["layers"],
                                        num_attention_heads=te["heads"], max_position_embeddings=te["max_length"],
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    vc = tuple(sizes["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vc, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(vc), up_block_types=("UpDecoderBlock2D",) * len(vc),
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=1.0)
    uc = tuple(sizes["unet_channels"])
    latent = image_size // 2 ** (len(vc) - 1)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=uc,
                                layers_per_block=1,
                                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(uc) - 1),
                                up_block_types=("CrossAttnUpBlock2D",) * (len(uc) - 1) + ("UpBlock2D",),
                                cross_attention_dim=te["hidden_size"], attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(**BETAS), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class WorldImages(torch.utils.data.Dataset):
    """(image in [-1, 1] (3, S, S), caption) rows of a world's captions CSV."""

    def __init__(self, world: Path, size: int, split: str = "train", max_samples: int | None = None):
        from mmfast.data.imagetext import read_image_text_csv

        self.root, self.size = Path(world), size
        self.rows = read_image_text_csv(self.root / f"captions_{split}.csv")[:max_samples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return load_image(self.root, self.rows[i][0], self.size), self.rows[i][1]


def load_image(root: Path, rel: str, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from mmfast.utils.io import open_image, safe_join

    img = open_image(safe_join(root, rel)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def token_ids(pipe, captions: list[str]) -> torch.Tensor:
    """As the pipeline tokenizes ``prompt``: padded to ``model_max_length``, truncated."""
    tok = pipe.tokenizer
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


class DecoderModule(torch.nn.Module):
    """The engine's module: diffusion loss + VAE reconstruction loss; the parts are kept for logging."""

    def __init__(self, pipe, args):
        super().__init__()
        self.pipe = pipe  # not a module: the components below are
        self.vae, self.text_encoder, self.unet = pipe.vae, pipe.text_encoder, pipe.unet
        self.recon_weight, self.kl_weight, self.uncond_prob = args.recon_weight, args.kl_weight, args.uncond_prob
        self.register_buffer("empty_ids", token_ids(pipe, [""])[0], persistent=False)
        self.parts: dict = {}

    def forward(self, pixels, ids):
        from mmfast.models.nextgpt.decoders import diffusion_loss

        if self.uncond_prob > 0:  # torch's generator: restored on resume with the checkpoint's RNG state
            drop = torch.rand(ids.shape[0], device=ids.device) < self.uncond_prob
            ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        cond = self.text_encoder(ids)[0]  # (B, L, C), as the pipeline's encode_prompt
        diff = diffusion_loss("image", self.pipe, cond, pixels)
        post = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(post.sample()).sample
        rec = torch.nn.functional.mse_loss(recon, pixels)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = diff + self.recon_weight * (rec + self.kl_weight * kl)
        self.parts = {"diffusion": float(diff.detach()), "recon": float(rec.detach()), "kl": float(kl.detach())}
        return loss


def export_pipeline(pipe, state: dict, folder: Path) -> None:
    """Write the trained pipeline (``state``: the module's full fp32 weights) with a DDIM scheduler."""
    from diffusers import DDIMScheduler

    for name in ("vae", "text_encoder", "unet"):
        part = getattr(pipe, name)
        part.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    pipe.scheduler = DDIMScheduler(**BETAS, set_alpha_to_one=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


@E.entry
def main(argv=None) -> int:
    import torch.distributed as dist

    from mmfast.training.data import ResumableBatches

    args = parse_args(argv)
    run = E.Run(args, "train_decoder")
    pipe = build_pipeline(args.image_size)
    pipe.to(run.device)
    if args.freeze_text_encoder:
        pipe.text_encoder.requires_grad_(False)
    module = DecoderModule(pipe, args)
    dataset = WorldImages(Path(args.data), args.image_size, "train", args.max_samples)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True if run.device.type == "cpu" else None)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    engine = run.initialize(module, optimizer, E.cosine_with_warmup(optimizer, warmup, args.steps),
                            exclude_frozen=args.freeze_text_encoder)
    sampler = ResumableBatches(len(dataset), args.batch_size, run.rank, run.world, args.seed, run.start, args.steps)

    def collate(items):
        return torch.stack([x for x, _ in items]), token_ids(pipe, [c for _, c in items])

    # A generator of its own: a DataLoader iterator otherwise draws its base seed from torch's global generator,
    # which carries the diffusion noise and is restored on resume (the draw would shift it by one number).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    banner = (f"image decoder {args.image_size}px, {len(dataset)} pairs, "
              f"{sum(p.numel() for p in params)} of {sum(p.numel() for p in module.parameters())} params train")
    keys = ("loss", "diffusion", "recon", "kl")
    for step, (pixels, ids) in run.steps(loader, args.steps, "train decoder", banner):
        loss = engine(pixels.to(run.device, dtype=run.dtype), ids.to(run.device))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            v = torch.tensor([float(loss.detach()), *(module.parts[k] for k in keys[1:])], dtype=torch.float64)
            dist.all_reduce(v)  # a collective: every rank logs the same steps
            v /= run.world
            run.log(step, {**dict(zip(keys, v.tolist())), "lr": run.scheduler.get_last_lr()[0]}, rate="samples_per_s")
    state = run.gather_state(module)
    run.export(lambda d: export_pipeline(pipe, state, Path(d) / "pipeline"))
    return run.finish({"modality": args.modality, "image_size": args.image_size,
                       "text_encoder": "frozen" if args.freeze_text_encoder else "trained",
                       "final": str(run.out / "final" / "pipeline")}, state)


if __name__ == "__main__":
    sys.exit(main())
