"""NExT-GPT's frozen encoders behind one interface, and its input projections.

Every encoder maps a batch of one modality to ``EncoderOutput(tokens (N, P, D), pooled (N, D))``:

* ``ImageEncoder``: a transformers ``CLIPVisionModel`` (patch tokens, post-LN CLS as pooled); built from
  a config (tiny preset), a local CLIP directory, or an open_clip export (the demo's CLIP, converted by
  :mod:`mmfast.models.llava.vision`).
* ``VideoEncoder``: the image encoder over ``frames`` uniformly sampled frames, mean-pooled over time
  (tokens and pooled vector), as NExT-GPT feeds ImageBind's vision branch.
* ``AudioEncoder``: a transformers ``ASTModel`` over the features of transformers' ``ASTFeatureExtractor``
  (the checkpoint's own when loaded from a directory; no torchaudio needed).

ImageBind is not packaged anywhere installable; an encoder with the same ``forward`` / ``dim`` contract
(for instance ImageBind's towers loaded from a local checkpoint) can be passed to ``NextGPT`` instead.

Input projections (what stage 1 trains): ``linear`` maps the pooled vector to one LLM token (the
original NExT-GPT); ``group`` lets ``n_groups`` learned group tokens cross-attend to the patch tokens and
emits them as concept tokens (the paper's grouping mechanism).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (N, P, D)
    pooled: torch.Tensor  # (N, D)


class ImageEncoder(nn.Module):
    """CLIP vision tower; input (N, 3, S, S) normalised pixels."""

    modality = "image"

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.dim = model.config.hidden_size
        self.image_size = model.config.image_size

    @classmethod
    def from_config(cls, cfg: dict) -> ImageEncoder:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return cls(CLIPVisionModel(CLIPVisionConfig(**cfg)))

    @classmethod
    def from_pretrained(cls, path) -> ImageEncoder:
        """A local CLIP / CLIP-vision directory, or an open_clip export (``open_clip_config.json``)."""
        from transformers import CLIPVisionModel

        from mmfast.models.llava import vision as llava_vision

        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"image encoder directory not found: {d}")
        if llava_vision.is_open_clip_dir(d):
            config, sd, _, _ = llava_vision.open_clip_vision(d)
            model = CLIPVisionModel(config)
            inner = getattr(model, "vision_model", model)  # transformers 5 dropped the wrapper
            missing, unexpected = inner.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if not k.endswith("position_ids")]:
                raise ValueError(f"{d}: converted vision weights do not fit (missing {missing}, unexpected {unexpected})")
            return cls(model)
        return cls(CLIPVisionModel.from_pretrained(str(d), local_files_only=True))

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype))
        return EncoderOutput(out.last_hidden_state[:, 1:], out.pooler_output)  # (N, P, D), (N, D)


class VideoEncoder(nn.Module):
    """The image encoder over sampled frames; input (N, F, 3, S, S), mean over time."""

    modality = "video"

    def __init__(self, image_encoder: ImageEncoder, frames: int = 4):
        super().__init__()
        self.image, self.frames = image_encoder, frames
        self.dim = image_encoder.dim

    def forward(self, videos: torch.Tensor) -> EncoderOutput:
        if videos.dim() != 5 or videos.shape[2] != 3:
            raise ValueError(f"videos must be (N, frames, 3, H, W), got shape {tuple(videos.shape)}")
        n, f = videos.shape[:2]
        idx = torch.linspace(0, f - 1, min(self.frames, f), device=videos.device).round().long()
        x = videos[:, idx].flatten(0, 1)  # (N·F', 3, S, S)
        out = self.image(x)
        t = len(idx)
        tokens = out.tokens.unflatten(0, (n, t)).mean(1)  # (N, P, D)
        return EncoderOutput(tokens, out.pooled.unflatten(0, (n, t)).mean(1))


class AudioEncoder(nn.Module):
    """AST over its own input features; input (N, T) mono waveforms at ``sample_rate``.

    Features come from transformers' ``ASTFeatureExtractor`` (Kaldi-style 128-bin log-mel fbank, 25 ms / 10 ms
    frames, normalised with AudioSet's mean and std; numpy, no torchaudio needed): the checkpoint's own
    ``preprocessor_config.json`` when loaded from a directory, else one matching the config's mel bins and
    frame count."""

    modality = "audio"

    def __init__(self, model, sample_rate: int = 16000, feature_extractor=None):
        super().__init__()
        from transformers import ASTFeatureExtractor

        self.model, self.sample_rate = model, sample_rate
        cfg = model.config
        self.dim, self.n_mels, self.max_frames = cfg.hidden_size, cfg.num_mel_bins, cfg.max_length
        self.fe = feature_extractor or ASTFeatureExtractor(num_mel_bins=cfg.num_mel_bins, max_length=cfg.max_length,
                                                           sampling_rate=sample_rate)
        if (self.fe.num_mel_bins, self.fe.max_length) != (self.n_mels, self.max_frames):
            raise ValueError(f"AST feature extractor gives {self.fe.num_mel_bins} mel bins x {self.fe.max_length} "
                             f"frames but the model expects {self.n_mels} x {self.max_frames}")

    @classmethod
    def from_config(cls, cfg: dict) -> AudioEncoder:
        from transformers import ASTConfig, ASTModel

        cfg = dict(cfg)
        sr = cfg.pop("sample_rate", 16000)
        return cls(ASTModel(ASTConfig(**cfg)), sample_rate=sr)

    @classmethod
    def from_pretrained(cls, path) -> AudioEncoder:
        from transformers import ASTFeatureExtractor, ASTModel

        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"audio encoder directory not found: {d}")
        model = ASTModel.from_pretrained(str(d), local_files_only=True)
        fe = ASTFeatureExtractor.from_pretrained(str(d), local_files_only=True) \
            if (d / "preprocessor_config.json").is_file() else None
        return cls(model, sample_rate=fe.sampling_rate if fe is not None else 16000, feature_extractor=fe)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(N, T) waveforms -> (N, max_frames, n_mels) normalised log-mel fbank, cut or zero-padded in time."""
        waves = [w.detach().float().cpu().numpy() for w in wave]  # fp32 whatever the module's dtype
        out = self.fe(waves, sampling_rate=self.sample_rate, return_tensors="pt")["input_values"]
        return out.to(wave.device)

    def forward(self, wave: torch.Tensor) -> EncoderOutput:
        if wave.dim() != 2:
            raise ValueError(f"audio must be (N, samples) mono waveforms, got shape {tuple(wave.shape)}")
        dtype = next(self.model.parameters()).dtype
        out = self.model(input_values=self.features(wave).to(dtype))
        return EncoderOutput(out.last_hidden_state[:, 2:], out.pooler_output)  # CLS + distillation dropped


# --------------------------------------------------------------------------- input projections
class LinearInputProjection(nn.Module):
    """Pooled (N, D) -> one LLM token (N, 1, H)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.n_tokens = 1

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        return self.proj(enc.pooled.to(self.proj.weight.dtype)).unsqueeze(1)


class GroupInputProjection(nn.Module):
    """``n_groups`` learned group tokens cross-attend to the patch tokens -> (N, G, H) concept tokens.

    ``softmax_g(q_g · k_p / sqrt(d))`` over patches aggregates each group, a residual MLP refines it.
    """

    def __init__(self, in_dim: int, out_dim: int, n_groups: int = 4, heads: int = 4):
        super().__init__()
        self.n_tokens = n_groups
        self.groups = nn.Parameter(torch.randn(n_groups, in_dim) / math.sqrt(in_dim))
        self.norm = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, 2 * in_dim), nn.GELU(),
                                 nn.Linear(2 * in_dim, in_dim))
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        x = self.norm(enc.tokens.to(self.proj.weight.dtype))  # (N, P, D)
        q = self.groups.unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, G, D)
        g = q + self.attn(q, x, x, need_weights=False)[0]
        g = g + self.mlp(g)
        return self.proj(g)  # (N, G, H)


def input_projection(kind: str, in_dim: int, out_dim: int, n_groups: int = 4) -> nn.Module:
    if kind == "linear":
        return LinearInputProjection(in_dim, out_dim)
    if kind == "group":
        return GroupInputProjection(in_dim, out_dim, n_groups)
    raise ValueError(f"input projection must be 'linear' or 'group', got {kind!r}")


def build_encoders(cfg: dict) -> nn.ModuleDict:
    """``{"image", "video", "audio"}`` from the preset's ``encoders`` section (configs or local dirs)."""
    e = cfg["encoders"]
    img = e["image"]
    image = ImageEncoder.from_pretrained(img) if isinstance(img, str) else ImageEncoder.from_config(img)
    aud = e["audio"]
    audio = AudioEncoder.from_pretrained(aud) if isinstance(aud, str) else AudioEncoder.from_config(aud)
    video = VideoEncoder(image, frames=int(e.get("video_frames", 4)))
    enc = nn.ModuleDict({"image": image, "video": video, "audio": audio})
    enc.requires_grad_(False)
    return enc.eval()


__all__ = ["AudioEncoder", "EncoderOutput", "GroupInputProjection", "ImageEncoder", "LinearInputProjection",
           "VideoEncoder", "build_encoders", "input_projection"]
