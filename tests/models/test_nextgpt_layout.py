"""The ``vicuna7b`` preset: its layout on the meta device (no weight is allocated, nothing is read from disk),
and its code path (every part a local directory) with tiny parts saved in the real checkpoints' layouts.

The preset names local checkpoint directories; their architectures are the public ``config.json`` values
below, so the test builds each part from them with the library's own constructors (LoRA through
``NextGPT.add_lora``, projections through ``input_projection`` / ``OutputProjection``, conditioning shapes
through ``condition_shape``) and checks LLaMA-7B's shapes, each decoder's conditioning shape and the
trainable share the issue promises (~1%, as the NExT-GPT paper: 131M of ~12B).
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from mmfast.models.nextgpt import data as nd
from mmfast.models.nextgpt import decoders as ndec
from mmfast.models.nextgpt import encoders as nenc
from mmfast.models.nextgpt import model as ng

# config.json of lmsys/vicuna-7b (LLaMA-7B), openai/clip-vit-large-patch14 (vision), the AudioSet AST.
VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
CLIP_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14}
AST = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
       "num_mel_bins": 128, "max_length": 1024}
# Decoders: text encoders (SD 1.5: CLIP ViT-L text; ZeroScope: OpenCLIP ViT-H text; AudioLDM-L: CLAP text with
# a 512-d projection), SD 1.5's UNet / VAE, ZeroScope's 3-D UNet (same VAE).
SD_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "max_position_embeddings": 77, "vocab_size": 49408}
ZEROSCOPE_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                  "max_position_embeddings": 77, "vocab_size": 49408}
CLAP_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "projection_dim": 512, "vocab_size": 50265, "max_position_embeddings": 514}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture(scope="module")
def layout():
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    cfg = ng.load_preset("vicuna7b")
    n_new = len(nd.PLACEHOLDERS) + sum(nd.N_SIGNAL.values())  # as NextGPT.__init__ adds them
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
        llm.resize_token_embeddings(VICUNA_7B["vocab_size"] + n_new, mean_resizing=False)
        stub = types.SimpleNamespace(cfg=cfg, llm=llm, lora_config=None)
        ng.NextGPT.add_lora(stub)  # the preset's LoRA, as stage 3 adds it
        image = nenc.ImageEncoder.from_config(CLIP_L14)
        audio = nenc.AudioEncoder.from_config(AST)
        hidden = llm.config.hidden_size
        kind, groups = cfg["input_projection"], cfg["n_groups"]
        in_proj = {m: nenc.input_projection(kind, e.dim, hidden, groups)
                   for m, e in (("image", image), ("video", image), ("audio", audio))}
        pipes = {
            "image": types.SimpleNamespace(text_encoder=CLIPTextModel(CLIPTextConfig(**SD_TEXT)),
                                           tokenizer=types.SimpleNamespace(model_max_length=77),
                                           unet=UNet2DConditionModel(cross_attention_dim=768),
                                           vae=AutoencoderKL(**SD_VAE)),
            "video": types.SimpleNamespace(text_encoder=CLIPTextModel(CLIPTextConfig(**ZEROSCOPE_TEXT)),
                                           tokenizer=types.SimpleNamespace(model_max_length=77),
                                           unet=UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64),
                                           vae=AutoencoderKL(**SD_VAE)),
            # AudioLDM's UNet, VAE and vocoder are left out of the total: the share below is an upper bound.
            "audio": types.SimpleNamespace(text_encoder=ClapTextModelWithProjection(ClapTextConfig(**CLAP_TEXT)),
                                           tokenizer=types.SimpleNamespace(model_max_length=77)),
        }
        op = cfg["output_projection"]
        out_proj = {m: ndec.OutputProjection(hidden, ndec.condition_shape(m, pipes[m]), op["width"], op["layers"],
                                             op["heads"], op.get("ffn")) for m in nd.MODALITIES}
    decoders = [getattr(p, k) for p in pipes.values() for k in ("text_encoder", "unet", "vae") if hasattr(p, k)]
    return types.SimpleNamespace(cfg=cfg, llm=llm, n_new=n_new, image=image, audio=audio, in_proj=in_proj,
                                 out_proj=out_proj, pipes=pipes, decoders=decoders)


def test_vicuna7b_llm_shapes_on_meta(layout):
    llm = layout.llm
    assert llm.lm_head.weight.is_meta  # nothing was allocated
    c = llm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (4096, 32, 32, 11008)
    vocab = 32000 + layout.n_new  # 3 placeholders + [IMG0-3] + [VID0-23] + [AUD0-7]
    assert layout.n_new == 3 + 4 + 24 + 8
    assert llm.get_input_embeddings().weight.shape == (vocab, 4096) == llm.lm_head.weight.shape
    base = sum(p.numel() for n, p in llm.named_parameters() if "lora_" not in n)
    assert 6.7e9 < base < 6.8e9  # LLaMA-7B: 6.74B
    lora = {n for n, _ in llm.named_parameters() if "lora_" in n}
    targets = {n.split(".")[-4] for n in lora}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(lora) == 32 * 4 * 2


def test_vicuna7b_projection_shapes_match_the_decoders(layout):
    assert layout.out_proj["image"].out_shape == (77, 768)  # Stable Diffusion 1.5's prompt_embeds
    assert layout.out_proj["video"].out_shape == (77, 1024)  # ZeroScope (OpenCLIP ViT-H text)
    assert layout.out_proj["audio"].out_shape == (1, 512)  # AudioLDM: the CLAP text projection
    assert layout.pipes["image"].unet.config.cross_attention_dim == 768
    for m in nd.MODALITIES:
        p = layout.out_proj[m]
        assert p.inp.in_features == 4096 and p.queries.shape[0] == p.out_shape[0]
        assert p.out.out_features == p.out_shape[1]
    assert layout.in_proj["image"].proj.weight.shape == (4096, 1024)
    assert layout.in_proj["audio"].proj.weight.shape == (4096, 768)


def test_vicuna7b_trains_about_one_percent(layout):
    lora = sum(p.numel() for n, p in layout.llm.named_parameters() if "lora_" in n)
    rows = 2 * layout.n_new * 4096  # the added tokens' embedding and LM-head rows (stage 2)
    proj = _count(*layout.in_proj.values(), *layout.out_proj.values())
    trainable = lora + rows + proj
    total = _count(layout.llm, layout.image, layout.audio, *layout.decoders, *layout.in_proj.values(),
                   *layout.out_proj.values())
    each_out = _count(layout.out_proj["image"])
    assert 30e6 < each_out < 34e6, each_out  # the original's 31M Transformer output projection
    assert 33e6 < lora < 34e6, lora  # r = 32 on q/k/v/o of 32 layers: 33.5M, as the original
    share = trainable / total
    assert 0.008 < share < 0.015, (trainable, total, share)


def test_a_preset_of_local_directories_builds_trains_and_reloads(tmp_path):
    """The GPU preset's code path (every part a local directory, as ``vicuna7b`` names them), exercised with
    tiny parts saved the way the real checkpoints are laid out: LLaMA + tokenizer folder, CLIP vision and AST
    folders, diffusers pipeline folders. Nothing is copied into the NExT-GPT save but the trainable weights."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    llm, tok, _ = ng._build_llm("tiny")
    llm.save_pretrained(tmp_path / "vicuna")
    tok.save_pretrained(tmp_path / "vicuna")
    tiny = ng.build_nextgpt("tiny", seed=0, kernels=False)
    tiny.encoders["image"].model.save_pretrained(tmp_path / "clip")
    tiny.encoders["audio"].model.save_pretrained(tmp_path / "ast")
    from transformers import ASTFeatureExtractor

    ASTFeatureExtractor(num_mel_bins=32, max_length=64, mean=-3.0).save_pretrained(tmp_path / "ast")
    for m in nd.MODALITIES:
        tiny.pipes[m].save_pretrained(tmp_path / f"decoder_{m}")
    cfg = {**ng.load_preset("tiny"), "llm": str(tmp_path / "vicuna"),
           "encoders": {"image": str(tmp_path / "clip"), "audio": str(tmp_path / "ast"), "video_frames": 4},
           "decoders": {m: str(tmp_path / f"decoder_{m}") for m in nd.MODALITIES}}
    model = ng.build_nextgpt(cfg, kernels=False)
    assert model.base_vocab == len(tok) and len(model.new_ids) == 2 + 4 + 24 + 8  # <image> is already there
    assert torch.equal(model.llm.model.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert model.encoders["audio"].fe.mean == -3.0  # the checkpoint's own feature extractor
    for m in nd.MODALITIES:
        assert torch.equal(model.pipes[m].unet.conv_in.weight, tiny.pipes[m].unet.conv_in.weight)
        assert model.output_proj[m].out_shape == tiny.output_proj[m].out_shape
    rec = {"conversations": [{"from": "human", "value": "<audio>\nDraw it."},
                             {"from": "gpt", "value": nd.signal_run("image")}],
           "media": {"audio": ["a"]}, "targets": {"image": ["a red cat"]}}
    batch = nd.collate([{**nd.tokenize_dialogue(rec, model.tokenizer, model.n_input_tokens),
                         "media": {"audio": [torch.randn(16000) * 0.3]}, "captions": rec["targets"]}],
                       model.tokenizer.pad_token_id)
    model.set_stage(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.loss(batch)["loss"].backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model.loss(batch)
    model.save_pretrained(tmp_path / "ng")
    assert not (tmp_path / "ng" / ng.COMPONENTS_FILE).exists()  # every frozen part comes from its folder
    back = ng.load_pretrained(tmp_path / "ng", device="cpu")
    with torch.no_grad():
        got = back.loss(batch)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
