"""What both decoder recipes (:mod:`.decoder` for images, :mod:`.audio_decoder` for audio) share: the tiny LLM's
tokenizer, the VAE stage's module, export and loading, the latents cache, Min-SNR weights, and the engine's
optimizer, batches and logging as the decoder stages use them."""
from __future__ import annotations

from pathlib import Path

import torch

from mmfast.training import engine as E

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "clip_sample": False, "steps_offset": 1}


def tokenizer():
    """The tiny LLM's tokenizer (the same one NExT-GPT's tiny decoders stand in with)."""
    from transformers import AutoTokenizer

    from mmfast.models.llava import model as llava

    pre = llava.load_preset("tiny")
    return AutoTokenizer.from_pretrained(str(llava.PRESET_DIR / pre["tokenizer"]), local_files_only=True)


def load_vae(folder) -> torch.nn.Module:
    """The VAE stage's export (safetensors only)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)


@torch.no_grad()
def encode_posteriors(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) of every image, unscaled."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        d = vae.encode(pixels[i:i + batch].to(vae.dtype)).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def kl_to_standard_normal(post) -> torch.Tensor:
    return 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()


class VAEModule(torch.nn.Module):
    """The VAE stage's module: reconstruction MSE + ``kl_weight`` x KL."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight
        self.parts: dict = {}

    def forward(self, pixels):
        post = self.vae.encode(pixels).latent_dist
        rec = torch.nn.functional.mse_loss(self.vae.decode(post.sample()).sample, pixels)
        kl = kl_to_standard_normal(post)
        self.parts = {"recon": float(rec.detach()), "kl": float(kl.detach())}
        return rec + self.kl_weight * kl


def snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights at timesteps ``t`` of the losses the scheduler's ``prediction_type`` names:
    min(SNR, gamma) / SNR for noise prediction, min(SNR, gamma) / (SNR + 1) for velocity prediction (both weigh
    the clean-latent error by min(SNR, gamma)); 1 where ``gamma`` is 0."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    ac = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1.0 - ac)
    return torch.clamp(snr, max=gamma) / (snr + 1.0 if scheduler.config.prediction_type == "v_prediction" else snr)


def export_vae(vae, state: dict, scaling_factor: float, folder: Path) -> None:
    vae.load_state_dict(state)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(str(folder), safe_serialization=True)


def export_pipeline(pipe, state: dict, folder: Path, betas: dict = BETAS) -> None:
    """Write the trained pipeline (``state``: the UNet module's full fp32 weights) with a DDIM scheduler of the
    training schedule ``betas``."""
    from diffusers import DDIMScheduler

    for name in ("text_encoder", "unet"):
        part = getattr(pipe, name)
        part.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    pipe.scheduler = DDIMScheduler(**betas, set_alpha_to_one=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def optimizer(run, args, params):
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True if run.device.type == "cpu" else None)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    return optimizer, E.cosine_with_warmup(optimizer, warmup, args.steps)


def log_step(run, step, loss, module, keys) -> None:
    import torch.distributed as dist

    v = torch.tensor([float(loss.detach()), *(module.parts[k] for k in keys[1:])], dtype=torch.float64)
    dist.all_reduce(v)  # a collective: every rank logs the same steps
    v /= run.world
    run.log(step, {**dict(zip(keys, v.tolist())), "lr": run.scheduler.get_last_lr()[0]}, rate="samples_per_s")


def batches(run, args, n: int):
    from mmfast.training.data import ResumableBatches

    return ResumableBatches(n, args.batch_size, run.rank, run.world, args.seed, run.start, args.steps)
