"""What the decoder recipes (:mod:`.decoder` for images, :mod:`.audio_decoder` for audio, :mod:`.video_decoder` for
video) share: the tiny LLM's tokenizer, the VAE stage's module, export and loading, the latents cache, Min-SNR
weights, the text-conditioned UNet stage's module (images and video), and the engine's optimizer, batches and
logging as the decoder stages use them."""
from __future__ import annotations

from pathlib import Path

import torch

from mmfast.models.nextgpt.decoders import prediction_target
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


def token_ids(pipe, captions: list[str]) -> torch.Tensor:
    """As the pipeline tokenizes ``prompt``: padded to ``model_max_length``, truncated."""
    tok = pipe.tokenizer
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


class UNetModule(torch.nn.Module):
    """The UNet stage's module (image and video): the (Min-SNR weighted) loss of the UNet's prediction (noise or
    velocity, as its scheduler's ``prediction_type`` says) conditioned on the text encoder's states of the
    (sometimes dropped) caption; ``latents`` are sampled scaled posteriors, (B, 4, h, w) or (B, 4, F, h, w). With
    ``context_per_frame`` the states are given once per frame, (B * F, L, C), as ``AnimateDiffPipeline`` gives
    them to its ``UNetMotionModel``."""

    def __init__(self, pipe, uncond_prob: float, snr_gamma: float, context_per_frame: bool = False):
        super().__init__()
        self.context_per_frame = context_per_frame
        self.pipe = pipe  # not a module: the components below are
        self.text_encoder, self.unet = pipe.text_encoder, pipe.unet
        self.uncond_prob, self.snr_gamma = uncond_prob, snr_gamma
        self.register_buffer("empty_ids", token_ids(pipe, [""])[0], persistent=False)
        self.parts: dict = {}

    def forward(self, latents, ids):
        sched = self.pipe.scheduler
        if self.uncond_prob > 0:  # torch's generator: restored on resume with the checkpoint's RNG state
            drop = torch.rand(ids.shape[0], device=ids.device) < self.uncond_prob
            ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        cond = self.text_encoder(ids)[0]  # (B, L, C), as the pipeline's encode_prompt
        if self.context_per_frame:
            cond = cond.repeat_interleave(latents.shape[2], 0)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        pred = self.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        target = prediction_target(sched, latents, noise, t)
        per_item = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
        mse = per_item.mean()
        self.parts = {"mse": float(mse.detach())}
        return (per_item * snr_weights(sched, t, self.snr_gamma)).mean()


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


def batches(run, args, n: int, per_rank: int | None = None):
    """Each rank's rows for every step (``per_rank``, default ``--batch-size``, a rank), resumable."""
    from mmfast.training.data import ResumableBatches

    return ResumableBatches(n, per_rank or args.batch_size, run.rank, run.world, args.seed, run.start, args.steps)
