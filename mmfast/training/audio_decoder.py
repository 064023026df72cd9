"""The audio half of ``mmfast train decoder`` (issue #24): NExT-GPT's tiny AudioLDM pipeline on a world's clips.

    mmfast train decoder --nproc 2 --modality audio --stage vocoder --data WORLD --out runs/dec/vocoder
    mmfast train decoder --nproc 2 --modality audio --stage vae     --data WORLD --out runs/dec/avae
    mmfast train decoder --nproc 2 --modality audio --stage unet    --data WORLD --out runs/dec/aunet \\
        --vae runs/dec/avae/final/vae --vocoder runs/dec/vocoder/final/vocoder

AudioLDM's layout, all parts tiny (:data:`AUDIO_SIZES`): 1 s clips at 16 kHz -> 128 frames of a 64-bin log-mel
spectrogram (hop 125 = the vocoder's upsampling 5 x 5 x 5; :func:`mmfast.models.nextgpt.decoders.log_mel`) -> an
``AutoencoderKL`` with two 2x downscales (latents 4 x 32 x 16) -> a ``UNet2DConditionModel`` conditioned, as
AudioLDM is, through its class embedding on the L2-normalised text projection of a CLAP text encoder
(``ClapTextModelWithProjection``) -> the VAE's decoder -> a ``SpeechT5HifiGan`` vocoder back to the waveform.
Exported, it is a plain ``AudioLDMPipeline`` folder.

Three stages, each under the engine like the image stages (:mod:`.decoder`; shared parts: :mod:`.diffusion_parts`):

* ``--stage vocoder``: the HiFi-GAN generator from the clips' real log-mels, on a multi-resolution STFT loss
  (spectral convergence + log-magnitude L1 at four resolutions; no discriminator). Its input is standardised per
  mel bin (``normalize_before``; the mean and scale over the training clips are stored in the vocoder), and its
  convolutions start from PyTorch's default initialisation: transformers' N(0, 0.01) starves the deep stack
  (the output stayed 100x too quiet). Measured on the world's clips: without the standardisation a 96-channel
  vocoder stayed at chance under the judge after 400 steps; with it, 0.94.
* ``--stage vae``: the ``AutoencoderKL`` on the log-mels (reconstruction MSE + KL), ``scaling_factor`` from the
  latents' standard deviation, as for images.
* ``--stage unet``: the UNet and the CLAP text encoder on the velocity-prediction loss (Min-SNR weighted) under
  DDPM's linear noise schedule (:data:`AUDIO_BETAS`, and why), a share of captions dropped to "" for guidance; the VAE
  (``--vae``) and vocoder (``--vocoder``) are frozen and exported with them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmfast.models.nextgpt.decoders import prediction_target
from mmfast.training import diffusion_parts as D

AUDIO_SIZES = {"sample_rate": 16000, "seconds": 1.0, "upsample_rates": [5, 5, 5], "n_mels": 64,
               "vocoder_channels": 96, "vae_channels": [16, 32, 64], "unet_channels": [32, 64, 128],
               "text_encoder": {"hidden_size": 64, "layers": 2, "heads": 4, "max_length": 24, "projection_dim": 64}}
# Velocity prediction on DDPM's linear schedule. With Stable Diffusion's noise prediction and schedule
# (``decoder.BETAS``) the UNet all but ignored the caption: 2000 steps gave t2a top-1 0.19 whatever the guidance
# (1, 3 or 8), each sample's class set by its starting noise. The mels of a class are so alike that the class
# can be read from the noisy latents down to very high noise levels (SD's last step still carries 0.068 x the
# latents), and where it cannot, a noise prediction depends on the caption only through a term scaled by
# sqrt(abar), so the loss barely rewards using it. DDPM's schedule alone (last step 0.006) did not change that
# (0.19). A velocity target is mostly the clean latents at high noise, which only the caption can tell, and its
# plain MSE weighs them fully (weight SNR + 1 on the clean-latent error). Min-SNR weighting must stay off
# (``--snr-gamma`` 0, the audio default): in any parametrisation it weighs the clean-latent error by min(SNR, gamma),
# close to 0 at exactly the noise levels where the caption matters.
AUDIO_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "clip_sample": False, "steps_offset": 1, "prediction_type": "v_prediction"}
STFT_RESOLUTIONS = ((128, 32), (256, 64), (512, 128), (1024, 256))  # (n_fft, hop)


def hop(sizes: dict = AUDIO_SIZES) -> int:
    import math

    return int(math.prod(sizes["upsample_rates"]))


def frames(sizes: dict = AUDIO_SIZES) -> int:
    """Mel frames of one clip, as AudioLDMPipeline sizes them for ``audio_length_in_s=seconds``."""
    return int(sizes["seconds"] * sizes["sample_rate"]) // hop(sizes)


class WorldAudio:
    """A world split's clips: ``waves`` (N, T) at 16 kHz, ``mels`` (N, frames, n_mels) log-mels, ``captions``."""

    def __init__(self, world: Path, split: str = "train", max_samples: int | None = None,
                 sizes: dict = AUDIO_SIZES):
        from mmfast.eval.t2a import load_clips
        from mmfast.models.nextgpt.decoders import log_mel

        waves, labels, captions = load_clips(world, split)
        n = int(sizes["seconds"] * sizes["sample_rate"])
        if waves.shape[1] < n:
            raise ValueError(f"--data {world}: clips of {waves.shape[1]} samples, expected >= {n}")
        self.waves = waves[:max_samples, :n]
        self.labels, self.captions = labels[:max_samples], captions[:max_samples]
        self.mels = log_mel(self.waves, sizes["sample_rate"], sizes["n_mels"], hop(sizes))


def build_vocoder(sizes: dict = AUDIO_SIZES, mels: torch.Tensor | None = None):
    """A random ``SpeechT5HifiGan`` (PyTorch's default conv initialisation); ``mels`` (N, frames, M) set its input
    standardisation (per-bin mean and standard deviation). Each upsampling kernel exceeds its rate by an even
    number, so ``frames`` mel frames become exactly ``frames * hop`` samples."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    rates = list(sizes["upsample_rates"])
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=sizes["n_mels"], sampling_rate=sizes["sample_rate"],
        upsample_initial_channel=sizes["vocoder_channels"], upsample_rates=rates,
        upsample_kernel_sizes=[2 * r + r % 2 for r in rates], resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3], [1, 3]], normalize_before=True))
    for m in voc.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            m.reset_parameters()
    if mels is not None:
        voc.mean.copy_(mels.mean((0, 1)))
        voc.scale.copy_(mels.std((0, 1)))
    return voc


def stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss of (B, T) waveforms: spectral convergence + log-magnitude L1, averaged over
    :data:`STFT_RESOLUTIONS`."""
    total = pred.new_zeros(())
    for n_fft, h in STFT_RESOLUTIONS:
        w = torch.hann_window(n_fft, device=pred.device)
        a = torch.stft(pred.float(), n_fft, h, window=w, return_complex=True).abs().clamp(min=1e-5)
        b = torch.stft(target.float(), n_fft, h, window=w, return_complex=True).abs().clamp(min=1e-5)
        total = total + (a - b).norm() / b.norm() + (a.log() - b.log()).abs().mean()
    return total / len(STFT_RESOLUTIONS)


class VocoderModule(torch.nn.Module):
    def __init__(self, vocoder):
        super().__init__()
        self.vocoder = vocoder
        self.parts: dict = {}

    def forward(self, mels, waves):
        out = self.vocoder(mels)
        loss = stft_loss(out, waves[:, :out.shape[1]])
        self.parts = {"rms": float(out.detach().pow(2).mean().sqrt())}
        return loss


def build_vae(sizes: dict = AUDIO_SIZES):
    from diffusers import AutoencoderKL

    vc = tuple(sizes["vae_channels"])
    return AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=vc, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * len(vc), up_block_types=("UpDecoderBlock2D",) * len(vc),
                         layers_per_block=1, norm_num_groups=8, sample_size=frames(sizes), scaling_factor=1.0)


def build_pipeline(vae, vocoder, sizes: dict = AUDIO_SIZES):
    """An AudioLDMPipeline (DDPM scheduler for training) with random UNet and CLAP text encoder."""
    from diffusers import AudioLDMPipeline, DDPMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    tok = D.tokenizer()
    te = sizes["text_encoder"]
    tok.model_max_length = te["max_length"]
    # positions for diffusers' own negative prompt too: it pads "" to the embedding width, not the tokenizer's
    positions = max(te["max_length"], te["projection_dim"]) + 2
    text = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tok), hidden_size=te["hidden_size"], intermediate_size=4 * te["hidden_size"],
        num_hidden_layers=te["layers"], num_attention_heads=te["heads"], projection_dim=te["projection_dim"],
        max_position_embeddings=positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    uc = tuple(sizes["unet_channels"])
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(sample_size=frames(sizes) // scale, in_channels=4, out_channels=4,
                                block_out_channels=uc, layers_per_block=1, down_block_types=("DownBlock2D",) * len(uc),
                                up_block_types=("UpBlock2D",) * len(uc), mid_block_type="UNetMidBlock2D",
                                class_embed_type="simple_projection",
                                projection_class_embeddings_input_dim=te["projection_dim"],
                                class_embeddings_concat=True, attention_head_dim=8, norm_num_groups=8)
    return AudioLDMPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                            scheduler=DDPMScheduler(**AUDIO_BETAS), vocoder=vocoder)


def load_vocoder(folder):
    from transformers import SpeechT5HifiGan

    return SpeechT5HifiGan.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)


def text_ids(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = pipe.tokenizer
    t = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt")
    return t.input_ids, t.attention_mask


class AudioUNetModule(torch.nn.Module):
    """The velocity-prediction loss (:data:`AUDIO_BETAS`) of the UNet conditioned, through its class embedding, on
    the normalised CLAP projection of the (sometimes dropped) caption, as AudioLDMPipeline conditions it."""

    def __init__(self, pipe, uncond_prob: float, snr_gamma: float):
        super().__init__()
        self.pipe = pipe
        self.text_encoder, self.unet = pipe.text_encoder, pipe.unet
        self.uncond_prob, self.snr_gamma = uncond_prob, snr_gamma
        ids, mask = text_ids(pipe, [""])
        self.register_buffer("empty_ids", ids[0], persistent=False)
        self.register_buffer("empty_mask", mask[0], persistent=False)
        self.parts: dict = {}

    def forward(self, latents, ids, mask):
        sched = self.pipe.scheduler
        if self.uncond_prob > 0:
            drop = torch.rand(ids.shape[0], device=ids.device) < self.uncond_prob
            ids = torch.where(drop[:, None], self.empty_ids[None], ids)
            mask = torch.where(drop[:, None], self.empty_mask[None], mask)
        cond = self.text_encoder(ids, attention_mask=mask).text_embeds
        cond = torch.nn.functional.normalize(cond, dim=-1)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        pred = self.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=None, class_labels=cond).sample
        target = prediction_target(sched, latents, noise, t)
        per_item = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        self.parts = {"mse": float(per_item.mean().detach())}
        return (per_item * D.snr_weights(sched, t, self.snr_gamma)).mean()


def train_vocoder(run, args, data: WorldAudio) -> int:
    voc = build_vocoder(AUDIO_SIZES, data.mels).to(run.device)
    module = VocoderModule(voc)
    engine = run.initialize(module, *D.optimizer(run, args, list(module.parameters())))
    banner = f"audio vocoder, {len(data.waves)} clips, {sum(p.numel() for p in voc.parameters())} params"
    for step, idx in run.steps(D.batches(run, args, len(data.waves)), args.steps, "train vocoder", banner):
        loss = engine(data.mels[idx].to(run.device, run.dtype), data.waves[idx].to(run.device, run.dtype))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            D.log_step(run, step, loss, module, ("loss", "rms"))
    state = run.gather_state(module)

    def write(d):
        voc.load_state_dict({k[len("vocoder."):]: v for k, v in state.items()})
        voc.save_pretrained(str(Path(d) / "vocoder"), safe_serialization=True)

    run.export(write)
    return run.finish({"modality": "audio", "stage": "vocoder", "final": str(run.out / "final" / "vocoder")}, state)


def train_vae(run, args, data: WorldAudio) -> int:
    vae = build_vae().to(run.device)
    module = D.VAEModule(vae, args.kl_weight)
    engine = run.initialize(module, *D.optimizer(run, args, list(module.parameters())))
    mels = data.mels.unsqueeze(1)  # (N, 1, frames, M)
    banner = f"audio VAE, {len(mels)} clips of {tuple(mels.shape[2:])} mels, {sum(p.numel() for p in vae.parameters())} params"
    for step, idx in run.steps(D.batches(run, args, len(mels)), args.steps, "train VAE", banner):
        loss = engine(mels[idx].to(run.device, run.dtype))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            D.log_step(run, step, loss, module, ("loss", "recon", "kl"))
    state = run.gather_state(module)
    weights = {k[len("vae."):]: v for k, v in state.items()}
    vae.load_state_dict(weights)
    mean, _ = D.encode_posteriors(vae.eval(), mels.to(run.device))
    scaling = 1.0 / float(mean.float().std())
    run.export(lambda d: D.export_vae(vae, weights, scaling, Path(d) / "vae"))
    return run.finish({"modality": "audio", "stage": "vae", "scaling_factor": scaling,
                       "final": str(run.out / "final" / "vae")}, state)


def train_unet(run, args, data: WorldAudio) -> int:
    vae = D.load_vae(args.vae).to(run.device).requires_grad_(False).eval()
    voc = load_vocoder(args.vocoder).requires_grad_(False).eval()
    pipe = build_pipeline(vae, voc)
    pipe.text_encoder.to(run.device)
    pipe.unet.to(run.device)
    mean, std = D.encode_posteriors(vae, data.mels.unsqueeze(1).to(run.device))
    scale = vae.config.scaling_factor
    ids, mask = text_ids(pipe, data.captions)
    module = AudioUNetModule(pipe, args.uncond_prob, args.snr_gamma)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = run.initialize(module, *D.optimizer(run, args, params))
    banner = (f"audio decoder, latents {tuple(mean.shape[1:])} x {scale:.3f}, {len(data.captions)} clips, "
              f"{sum(p.numel() for p in params)} params train")
    for step, rows in run.steps(D.batches(run, args, len(data.captions)), args.steps, "train decoder", banner):
        latents = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * scale
        loss = engine(latents.to(run.dtype), ids[rows].to(run.device), mask[rows].to(run.device))
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step):
            D.log_step(run, step, loss, module, ("loss", "mse"))
    state = run.gather_state(module)
    run.export(lambda d: D.export_pipeline(pipe, state, Path(d) / "pipeline", AUDIO_BETAS))
    return run.finish({"modality": "audio", "stage": "unet", "vae": str(args.vae), "vocoder": str(args.vocoder),
                       "snr_gamma": args.snr_gamma, "final": str(run.out / "final" / "pipeline")}, state)


STAGES = {"vocoder": train_vocoder, "vae": train_vae, "unet": train_unet}

__all__ = ["AUDIO_SIZES", "AudioUNetModule", "VocoderModule", "WorldAudio", "build_pipeline", "build_vae",
           "build_vocoder", "frames", "hop", "load_vocoder", "stft_loss", "text_ids"]
