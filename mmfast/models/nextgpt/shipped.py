"""The trained tiny decoders shipped inside the package (``weights/<modality>``), and how they are made.

    make decoders       # the world (seed 0), both training stages, then mmfast.training.ship_decoder

A shipped decoder is a ``save_pretrained`` pipeline folder (safetensors, fp16: read back as fp32 on CPU) plus
``RECORD.json``: how it was trained and the figures it reproduces, and ``heldout/``, a few of the world's
validation images with their prompts (never seen in training), on which :func:`heldout_denoise_loss`
is recorded: the UNet's noise-prediction MSE at fixed timesteps and noise, a figure that needs no CLIP, so a
test can check that the weights load and still do what they did when shipped.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
HELDOUT = 16  # held-out images shipped beside each decoder


def pipeline_dir(modality: str) -> Path:
    """The shipped pipeline folder of ``modality``; a clear error when this build has none."""
    d = WEIGHTS / modality
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(f"no shipped {modality} decoder in {d}: `make decoders` trains it (issue #24)")
    return d


def read_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline folder in ``dtype`` (fp32 by default, whatever the folder stores: the shipped decoders
    are fp16 on disk); progress bars off. Safetensors only: a pipeline folder is an untrusted file, no pickle is
    ever loaded from it."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(modality: str = "image", dtype: torch.dtype = torch.float32):
    """The shipped pipeline of ``modality`` (:func:`read_pipeline`)."""
    return read_pipeline(pipeline_dir(modality), dtype)


def record(modality: str = "image") -> dict:
    return json.loads((pipeline_dir(modality) / "RECORD.json").read_text(encoding="utf-8"))


def heldout_rows(folder: Path) -> list[tuple[str, str]]:
    """``[(image path, prompt)]`` of a decoder's ``heldout/`` folder."""
    with open(folder / "heldout" / "prompts.csv", encoding="utf-8", newline="") as f:
        return [(str(folder / "heldout" / r["filepath"]), r["caption"]) for r in csv.DictReader(f)]


@torch.no_grad()
def heldout_denoise_loss(pipe, rows: list[tuple[str, str]], seed: int = 0) -> float:
    """Mean noise-prediction MSE of ``pipe``'s UNet on ``rows``' images (posterior means, scaled), conditioned
    on their prompts, at timesteps spread over the schedule and noise drawn from ``seed``."""
    import numpy as np
    from PIL import Image

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
              for p, _ in rows]
    x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0).to(pipe.vae.dtype)
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    cond = pipe.encode_prompt([c for _, c in rows], "cpu", 1, False)[0].to(pipe.unet.dtype)  # as the pipeline does
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    timesteps = torch.linspace(50, 950, 4).long()
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen).to(latents.dtype)
        tt = torch.full((len(rows),), int(t))
        pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, tt), tt, encoder_hidden_states=cond).sample
        total += float((pred.float() - noise.float()).pow(2).mean())
    return total / len(timesteps)
