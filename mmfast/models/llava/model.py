"""LLaVA on transformers' ``LlavaForConditionalGeneration``, made fast with mmfast's kernels.

    llava = build_llava("tiny")                                   # preset (trains on CPU in minutes)
    llava = build_llava(vision="clip-vit-l-336", llm="vicuna-7b")  # local CLIP + LLaMA/Vicuna folders
    llava = build_llava(vision="llava-1.5-7b-hf")                 # a whole llava-hf checkpoint
    loss = llava.loss(batch)                                      # fused linear cross-entropy when kernels
    llava.answer(images, ["Is there a cat in the image?"])        # greedy, stops at the separator
    llava.save_pretrained(dir); load_pretrained(dir)              # llava-hf layout (+ our config keys)

The weights are one HF ``LlavaForConditionalGeneration`` (``llava.model``): vision tower (frozen),
``multi_modal_projector`` and language model, saved in the layout the ecosystem loads. The default
``mlp2x_gelu`` projector is HF's own module (``linear_1``/``linear_2``); ``linear``, ``mlpNx_gelu`` and
``identity`` use :class:`mmfast.nn.MLPProjector` / ``nn.Identity`` and record ``mm_projector_type`` in the
config. ``kernels=True`` applies :func:`mmfast.patch` (attention and the other rules of the table) and
computes the LM loss with :func:`mmfast.ops.fused_linear_cross_entropy` (no (tokens, vocab) logits).

``image_attention="bidirectional"`` lets every position up to the last image token attend both ways
(a prefix-LM mask; default ``"causal"`` as LLaVA): mmfast attention gets it as ``prefix_len``, the
plain transformers attention as a 4-D mask.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmfast.models.llava.data import CLIP_MEAN, CLIP_STD, ImageProcessor, collate
from mmfast.models.llava.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    format_conversation,
    get_template,
    tokenize_conversation,
)
from mmfast.models.presets import preset_names, read_preset

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "llava"
SELECT_FEATURES = {"patch": "default", "cls_patch": "full", "full": "full"}
NATIVE_PROJECTOR = "mlp2x_gelu"
PREFIX_KWARG = "mmfast_prefix_len"  # reaches mmfast's attention through transformers' **kwargs


def list_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def load_preset(name: str) -> dict:
    return read_preset(PRESET_DIR, name, "LLaVA", hint=" (or pass a model directory)")


def _model_type(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")


# --------------------------------------------------------------------------- the model bundle
class Llava:
    """The HF model with its tokenizer, image processor and conversation template."""

    def __init__(self, model, tokenizer, image_processor: ImageProcessor, template: str = "vicuna_v1",
                 image_attention: str = "causal", kernels: bool = False, model_max_length: int = 2048):
        if image_attention not in ("causal", "bidirectional"):
            raise ValueError(f"image_attention must be 'causal' or 'bidirectional', got {image_attention!r}")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.template = get_template(template).name
        self.image_attention, self.kernels, self.model_max_length = image_attention, kernels, model_max_length
        cfg = model.config
        cfg.mmfast_model = "llava"
        cfg.mmfast_template = self.template
        cfg.mmfast_image_attention = image_attention
        cfg.image_aspect_ratio = image_processor.aspect
        cfg.model_max_length = model_max_length

    # ---- facts
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_image_tokens(self) -> int:
        v = self.config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id

    # ---- data
    def tokenize(self, conversations, has_image: bool | None = None, template: str | None = None) -> dict:
        return tokenize_conversation(conversations, self.tokenizer, template or self.template, self.n_image_tokens,
                                     self.model_max_length, has_image=has_image)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples, self.pad_token_id)

    def prompt(self, question: str, with_image: bool = True, template: str | None = None) -> str:
        """The generation prompt for one question (``<image>`` first when there is an image)."""
        value = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        return format_conversation([{"from": "human", "value": value}], template or self.template)

    # ---- compute
    def loss(self, batch: dict, fused: bool | None = None) -> torch.Tensor:
        return llava_loss(self.model, batch, fused=self.kernels if fused is None else fused,
                          image_attention=self.image_attention)

    def logits(self, batch: dict) -> torch.Tensor:
        hidden = forward_hidden(self.model, batch["input_ids"], batch.get("attention_mask"),
                                batch.get("pixel_values"), image_attention=self.image_attention).last_hidden_state
        return self.model.lm_head(hidden)  # (B, L, V)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features merged in (B, L, D): what generation decodes from."""
        return merge_embeddings(self.model, input_ids, pixel_values)

    def hidden(self, input_ids, attention_mask=None, pixel_values=None, **kw):
        """The language model's output (``last_hidden_state``) under this model's image attention."""
        return forward_hidden(self.model, input_ids, attention_mask, pixel_values,
                              image_attention=self.image_attention, **kw)

    def image_prefix_lengths(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) each row's prefix-LM length (through its last image token), for ``image_attention="bidirectional"``."""
        return prefix_lengths(input_ids, self.model.config.image_token_id)

    @property
    def uses_mmfast_attention(self) -> bool:
        return _uses_mmfast_attention(self.model)

    def generate(self, images, prompts, **kw) -> list[str]:
        from mmfast.models.llava.generate import generate  # generation builds on this facade (embed, hidden)

        return generate(self, images, prompts, **kw)

    def answer(self, images, questions, max_new_tokens: int = 16) -> list[str]:
        """One greedy answer per (image, question); ``images[i]`` may be None (text-only)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; they pair one to one")
        prompts = [self.prompt(q, img is not None) for img, q in zip(images, questions)]
        return self.generate(images, prompts, max_new_tokens=max_new_tokens)

    # ---- persistence
    def save_pretrained(self, out_dir, state_dict: dict | None = None) -> Path:
        """llava-hf layout: ``config.json`` (+ ``mmfast_model: llava``), safetensors, tokenizer and processor."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.mmfast_template, self.config.mmfast_image_attention = self.template, self.image_attention
        self.model.save_pretrained(str(out), state_dict=state_dict)
        self.tokenizer.save_pretrained(str(out))
        try:
            from transformers import LlavaProcessor

            LlavaProcessor(image_processor=self.image_processor.to_hf(), tokenizer=self.tokenizer,
                           patch_size=self.config.vision_config.patch_size,
                           vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                           num_additional_image_tokens=1).save_pretrained(str(out))
        except (ImportError, TypeError, ValueError):
            self.image_processor.to_hf().save_pretrained(str(out))
        return out


# --------------------------------------------------------------------------- forward
def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected features (N, P, D) of the selected vision layer (CLS dropped for ``patch``)."""
    inner = model.model
    cfg = model.config
    frozen = not any(p.requires_grad for p in inner.vision_tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        vt_dtype = next(inner.vision_tower.parameters()).dtype
        out = inner.vision_tower(pixel_values.to(vt_dtype), output_hidden_states=True)
        h = out.hidden_states[cfg.vision_feature_layer]  # (N, 1 + P, Dv)
        if cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]
    return inner.multi_modal_projector(h)  # (N, P, D)


def merge_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with each image's features written over its ``<image>`` tokens (B, L, D)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    emb = model.model.get_input_embeddings()(input_ids)  # (B, L, D)
    image_mask = input_ids == model.config.image_token_id  # (B, L)
    n_tokens = int(image_mask.sum())
    if pixel_values is None or pixel_values.numel() == 0:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given "
                             "(a sample with <image> needs its image)")
        return emb
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (n_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
    feats = image_features(model, pixel_values)  # (N, P, D)
    if n_tokens != feats.shape[0] * feats.shape[1]:
        raise ValueError(f"image token count mismatch: input_ids hold {n_tokens} image tokens but "
                         f"{feats.shape[0]} images x {feats.shape[1]} tokens each = {feats.shape[0] * feats.shape[1]} "
                         "features (each <image> expands to the vision tower's patch count)")
    return emb.masked_scatter(image_mask.unsqueeze(-1), feats.to(emb.dtype).reshape(-1, emb.shape[-1]))


def prefix_lengths(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per row, one past the last image token (0 without an image): the bidirectional prefix (B,)."""
    is_img = input_ids == image_token_id  # (B, L)
    pos = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return (is_img * pos).amax(dim=1).to(torch.int32)


def prefix_mask_4d(attention_mask: torch.Tensor, prefix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: causal, plus both ways inside each row's prefix, minus padding."""
    b, length = attention_mask.shape
    i = torch.arange(length, device=attention_mask.device)
    causal = i[None, :, None] >= i[None, None, :]  # (1, L, L)
    in_prefix = (i[None, :] < prefix[:, None].to(i.device))  # (B, L)
    allowed = causal | (in_prefix[:, :, None] & in_prefix[:, None, :])
    allowed = allowed & attention_mask.bool()[:, None, :]
    out = torch.zeros(b, 1, length, length, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _uses_mmfast_attention(model) -> bool:
    return getattr(model.config.text_config, "_attn_implementation", None) == "mmfast"


def forward_hidden(model, input_ids, attention_mask=None, pixel_values=None, *, image_attention="causal",
                   cache=None, position_ids=None, use_cache=False, inputs_embeds=None):
    """The language model's output on merged embeddings (``last_hidden_state`` (B, L, D), cache).

    ``cache`` may be a transformers cache or an :class:`mmfast.models.kv_cache.MmfastKVCache` (needs
    mmfast attention and no ``attention_mask``: right-padded rows at per-row positions)."""
    if inputs_embeds is None:
        inputs_embeds = merge_embeddings(model, input_ids, pixel_values)
    kwargs = {}
    ours = _is_mmfast_cache(cache)
    if ours:
        if not _uses_mmfast_attention(model):
            raise ValueError("an MmfastKVCache needs the model patched with mmfast attention (kernels=True / "
                             "mmfast.patch); use transformers' DynamicCache for this model")
        kwargs.update(cache.attention_kwargs())
    mask = attention_mask
    if image_attention == "bidirectional" and cache_len(cache) == 0:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix = prefix_lengths(input_ids, model.config.image_token_id)
        if _uses_mmfast_attention(model):
            # Prefix counted from each row's first real token: the attention packs out left padding.
            pads = (attention_mask.cumsum(1) == 0).sum(1).to(torch.int32)
            kwargs[PREFIX_KWARG] = (prefix - pads).clamp(min=0)
        else:
            mask = prefix_mask_4d(attention_mask, prefix, inputs_embeds.dtype)
    from mmfast.models.kv_cache import cache_kwargs

    lm = model.model.language_model
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=use_cache,
             **cache_kwargs(lm, cache), **kwargs)
    if ours:
        cache.check_consumed()
    return out


def _is_mmfast_cache(cache) -> bool:
    if cache is None:
        return False
    from mmfast.models.kv_cache import MmfastKVCache

    return isinstance(cache, MmfastKVCache)


def cache_len(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def _active_linear(module):
    """The Linear that runs: peft's ``modules_to_save`` wrapper (a trainable copy of the LM head) is
    looked through, so the fused loss reads the weight being trained."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and not getattr(module, "disable_adapters", False):
        for name in getattr(module, "active_adapters", []) or []:
            if name in copies:
                return copies[name]
        return module.original_module
    return module


def llava_loss(model, batch: dict, fused: bool = True, image_attention: str = "causal") -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised tokens (labels != -100); ``fused`` computes it
    with :func:`mmfast.ops.fused_linear_cross_entropy`, never forming the (tokens, vocab) logits."""
    labels = batch["labels"]
    hidden = forward_hidden(model, batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"),
                            image_attention=image_attention).last_hidden_state  # (B, L, D)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(L-1), D)
    target = labels[:, 1:].reshape(-1).to(h.device)  # (B·(L-1),)
    keep = target != IGNORE_INDEX
    if not bool(keep.any()):
        return hidden.sum() * 0.0  # nothing supervised (all truncated): a zero that keeps the graph
    h, target = h[keep], target[keep]  # only supervised rows reach the LM head
    head = _active_linear(model.lm_head)
    if not fused:
        return nn.functional.cross_entropy(head(h).float(), target)  # (T, V) logits
    from mmfast.models.patch import backend_of
    from mmfast.ops import fused_linear_cross_entropy

    def head_forward(x):
        # Runs inside the head's __call__ and returns the loss itself: DeepSpeed ZeRO-3 gathers the
        # partitioned weight for this forward, and again before this output's backward needs it.
        return fused_linear_cross_entropy(x, head.weight, target, head.bias, backend=backend_of(model))

    head.forward = head_forward
    try:
        return head(h)
    finally:
        del head.forward


class LlavaLossModule(nn.Module):
    """``forward(**batch) -> loss``: the module a training engine (DeepSpeed) wraps."""

    def __init__(self, model, fused: bool = True, image_attention: str = "causal"):
        super().__init__()
        self.model, self.fused, self.image_attention = model, fused, image_attention

    def forward(self, input_ids, labels, attention_mask=None, pixel_values=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "pixel_values": pixel_values}
        return llava_loss(self.model, batch, self.fused, self.image_attention)


# --------------------------------------------------------------------------- construction
def _projector(kind: str, vision_dim: int, text_dim: int):
    from mmfast.models.llava.projector import projector_from_type

    if kind == "identity":
        if vision_dim != text_dim:
            raise ValueError(f"projector 'identity' needs equal widths, got vision {vision_dim} and LLM {text_dim}")
        return nn.Identity()
    return projector_from_type(kind, vision_dim, text_dim)


def _set_projector(model, kind: str) -> None:
    model.config.mm_projector_type = kind
    if kind != NATIVE_PROJECTOR:
        cfg = model.config
        model.model.multi_modal_projector = _projector(kind, cfg.vision_config.hidden_size,
                                                       cfg.text_config.hidden_size).to(model.dtype)


def _image_processor(vision_cfg: dict | None, image_size: int, aspect: str, src: Path | None = None) -> ImageProcessor:
    mean, std = CLIP_MEAN, CLIP_STD
    if vision_cfg:
        mean, std = tuple(vision_cfg.get("image_mean", mean)), tuple(vision_cfg.get("image_std", std))
    if src is not None and (src / "preprocessor_config.json").is_file():
        pc = json.loads((src / "preprocessor_config.json").read_text(encoding="utf-8"))
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    return ImageProcessor(image_size, mean, std, aspect)


def _ensure_image_token(model, tokenizer) -> None:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA's choice for LLaMA tokenizers
    n = len(tokenizer)
    if model.get_input_embeddings().num_embeddings < n:
        model.resize_token_embeddings(n)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.pad_token_id = tokenizer.pad_token_id


def _finish(model, kernels: bool, backend: str | None):
    model.model.vision_tower.requires_grad_(False)
    if kernels:
        from mmfast.models.patch import patch

        patch(model, backend=backend)
    return model


def build_llava(vision: str = "tiny", llm: str | None = None, projector: str | None = None,
                vision_select_layer: int | None = None, vision_select_feature: str | None = None,
                kernels: bool = True, image_attention: str = "causal", *, template: str | None = None,
                image_aspect_ratio: str | None = None, model_max_length: int | None = None, tokenizer=None,
                device=None, dtype=None, seed: int | None = None, attn_implementation: str = "sdpa",
                backend: str | None = None) -> Llava:
    """A LLaVA from a preset name, a llava-hf directory, or a CLIP vision directory plus an LLM directory.

    ``projector``: ``linear``, ``mlpNx_gelu`` or ``identity`` (default the preset's / ``mlp2x_gelu``);
    ``vision_select_feature``: ``patch`` (drop CLS) or ``cls_patch``. Loading is local only, never
    ``trust_remote_code``. ``attn_implementation`` is the transformers attention before patching.
    """
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    if seed is not None:
        torch.manual_seed(seed)
    from mmfast.models.llava import vision as llava_vision

    vpath = Path(vision)
    preset = None if vpath.is_dir() else load_preset(vision)
    if preset is None and _model_type(vpath) == "llava":
        if llm is not None:
            raise ValueError(f"{vision} is a whole llava-hf checkpoint; do not pass llm={llm!r}")
        return load_pretrained(vpath, device=device, dtype=dtype, kernels=kernels, image_attention=image_attention)
    # llm: None (the vision preset's LLM), a preset name (its LLM + tokenizer) or a LLaMA/Vicuna folder.
    llm_dir = Path(llm) if llm is not None and Path(llm).is_dir() else None
    llm_preset = load_preset(llm) if llm is not None and llm_dir is None else None
    if preset is None and llm is None:
        raise ValueError(f"vision={vision!r} is a vision directory; pass llm= (a LLaMA/Vicuna directory or a preset)")
    text_src = llm_preset or (preset if llm is None else None)
    vision_sd, vision_stats = None, None
    if preset is not None:
        vision_config = AutoConfig.for_model(**{k: v for k, v in preset["vision"].items()
                                                if k not in ("image_mean", "image_std")})
    elif llava_vision.is_open_clip_dir(vpath):
        vision_config, vision_sd, *vision_stats = llava_vision.open_clip_vision(vpath)
    else:
        vision_config = AutoConfig.from_pretrained(str(vpath), local_files_only=True)
        if getattr(vision_config, "model_type", "") == "clip":
            vision_config = vision_config.vision_config
    if text_src is not None:
        text_config = AutoConfig.for_model(**text_src["llm"])
        tok_src = PRESET_DIR / text_src["tokenizer"]
    else:
        text_config = AutoConfig.from_pretrained(str(llm_dir), local_files_only=True)
        tok_src = llm_dir
    tok = tokenizer or AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    pre = {**(text_src or {}), **(preset or {})}
    projector = projector or pre.get("projector", NATIVE_PROJECTOR)
    select = vision_select_feature or pre.get("vision_select_feature", "patch")
    if select not in SELECT_FEATURES:
        raise ValueError(f"vision_select_feature must be one of {sorted(SELECT_FEATURES)}, got {select!r}")
    layer = vision_select_layer if vision_select_layer is not None else pre.get("vision_select_layer", -2)
    if text_src is not None:  # a preset's LLM is built for its tokenizer; a pretrained one is resized below
        text_config.vocab_size = len(tok) + (IMAGE_TOKEN not in tok.get_vocab())
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                         image_token_id=0, vision_feature_layer=layer,
                         vision_feature_select_strategy=SELECT_FEATURES[select], projector_hidden_act="gelu",
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    if vision_sd is not None:
        missing, unexpected = model.model.vision_tower.load_state_dict(vision_sd, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise ValueError(f"{vpath}: converted vision weights do not fit (missing {missing}, unexpected {unexpected})")
    _load_parts(model, vpath if preset is None and vision_sd is None else None, llm_dir)
    _ensure_image_token(model, tok)
    _set_projector(model, projector)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    _finish(model, kernels, backend)
    ip = _image_processor(pre.get("vision"), vision_config.image_size,
                          image_aspect_ratio or pre.get("image_aspect_ratio", "pad"),
                          None if preset is not None else vpath)
    if vision_stats:
        ip.mean, ip.std = vision_stats
    return Llava(model, tok, ip, template or pre.get("template", "vicuna_v1"), image_attention, kernels,
                 model_max_length or pre.get("model_max_length", getattr(tok, "model_max_length", 2048)))


def _load_parts(model, vision_dir: Path | None, llm_dir: Path | None) -> None:
    """Copy pretrained vision-tower / LLM weights into a freshly built LLaVA."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    if vision_dir is not None:
        vt = CLIPVisionModel.from_pretrained(str(vision_dir), local_files_only=True)
        model.model.vision_tower.load_state_dict(vt.state_dict())
    if llm_dir is not None:
        lm = AutoModelForCausalLM.from_pretrained(str(llm_dir), local_files_only=True)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())


def _load_projector_from(model, d: Path) -> None:
    from mmfast.utils.io import load_state_dict

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights")
    proj = {}
    for f in files:
        for k, v in load_state_dict(f).items():
            head, sep, rest = k.partition("multi_modal_projector.")
            if sep and head in ("", "model."):
                proj[rest] = v
    module = model.model.multi_modal_projector
    missing, unexpected = module.load_state_dict(proj, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: projector weights do not match mm_projector_type={model.config.mm_projector_type!r} "
                         f"(missing {missing}, unexpected {unexpected})")
    module.to(model.dtype)


def load_pretrained(model_dir, device=None, dtype=None, kernels: bool | None = None,
                    image_attention: str | None = None, backend: str | None = None) -> Llava:
    """A saved LLaVA (ours or any llava-hf checkpoint); LoRA adapters in ``model_dir`` are applied.

    ``kernels`` defaults to True on CUDA. Returns a :class:`Llava` (``answer`` for evaluation adapters).
    """
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a model directory (missing config.json)")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    kernels = (device.type == "cuda") if kernels is None else kernels
    config = LlavaConfig.from_pretrained(str(d), local_files_only=True)
    kind = getattr(config, "mm_projector_type", NATIVE_PROJECTOR)
    # transformers maps the checkpoint's key layout (llava-hf's, old or new) onto the model; a projector
    # other than HF's own module is then swapped in and loaded from the same files.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if kind != NATIVE_PROJECTOR:  # its projector keys are "unexpected" to HF's module: not worth a warning
        hf_logging.set_verbosity_error()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(d), local_files_only=True, dtype=dtype,
                                                              attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(level)
    if kind != NATIVE_PROJECTOR:
        _set_projector(model, kind)
        _load_projector_from(model, d)
    if (d / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(d), is_trainable=False).merge_and_unload()
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    if IMAGE_TOKEN not in tok.get_vocab():
        raise ValueError(f"{d}: the tokenizer has no {IMAGE_TOKEN} token")
    _finish(model, kernels, backend)
    v = config.vision_config
    aspect = getattr(config, "image_aspect_ratio", "pad")
    ip = _image_processor(None, v.image_size, aspect if aspect in ("pad", "resize", "crop") else "pad", d)
    template = getattr(config, "mmfast_template", None) or "vicuna_v1"
    return Llava(model, tok, ip, template, image_attention or getattr(config, "mmfast_image_attention", "causal"),
                 kernels, getattr(config, "model_max_length", 2048))


__all__ = [
    "PREFIX_KWARG",
    "Llava",
    "LlavaLossModule",
    "build_llava",
    "format_conversation",
    "forward_hidden",
    "image_features",
    "list_presets",
    "llava_loss",
    "load_preset",
    "load_pretrained",
    "merge_embeddings",
    "tokenize_conversation",
]
