"""LLaVA-1.5-7B's shapes, truncated: the model the LLaVA benchmarks (``benchmarks/bench_train_llava.py``,
``benchmarks/bench_generate.py``) measure on GPU."""
from __future__ import annotations

import torch


def llava7b_trunc(layers: int, vision_layers: int, device):
    """``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's shapes — ViT-L/14-336 (576 image tokens),
    LLaMA-7B (4096 wide, 32 heads, vocab 32064) — truncated to ``layers`` LLM and ``vision_layers``
    vision layers; SDPA attention, random weights (``torch.manual_seed(0)``) built on ``device``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlavaForConditionalGeneration(config)


__all__ = ["llava7b_trunc"]
