"""NExT-GPT's frozen diffusion decoders (diffusers) and the output projections that condition them.

Decoders, conditioned through ``prompt_embeds`` (the LLM never goes through their tokenizer at
generation time):

* image: ``StableDiffusionPipeline``, conditioning (B, 77, 768) for SD 1.5;
* video: ``TextToVideoSDPipeline`` (ZeroScope / ModelScope layout, the paper's) or ``AnimateDiffPipeline`` (an image
  UNet with motion modules: the tiny preset's, :func:`video_unet`), same conditioning shape;
* audio: ``AudioLDMPipeline`` (present in diffusers 0.42; its conditioning is the CLAP text projection,
  (B, D), fed to the UNet as a class embedding).

``tiny`` presets build small UNets / VAEs / vocoders / text encoders from configs (random, frozen), with
the tiny LLM's tokenizer standing in for each decoder's tokenizer; a string in the preset is a local
pipeline directory loaded with ``local_files_only=True``. Nothing downloads.

The output projection (stage 2) maps the signal tokens' last hidden states plus their input embeddings
(B, S, H) -> Linear -> a small transformer where ``n_queries`` learned queries attend to them ->
Linear -> (B, Q, C), the decoder's text-conditioning shape. :func:`text_condition` gives the decoder's
own embedding of a caption, the target of the alignment loss.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

MODALITIES = ("image", "video", "audio")


class OutputProjection(nn.Module):
    """(B, S, H) signal-token states -> (B, Q, C) decoder conditioning."""

    def __init__(self, in_dim: int, out_shape: tuple[int, int], width: int = 64, layers: int = 1, heads: int = 4,
                 ffn: int | None = None):
        super().__init__()
        self.out_shape = tuple(out_shape)
        n_q, c = self.out_shape
        self.inp = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(n_q, width) * 0.02)
        self.transformer = nn.Transformer(d_model=width, nhead=heads, num_encoder_layers=layers,
                                          num_decoder_layers=layers, dim_feedforward=ffn or 2 * width, dropout=0.0,
                                          batch_first=True)
        self.out = nn.Linear(width, c)

    def forward(self, signal_hidden: torch.Tensor) -> torch.Tensor:
        x = self.inp(signal_hidden.to(self.inp.weight.dtype))  # (B, S, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, W)
        return self.out(self.transformer(x, q))  # (B, Q, C)


# --------------------------------------------------------------------------- tiny pipelines
def _vae(channels: int, cfg: dict):
    from diffusers import AutoencoderKL

    blocks = tuple(cfg.get("vae_channels", (16, 32)))
    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=blocks,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=4,
                         norm_num_groups=min(8, blocks[0]), layers_per_block=1)


def _clip_text(cfg: dict, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg["text_encoder"]
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=c["hidden_size"],
                                        intermediate_size=2 * c["hidden_size"], num_hidden_layers=c["layers"],
                                        num_attention_heads=c["heads"], max_position_embeddings=c["max_length"],
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1))


def _tokenizer(tokenizer, max_length: int):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = max_length
    return tok


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _unet_kwargs(cfg: dict) -> dict:
    """The tiny cross-attention ``UNet2DConditionModel``'s arguments (images, and the video UNet grown from it)."""
    ch = tuple(cfg.get("unet_channels", (16, 32)))
    return {"sample_size": cfg["latent_size"], "in_channels": 4, "out_channels": 4, "block_out_channels": ch,
            "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": cfg["text_encoder"]["hidden_size"], "attention_head_dim": 4,
            "norm_num_groups": min(8, ch[0])}


def _conditioning(cfg: dict, tokenizer) -> dict:
    """A tiny pipeline's VAE, CLIP text encoder and tokenizer (built in that order)."""
    return {"vae": _vae(3, cfg), "text_encoder": _clip_text(cfg, len(tokenizer)),
            "tokenizer": _tokenizer(tokenizer, cfg["text_encoder"]["max_length"])}


def tiny_image_pipeline(cfg: dict, tokenizer):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(**_unet_kwargs(cfg))
    return StableDiffusionPipeline(**_conditioning(cfg, tokenizer), unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


MOTION_HEADS = 4  # heads of each motion module's attention


FRAME_ATTENTION = 4.0  # scale of the frame-position head's query, key and value maps at init (see video_unet)
FRAME_CONTENT = 0.1  # what the first temporal attention reads of the content at init, against the positions


def video_unet(image_unet):
    """A ``UNetMotionModel`` grown from ``image_unet`` (AnimateDiff): all its weights, and after every block a
    motion module (diffusers' ``MotionAdapter`` of its layout: a temporal transformer with sinusoidal frame
    positions, random weights) whose output projection is zeroed, so that it starts as the identity and the
    video UNet as ``image_unet`` run on every frame alone.

    Each motion module's first temporal attention starts with a frame-position head: head 0's query, key and
    value maps are ``FRAME_ATTENTION`` x the identity on its own dims, where the fastest sinusoids of the frame
    positions are, and the block's first norm lets ``FRAME_CONTENT`` of the content through. With diffusers'
    random start the attention over a few frames is near uniform and a module's output is nearly the same for
    every frame (0.0074 % of the UNet's output differs between identical frames, of a 6.9 % motion share), so
    no frame learns where its object is: 16 clips trained on for 400 full-batch steps still moved their objects
    at random (direction 0.19-0.31). With this start a frame's own position reaches it (3.9 % of the output
    differs between identical frames), and the same 16 clips moved the right way 0.56-0.69 of the time. (Over
    the world's 1,962 single-mover clips 2,000 steps learnt no direction with or without it:
    docs/nextgpt_decoders.md.)"""
    from diffusers import MotionAdapter, UNetMotionModel

    c = image_unet.config
    adapter = MotionAdapter(block_out_channels=tuple(c.block_out_channels), motion_layers_per_block=c.layers_per_block,
                            motion_num_attention_heads=MOTION_HEADS, motion_norm_num_groups=c.norm_num_groups,
                            use_motion_mid_block=True)
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    with torch.no_grad():
        for name, m in unet.named_modules():
            if ".motion_modules." in name and name.endswith("proj_out"):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            if ".motion_modules." in name and name.endswith("transformer_blocks.0"):
                d = m.norm1.weight.numel() // MOTION_HEADS
                m.norm1.weight.mul_(FRAME_CONTENT)
                m.norm1.bias.mul_(FRAME_CONTENT)
                for lin in (m.attn1.to_q, m.attn1.to_k, m.attn1.to_v):
                    lin.weight[:d] = 0.0
                    lin.weight[:d, :d] = FRAME_ATTENTION * torch.eye(d)
                for lin in (m.attn1.to_q, m.attn1.to_k):  # the other heads attend evenly over the frames
                    lin.weight[d:] = 0.0
    return unet


def tiny_video_pipeline(cfg: dict, tokenizer):
    from diffusers import AnimateDiffPipeline, UNet2DConditionModel

    unet = video_unet(UNet2DConditionModel(**_unet_kwargs(cfg)))
    return AnimateDiffPipeline(**_conditioning(cfg, tokenizer), unet=unet, motion_adapter=None, scheduler=_scheduler())


def tiny_audio_pipeline(cfg: dict, tokenizer):
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    c = cfg["text_encoder"]
    d = c["projection_dim"]
    ch = tuple(cfg.get("unet_channels", (16, 32)))
    unet = UNet2DConditionModel(sample_size=cfg["latent_size"], in_channels=4, out_channels=4, block_out_channels=ch,
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=ch,
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=d,
                                class_embeddings_concat=True, attention_head_dim=4, norm_num_groups=min(8, ch[0]))
    text = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=c["hidden_size"], intermediate_size=2 * c["hidden_size"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], projection_dim=d,
        max_position_embeddings=c["max_length"] + 4, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    vae_scale = 2 ** (len(cfg.get("vae_channels", (16, 32))) - 1)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=cfg["latent_size"] * vae_scale, sampling_rate=cfg.get("sample_rate", 16000),
        upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    return AudioLDMPipeline(vae=_vae(1, cfg), text_encoder=text, tokenizer=_tokenizer(tokenizer, c["max_length"]),
                            unet=unet, scheduler=_scheduler(), vocoder=vocoder)


TINY_BUILDERS = {"image": tiny_image_pipeline, "video": tiny_video_pipeline, "audio": tiny_audio_pipeline}
PIPELINE_CLASSES = {"image": ("StableDiffusionPipeline",), "video": ("TextToVideoSDPipeline", "AnimateDiffPipeline"),
                    "audio": ("AudioLDMPipeline",)}


WEIGHTS = Path(__file__).resolve().parent / "weights"  # the trained decoders shipped in the package


def shipped_dir(name: str) -> Path:
    """The shipped pipeline folder ``weights/<name>`` (:mod:`mmfast.models.nextgpt.shipped`); a clear error when
    this build has none."""
    d = WEIGHTS / name
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(f"no shipped {name} decoder in {d}: `make decoders` trains it (issue #24)")
    return d


def load_pipeline(modality: str, spec, tokenizer):
    """A frozen pipeline from a tiny config dict, a local directory, or ``"shipped:<name>"``: a trained decoder
    shipped in the package (:mod:`mmfast.models.nextgpt.shipped`)."""
    if isinstance(spec, str):
        import diffusers

        if spec.startswith("shipped:"):
            d = shipped_dir(spec.split(":", 1)[1])
        else:
            d = Path(spec)
        if not d.is_dir():
            raise FileNotFoundError(f"{modality} decoder directory not found: {d}")
        index = d / "model_index.json"
        kind = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
        if kind not in PIPELINE_CLASSES[modality]:
            raise ValueError(f"{modality} decoder {d}: model_index.json names {kind!r}, expected one of "
                             f"{PIPELINE_CLASSES[modality]}")
        # safetensors only: a pipeline folder is an untrusted file, no pickle is loaded from it
        pipe = getattr(diffusers, kind).from_pretrained(str(d), local_files_only=True, dtype=torch.float32,
                                                        use_safetensors=True)
    else:
        pipe = TINY_BUILDERS[modality](spec, tokenizer)
    for name in ("vae", "text_encoder", "unet", "vocoder"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition_shape(modality: str, pipe) -> tuple[int, int]:
    """(Q, C): the decoder's text conditioning per sample (Q = 1 for AudioLDM's pooled CLAP vector)."""
    te = pipe.text_encoder.config
    if modality == "audio":
        return 1, te.projection_dim
    return pipe.tokenizer.model_max_length, te.hidden_size


@torch.no_grad()
def text_condition(modality: str, pipe, captions: list[str], device=None) -> torch.Tensor:
    """The decoder's own conditioning for ``captions``: (B, Q, C), the alignment target."""
    tok = pipe.tokenizer
    device = device or pipe.text_encoder.device
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    te = pipe.text_encoder
    if modality == "audio":
        out = te(ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device)).text_embeds  # (B, C)
        return nn.functional.normalize(out, dim=-1).unsqueeze(1)
    return te(ids.input_ids.to(device))[0]  # (B, 77, C)


def to_pipeline_embeds(modality: str, cond: torch.Tensor) -> torch.Tensor:
    return cond[:, 0] if modality == "audio" else cond


def log_mel(waveforms: torch.Tensor, sample_rate: int, n_mels: int, hop: int) -> torch.Tensor:
    """(B, T) waveforms -> (B, T // hop, n_mels) log-mel spectrograms, AudioLDM's TacotronSTFT recipe: FFT window
    the next power of two >= 4 hops, 0 .. sr/2 Hz, Slaney filters, log of the magnitude clamped at 1e-5. Frame
    ``i`` is centred on sample ``i * hop``; the last, partial frame is dropped, so a clip of ``frames * hop``
    samples gives the ``frames`` a vocoder upsampling ``hop`` times turns back into it."""
    from transformers.audio_utils import mel_filter_bank

    n_fft = 1 << (4 * hop - 1).bit_length()
    fb = torch.as_tensor(mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                                         max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney",
                                         mel_scale="slaney"), dtype=torch.float32, device=waveforms.device)  # (F, M)
    x = waveforms.float()
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft, device=x.device),
                      return_complex=True).abs()  # (B, F, 1 + T // hop)
    return torch.log(torch.clamp(spec.transpose(1, 2) @ fb, min=1e-5))[:, :x.shape[1] // hop]


def vocoder_mel(pipe, waveforms: torch.Tensor) -> torch.Tensor:
    """(B, T) waveforms -> (B, T // hop, M): :func:`log_mel` in the layout of ``pipe``'s vocoder (its sampling rate,
    ``model_in_dim`` bins, hop = its total upsampling), the input it turns back into the waveform."""
    import math

    voc = pipe.vocoder.config
    return log_mel(waveforms, int(voc.sampling_rate), int(voc.model_in_dim), int(math.prod(voc.upsample_rates)))


def audio_mel(pipe, waveforms: torch.Tensor) -> torch.Tensor:
    """(B, T) waveforms -> (B, 1, frames, n_mels) log-mel spectrograms in the AudioLDM VAE's layout: the vocoder's
    mel layout (:func:`log_mel` with ``model_in_dim`` bins and hop = the vocoder's total upsampling, 160 samples at
    16 kHz for AudioLDM), frames zero-padded to what the VAE and UNet downsampling divide."""
    import math

    mel = vocoder_mel(pipe, waveforms)
    mult = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    mel = nn.functional.pad(mel, (0, 0, 0, -mel.shape[1] % mult), value=math.log(1e-5))
    return mel.unsqueeze(1)  # (B, 1, frames, M)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts at ``t``, by its scheduler's ``prediction_type``: the noise (``epsilon``, Stable
    Diffusion's) or the velocity ``sqrt(abar) * noise - sqrt(1 - abar) * latents`` (``v_prediction``, the shipped
    audio decoder's)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"scheduler prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")


def frame_context(unet, cond: torch.Tensor, frames: int) -> torch.Tensor:
    """A video UNet's cross-attention context for (B, L, C) ``cond``: AnimateDiff's ``UNetMotionModel`` takes it
    once per frame, (B * F, L, C), as ``AnimateDiffPipeline`` repeats it; ``UNet3DConditionModel`` as it is."""
    return cond.repeat_interleave(frames, 0) if type(unet).__name__ == "UNetMotionModel" else cond


def _encode(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.encode(x.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def diffusion_loss(modality: str, pipe, cond: torch.Tensor, target_media: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE (or velocity, :func:`prediction_target`) of the frozen UNet on the target media's latents, conditioned as the pipeline
    conditions on ``prompt_embeds`` = the projected ``cond`` (R, Q, C):

    * image: ``target_media`` (R, 3, S, S) in [-1, 1]; ``encoder_hidden_states=cond``;
    * video: (R, F, 3, S, S) in [-1, 1]; frames encoded one by one, latents (R, 4, F, h, w) as the
      pipeline lays them out; ``encoder_hidden_states=cond`` (once per frame for AnimateDiff's UNet,
      :func:`frame_context`);
    * audio: (R, T) waveforms -> log-mel (:func:`audio_mel`) -> latents; AudioLDM feeds its pooled text
      embedding as ``class_labels`` (no cross-attention context), so ``class_labels=cond[:, 0]``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    want = {"image": 4, "video": 5, "audio": 2}[modality]
    if target_media.dim() != want or target_media.shape[0] != cond.shape[0]:
        raise ValueError(f"{modality} diffusion targets must be {want}-D with {cond.shape[0]} items (one per "
                         f"signal run), got {tuple(target_media.shape)}")
    vae, unet, sched = pipe.vae, pipe.unet, pipe.scheduler
    with torch.no_grad():  # the VAE is frozen and the target needs no gradient
        if modality == "image":
            latents = _encode(vae, target_media)  # (R, 4, h, w)
        elif modality == "video":
            r, f = target_media.shape[:2]
            lat = _encode(vae, target_media.flatten(0, 1))  # (R·F, 4, h, w)
            latents = lat.reshape(r, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4)  # (R, 4, F, h, w)
        else:
            latents = _encode(vae, audio_mel(pipe, target_media))  # (R, 4, frames/v, M/v)
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    embeds = to_pipeline_embeds(modality, cond).to(unet.dtype)
    if modality == "audio":
        pred = unet(noisy, t, encoder_hidden_states=None, class_labels=embeds).sample
    elif modality == "video":
        pred = unet(noisy, t, encoder_hidden_states=frame_context(unet, embeds, latents.shape[2])).sample
    else:
        pred = unet(noisy, t, encoder_hidden_states=embeds).sample
    return nn.functional.mse_loss(pred.float(), prediction_target(sched, latents, noise, t).float())


@torch.no_grad()
def decode(modality: str, pipe, cond: torch.Tensor, steps: int = 10, seed: int = 0, **kw):
    """Run the pipeline on projected conditioning; numpy arrays: image (B, H, W, 3), video (B, F, H, W, 3)
    in [0, 1], audio (B, T) waveforms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    embeds = to_pipeline_embeds(modality, cond).to(pipe.text_encoder.dtype)
    # guidance's unconditional branch: the decoder's own embedding of "", as the pipelines make it for a
    # negative prompt "" (the branch the decoder trained on with dropped captions)
    uncond = to_pipeline_embeds(modality, text_condition(modality, pipe, [""], device=embeds.device))
    neg = uncond.to(embeds.dtype).expand_as(embeds)
    common = {"prompt_embeds": embeds, "negative_prompt_embeds": neg, "num_inference_steps": steps,
              "generator": gen, "guidance_scale": kw.pop("guidance_scale", 1.0)}
    if modality == "image":
        return pipe(output_type="np", **common, **kw).images
    if modality == "video":
        return pipe(output_type="np", num_frames=kw.pop("num_frames", 4), **common, **kw).frames
    return pipe(audio_length_in_s=kw.pop("audio_length_in_s", 0.5), output_type="np", **common, **kw).audios


__all__ = ["MODALITIES", "MOTION_HEADS", "OutputProjection", "audio_mel", "condition_shape", "decode", "diffusion_loss",
           "frame_context", "load_pipeline", "log_mel", "prediction_target", "text_condition", "tiny_audio_pipeline",
           "tiny_image_pipeline", "tiny_video_pipeline", "video_unet", "vocoder_mel"]
