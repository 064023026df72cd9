"""mmfast.patch with the LLaMA fused set (decoder-layer residual add + RMSNorm, rotary, SwiGLU): tiny
LLaMA and tiny LLaVA (mmfast.models.llava.build_llava("tiny")) patched reproduce the unpatched outputs
and every parameter gradient within 2x PyTorch's own fp32 error against fp64, the fused kernels are the
ones that ran, generation is unchanged, and unpatch restores the model."""

import pytest
import torch
from patch_helpers import compare_patched

import mmfast
from mmfast.models.patch import patched_rules

transformers = pytest.importorskip("transformers")

LLAMA_RULES = ["llama.decoder_layer_add_rms_norm", "llama.rotary", "llama.swiglu"]


def _llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


@pytest.fixture
def spy(monkeypatch, triton_backend):
    """Counts the fused kernels' forward calls (the backends' ``forward``) while patched models run."""
    from mmfast.ops.llama import ROTARY_OP, SWIGLU_OP
    from mmfast.ops.norm import RMS_NORM_OP

    calls = {"rotary": 0, "swiglu": 0, "add_rms_norm": 0}
    for key, op in (("rotary", ROTARY_OP), ("swiglu", SWIGLU_OP), ("add_rms_norm", RMS_NORM_OP)):
        be = op.backend(triton_backend)
        orig = be.forward

        def counted(*a, _orig=orig, _key=key, **k):
            if _key != "add_rms_norm" or a[1] is not None:  # norm: only the residual (fused add) calls
                calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(be, "forward", counted)
    return calls


def _compare(model, run, backend, kinds=None):
    """fp64 unpatched = reference, fp32 unpatched = PyTorch's own error; the patched fp32 model within 2x."""
    from mmfast.models.patch import KINDS

    compare_patched(model, run, backend, kinds or KINDS, LLAMA_RULES, "output")


@pytest.mark.parametrize("kinds", [("norm", "attention", "projection"), None], ids=["llama_rules", "all_rules"])
def test_tiny_llama_patched_equals_unpatched(kinds, triton_backend, spy):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    ids = torch.randint(0, 97, (2, 11))

    def run(m, dtype):
        return m(input_ids=ids).logits  # (B, S, V): every position, so every layer's output is compared

    _compare(model, run, triton_backend, kinds)
    # the fused kernels ran: per layer one rotary, one swiglu and one add + norm (2 layers)
    assert spy["rotary"] >= 2 and spy["swiglu"] >= 2 and spy["add_rms_norm"] >= 2, spy


def test_tiny_llava_patched_equals_unpatched(triton_backend, spy):
    from mmfast.models.llava.model import build_llava, llava_loss

    llava = build_llava("tiny", kernels=False, seed=0)
    model = llava.model.float()
    n_img = llava.n_image_tokens
    image_id = model.config.image_token_id
    g = torch.Generator().manual_seed(1)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(3, vocab - 1, (2, 1 + n_img + 12), generator=g)
    ids[ids == image_id] = 3
    ids[:, 1:1 + n_img] = image_id
    labels = ids.clone()
    labels[:, :1 + n_img + 2] = -100
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=g)

    def run(m, dtype):
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                 "pixel_values": pixels.to(dtype)}
        return llava_loss(m, batch, fused=False)

    _compare(model, run, triton_backend)
    assert spy["rotary"] >= 2 and spy["swiglu"] >= 2 and spy["add_rms_norm"] >= 2, spy


def test_generation_unchanged_and_rules_skip_what_they_do_not_know(triton_backend):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    ids = torch.randint(0, 97, (2, 5))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    mmfast.patch(model, kinds=("norm", "attention", "projection"), backend=triton_backend)
    assert set(LLAMA_RULES) <= set(patched_rules(model))
    got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    mmfast.unpatch(model)
    # an MLP with another activation is not SwiGLU: the rule leaves it alone
    gelu_model = transformers.LlamaForCausalLM(_llama_config(hidden_act="gelu"))
    mmfast.patch(gelu_model, kinds=("projection",), backend=triton_backend)
    assert "llama.swiglu" not in patched_rules(gelu_model)


def test_gradient_checkpointing_patched(triton_backend):
    """The patched decoder layer under HF gradient checkpointing: every layer still goes through its
    checkpoint function (transformers checkpoints in the class forward's wrapper, which the rule keeps),
    and outputs and gradients match the unpatched model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    gy = torch.randn(2, 9, 97)
    calls = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)

    def run(m, dtype):
        return m(input_ids=ids).logits  # (B, S, V), compared element by element

    mmfast.patch(model, kinds=("norm",), backend=triton_backend)
    assert "llama.decoder_layer_add_rms_norm" in patched_rules(model)
    run(model, torch.float32).backward(gy)
    assert len(calls) == len(model.model.layers)
    mmfast.unpatch(model)
    model.zero_grad(set_to_none=True)
    _compare(model, run, triton_backend, ("norm", "attention", "projection"))


def test_lora_wrapped_projections(triton_backend):
    """peft LoRA on q/k and on the MLP's three projections: the rules still apply (SwiGLU fuses the
    activation only, since down_proj is an adapter) and the patched model matches the unpatched one."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_llama_config())
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
        init_lora_weights=False)).base_model.model
    ids = torch.randint(0, 97, (2, 9))

    def run(m, dtype):
        return m(input_ids=ids).logits  # (B, S, V), compared element by element

    _compare(model, run, triton_backend, ("norm", "attention", "projection"))
