"""Vision towers for LLaVA from an open_clip export (``open_clip_config.json`` + safetensors, as
:func:`mmfast.models.clip.save_pretrained` writes): the ViT becomes a transformers ``CLIPVisionModel``.

open_clip's ViT and HF's CLIP vision model compute the same function (class token + positions, pre-LN,
pre-norm blocks with fused ``in_proj``, GELU MLP); only the names differ, and the fused q/k/v
projection is split in three. Hidden state k is the output of block k in both, so LLaVA's
``vision_feature_layer`` means the same layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_NAME = "open_clip_config.json"


def is_open_clip_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def open_clip_vision(path) -> tuple[object, dict, tuple, tuple]:
    """(CLIPVisionConfig, HF state dict, image mean, image std) of the ViT in an open_clip export."""
    from transformers import CLIPVisionConfig

    from mmfast.utils.io import load_state_dict

    d = Path(path)
    cfg = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    vc = cfg["model_cfg"]["vision_cfg"]
    if vc.get("timm_model_name") or isinstance(vc.get("layers"), (list, tuple)):
        raise ValueError(f"{d}: only open_clip ViT towers convert to a CLIP vision model (got {vc})")
    width, layers = int(vc["width"]), int(vc["layers"])
    heads = width // int(vc.get("head_width", 64))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_state_dict(f))
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    if "conv1.weight" not in v:
        raise ValueError(f"{d}: no ViT weights (visual.conv1.weight missing)")
    mlp = int(v["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=int(vc["image_size"]),
                              patch_size=int(vc["patch_size"]), hidden_act="gelu", layer_norm_eps=1e-5,
                              projection_dim=int(cfg["model_cfg"].get("embed_dim", width)))
    p = ""  # keys of the tower LLaVA builds (AutoModel.from_config of a clip_vision_model config)
    out = {
        p + "embeddings.class_embedding": v["class_embedding"],
        p + "embeddings.patch_embedding.weight": v["conv1.weight"],
        p + "embeddings.position_embedding.weight": v["positional_embedding"],
        p + "pre_layrnorm.weight": v["ln_pre.weight"], p + "pre_layrnorm.bias": v["ln_pre.bias"],
        p + "post_layernorm.weight": v["ln_post.weight"], p + "post_layernorm.bias": v["ln_post.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        for a, b in names.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{b}.{kind}"] = v[f"{src}{a}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, val = v[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"], out[f"{dst}self_attn.k_proj.{kind}"] = q, k
            out[f"{dst}self_attn.v_proj.{kind}"] = val
    pp = cfg.get("preprocess_cfg", {})
    mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
    return config, {k: t.float() for k, t in out.items()}, mean, std


def check_against_open_clip(path, pixels: torch.Tensor, layer: int = -2) -> float:
    """Max |difference| between open_clip's block output and the converted model's hidden state."""
    from transformers import AutoModel

    from mmfast.models.clip.model import create_model

    config, sd, _, _ = open_clip_vision(path)
    hf = AutoModel.from_config(config).eval()
    hf.load_state_dict(sd, strict=False)
    oc = create_model(None, pretrained=path, device="cpu", kernels=False).eval().visual
    with torch.no_grad():
        x = oc.conv1(pixels).flatten(2).transpose(1, 2)  # (N, P, W)
        x = torch.cat([oc.class_embedding.expand(x.shape[0], 1, -1), x], 1) + oc.positional_embedding
        x = oc.ln_pre(x)
        blocks = oc.transformer.resblocks
        for blk in blocks[: len(blocks) + 1 + layer] if layer < 0 else blocks[:layer]:
            x = blk(x)
        h = hf(pixels, output_hidden_states=True).hidden_states[layer]
    return float((h - x).abs().max())


__all__ = ["check_against_open_clip", "is_open_clip_dir", "open_clip_vision"]
