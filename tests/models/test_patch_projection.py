"""mmfast.patch with the projection rules: patched tiny models reproduce the unpatched loss and
gradients (HF LLaMA / LLaVA / CLIP, open_clip), and unpatch restores them."""
import copy

import pytest
import torch
from patch_helpers import compare_patched, tiny_clip_config

import mmfast
from mmfast.models.patch import patched_rules

transformers = pytest.importorskip("transformers")

KINDS = ("loss", "norm", "projection")


def _llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


def _clip_vision():
    return {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                "patch_size": 8}


def _compare(model, run, backend, expect_rules):
    """fp64 unpatched = reference, fp32 unpatched = PyTorch's own error; the patched fp32 model must be
    within 2x that error (+ a few ulps) for the loss and every parameter gradient."""
    compare_patched(model, run, backend, KINDS, expect_rules, "loss")


@pytest.mark.parametrize("backend_kind", ["triton", "reference"])
def test_llama_loss_and_rmsnorm(backend_kind, triton_backend):
    backend = triton_backend if backend_kind == "triton" else "reference"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100

    def run(m, dtype):
        out = m(input_ids=ids, labels=labels)
        assert out.logits.numel() == (0 if m is model else 2 * 11 * 97)
        return out.loss

    _compare(model, run, backend, ["causal_lm.fused_linear_cross_entropy", "hf.rms_norm"])


def test_llama_num_items_and_no_labels(triton_backend):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 9))
    mmfast.patch(model, kinds=KINDS, backend=triton_backend)
    out, ref_out = model(input_ids=ids, labels=ids, num_items_in_batch=13), ref(input_ids=ids, labels=ids,
                                                                               num_items_in_batch=13)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=2e-5, atol=2e-6)
    with torch.no_grad():  # without labels the logits are computed as usual
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=2e-5, atol=2e-5)


def test_llama_eval_mode_keeps_logits(triton_backend):
    """In eval mode the loss rule steps aside: logits and loss are the unpatched model's (evaluation loops
    and metrics read the logits); back in training mode the fused loss runs and the logits are empty."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    ref = copy.deepcopy(model).eval()
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[1, :3] = -100
    mmfast.patch(model, kinds=("loss",), backend=triton_backend)
    model.eval()
    with torch.no_grad():
        out, ref_out = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
        tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert out.logits.shape == (2, 9, 97)
    assert torch.equal(out.logits, ref_out.logits) and torch.equal(out.loss, ref_out.loss)
    assert torch.equal(tup[0], ref_out.loss) and torch.equal(tup[1], ref_out.logits)
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 9, 0)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=2e-5, atol=2e-6)


def test_llava_projector_norms_loss(triton_backend):
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_clip_vision()), text_config=_llama_config(),
        image_token_index=96, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(config)
    ids = torch.cat([torch.randint(0, 90, (1, 3)), torch.full((1, 16), 96), torch.randint(0, 90, (1, 6))], dim=1)
    labels = ids.clone()
    labels[:, :19] = -100
    pixels = torch.randn(1, 3, 32, 32)

    def run(m, dtype):
        return m(input_ids=ids, pixel_values=pixels.to(dtype), labels=labels).loss

    _compare(model, run, triton_backend,
             ["causal_lm.fused_linear_cross_entropy", "llava.mlp_projector", "hf.rms_norm", "layer_norm"])


def test_hf_clip_layer_norms(triton_backend):
    torch.manual_seed(0)
    model = transformers.CLIPModel(tiny_clip_config(1))
    ids = torch.randint(0, 63, (3, 9))
    pixels = torch.randn(3, 3, 32, 32)

    def run(m, dtype):
        out = m(input_ids=ids, pixel_values=pixels.to(dtype), return_loss=True)
        # the loss plus a term on the embeddings, so the heads' gradients see more than the logits
        return out.loss + (out.image_embeds[:, :5] * out.text_embeds[:, :5]).sum()

    from mmfast.models.patch.projection import hf_clip_towers_carry_projections

    heads = [] if hf_clip_towers_carry_projections() else ["clip.linear_l2_normalize"]
    _compare(model, run, triton_backend, ["layer_norm", *heads])


def _open_clip(quick_gelu=False, **text_cfg):
    """A tiny ``open_clip.CLIP``: one vision and one text layer of width 64 (``text_cfg`` added to the text config)."""
    open_clip = pytest.importorskip("open_clip")
    return open_clip.CLIP(
        embed_dim=32, quick_gelu=quick_gelu,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, head_width=32, image_size=32, patch_size=8),
        text_cfg=open_clip.CLIPTextCfg(context_length=9, vocab_size=64, width=64, heads=2, layers=1, **text_cfg),
    )


def test_open_clip_layer_norms(triton_backend):
    torch.manual_seed(0)
    model = _open_clip()
    ids = torch.randint(0, 63, (3, 9))
    pixels = torch.randn(3, 3, 32, 32)

    def run(m, dtype):
        img = m.encode_image(pixels.to(dtype), normalize=True)
        txt = m.encode_text(ids, normalize=True)
        return (img @ txt.t()).logsumexp(-1).mean()

    _compare(model, run, triton_backend, ["layer_norm", "open_clip.linear_l2_normalize", "open_clip.mlp"])
    assert all("encode_image" not in vars(m) for m in model.modules())


def test_open_clip_mlp_rule_skips_quick_gelu(triton_backend):
    """OpenAI-style QuickGELU blocks are not an erf/tanh GELU: the MLP rule leaves them alone."""
    model = _open_clip(quick_gelu=True)
    mmfast.patch(model, kinds=("projection",), backend=triton_backend)
    assert "open_clip.mlp" not in patched_rules(model)
    assert all("forward" not in vars(m) for n, m in model.named_modules() if n.endswith("mlp"))


def test_open_clip_linear_text_head(triton_backend):
    torch.manual_seed(0)
    model = _open_clip(proj_type="linear", proj_bias=True)
    if not isinstance(model.text_projection, torch.nn.Linear):
        pytest.skip("this open_clip builds no nn.Linear text projection")
    ids = torch.randint(0, 63, (3, 9))

    def run(m, dtype):
        return (m.encode_text(ids, normalize=True)[:, :7] * torch.arange(7, dtype=dtype)).sum()

    _compare(model, run, triton_backend, ["open_clip.linear_l2_normalize"])


def test_mlp_projector_loads_both_layouts(triton_backend):
    from mmfast.models.llava.projector import projector_from_state_dict, projector_from_type

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(19, 40), torch.nn.GELU(), torch.nn.Linear(40, 40))
    llava_sd = {f"model.mm_projector.{k}": v for k, v in seq.state_dict().items()}
    hf_sd = {"multi_modal_projector.linear_1.weight": seq[0].weight.detach(),
             "multi_modal_projector.linear_1.bias": seq[0].bias.detach(),
             "multi_modal_projector.linear_2.weight": seq[2].weight.detach(),
             "multi_modal_projector.linear_2.bias": seq[2].bias.detach()}
    x = torch.randn(37, 19)
    for sd in (llava_sd, hf_sd):
        proj = projector_from_state_dict(sd, backend=triton_backend)
        torch.testing.assert_close(proj(x), seq(x), rtol=1e-5, atol=1e-5)
    direct = projector_from_type("mlp2x_gelu", 19, 40, backend=triton_backend)
    direct.load_state_dict({k.split(".", 1)[1]: v for k, v in hf_sd.items()})  # linear_1.* keys
    torch.testing.assert_close(direct(x), seq(x), rtol=1e-5, atol=1e-5)
    direct.load_state_dict(seq.state_dict())  # 0.* / 2.* keys
    assert set(direct.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert projector_from_type("linear", 19, 40).depth == 1
    assert projector_from_type("mlp3x_gelu", 19, 40).depth == 3
    with pytest.raises(ValueError, match="projector_type"):
        projector_from_type("identity", 19, 40)


def test_original_llava_sequential_projector(triton_backend):
    """The original LLaVA code keeps ``model.mm_projector = nn.Sequential(Linear, GELU, Linear)``."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.mm_projector = torch.nn.Sequential(
                torch.nn.Linear(19, 40), torch.nn.GELU(), torch.nn.Linear(40, 40), torch.nn.GELU(),
                torch.nn.Linear(40, 24))
            self.other = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.GELU(), torch.nn.Linear(24, 3))

        def forward(self, x):
            return self.other(self.model.mm_projector(x)).sum()

    torch.manual_seed(0)
    x = torch.randn(37, 19)
    _compare(Tiny(), lambda m, dtype: m(x.to(dtype)), triton_backend, ["llava.mm_projector_sequential"])
