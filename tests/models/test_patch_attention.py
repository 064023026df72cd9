"""Patched models (mmfast attention) against unpatched ones: tiny HF LLaMA / CLIP / LLaVA and open_clip.

Each model is compared in fp32 against the unpatched model in fp64 (the oracle), bounded by the
unpatched fp32 model's own error (see ``_compare``), for the outputs and for the parameter gradients.
"""
import copy

import pytest
import torch
from patch_helpers import tiny_clip_config

import mmfast
from mmfast.models import patch as P
from mmfast.testing import assert_error_bound

transformers = pytest.importorskip("transformers")


def _llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


def _clip_vision(**kw):
    return dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, **kw)


def _run_with_grads(model, run):
    model.zero_grad()
    out = run(model)
    out.double().square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, run, backend, grads_of=("weight",), baselines=("eager", "sdpa")):
    """run(model) -> tensor; patched fp32 vs unpatched fp64 (oracle), output and gradients.

    PyTorch's own fp32 error for a whole model is taken as the larger of its attention implementations'
    (``baselines``) errors: at this size the model's rounding noise, not the attention op, dominates
    the gradient error, and eager and SDPA differ from each other by up to ~3x (the op-level tests in
    tests/ops/test_attention.py bound the kernels against a single PyTorch computation)."""
    model = model.float().eval()
    ref_model = copy.deepcopy(model).double()
    out_ref, ref_grads = _run_with_grads(ref_model, run)
    lows = []
    for impl in baselines:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        lows.append(_run_with_grads(model, run))
    mmfast.patch(model, kinds=("attention",), backend=backend)
    assert P.patched_rules(model), "no attention rule matched"
    out, grads = _run_with_grads(model, run)

    def worst(tensors, ref):
        return max(tensors, key=lambda t: (t.double() - ref.double()).abs().nan_to_num(0).max().item())

    assert_error_bound(out.float(), out_ref, worst([o for o, _ in lows], out_ref).float(), name="output")
    checked = 0
    for name, g in grads.items():
        if not any(s in name for s in grads_of):
            continue
        low = worst([lg[name] for _, lg in lows], ref_grads[name])
        assert_error_bound(g, ref_grads[name], low, name=f"grad {name}")
        checked += 1
    assert checked > 0
    return model


def test_llama_matches_unpatched(triton_backend):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    ids = torch.randint(0, 96, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    keep = mask.bool()[..., None]

    def run(m):
        return m(input_ids=ids, attention_mask=mask).logits.masked_fill(~keep, 0)

    # Eager attention gives NaN rows under left padding, so SDPA alone is the baseline here.
    model = _compare(model, run, triton_backend, grads_of=("q_proj.weight", "k_proj.weight", "embed_tokens"),
                     baselines=("sdpa",))
    assert model.config._attn_implementation == "mmfast"
    mmfast.unpatch(model)
    assert model.config._attn_implementation != "mmfast" and P.patched_rules(model) == []


def test_llama_generate_with_cache_matches(triton_backend):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    ids = torch.randint(0, 96, (1, 7))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    mmfast.patch(model, kinds=("attention",), backend=triton_backend)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_from_pretrained_attn_implementation(tmp_path, triton_backend):
    from mmfast.models.hf_attention import register

    register(triton_backend)
    try:
        torch.manual_seed(2)
        transformers.LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="mmfast")
        assert model.config._attn_implementation == "mmfast"
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
        ids = torch.randint(0, 96, (1, 11))
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    finally:
        register(None)


def test_clip_matches_unpatched(triton_backend):
    torch.manual_seed(3)
    model = transformers.CLIPModel(tiny_clip_config())
    ids = torch.randint(0, 63, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    pixels = torch.randn(2, 3, 32, 32)

    def run(m):
        # Every token's hidden state (padding rows zeroed) and the projected embeddings, so the gradients
        # reach each attention row rather than only the pooled ones.
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(m.dtype))
        text = out.text_model_output.last_hidden_state.masked_fill(~mask.bool()[..., None], 0)
        return torch.cat([text.flatten(1), out.vision_model_output.last_hidden_state.flatten(1),
                          out.text_embeds, out.image_embeds], dim=-1)

    _compare(model, run, triton_backend, grads_of=("q_proj.weight", "v_proj.weight"))


def test_llava_matches_unpatched(triton_backend):
    torch.manual_seed(4)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_clip_vision()),
        text_config=_llama_config(), image_token_index=95, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(config)
    ids = torch.cat([torch.randint(0, 90, (1, 3)), torch.full((1, 16), 95), torch.randint(0, 90, (1, 6))], dim=1)
    pixels = torch.randn(1, 3, 32, 32)

    def run(m):
        return m(input_ids=ids, pixel_values=pixels.to(m.dtype)).logits

    _compare(model, run, triton_backend, grads_of=("q_proj.weight",))


# --------------------------------------------------------------------------- open_clip
def _open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=32, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=12, vocab_size=64, width=64, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def test_open_clip_matches_unpatched(triton_backend):
    torch.manual_seed(5)
    model = _open_clip_model()
    keys = list(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 63, (2, 12))

    def run(m):
        return torch.cat([m.encode_image(images.to(next(m.parameters()).dtype)), m.encode_text(text)], dim=-1)

    model = _compare(model, run, triton_backend, grads_of=("in_proj_weight",))
    assert P.model_type_of(model) == "open_clip"
    assert P.patched_rules(model) == ["open_clip.attention"]
    assert list(model.state_dict()) == keys
    mmfast.unpatch(model)
    assert not any(type(m).__module__.startswith("mmfast") for m in model.modules())


# --------------------------------------------------------------------------- modules and registry
def test_multihead_attention_loads_torch_state_dict(triton_backend):
    from mmfast.nn import MultiheadAttention

    torch.manual_seed(6)
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True).double()
    mine = MultiheadAttention(64, 4, batch_first=True, backend=triton_backend)
    mine.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    causal = torch.full((37, 37), float("-inf"), dtype=torch.float64).triu(1)
    for mask in (None, causal):
        out = mine(x.float(), x.float(), x.float(), attn_mask=None if mask is None else mask.float())[0]
        expected = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
        low = ref.float()(x.float(), x.float(), x.float(), attn_mask=None if mask is None else mask.float(),
                          need_weights=False)[0]
        ref.double()
        assert_error_bound(out, expected, low, name="mha out")
    with pytest.raises(ValueError, match="attn_mask"):
        mine(x.float(), attn_mask=torch.zeros(37, 37).bernoulli_(0.5).bool())


def test_flash_attention_module(triton_backend):
    from mmfast.nn import FlashAttention
    from mmfast.ops import attention_reference

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn((2, 45, 4, 32), generator=gen) for _ in range(3))
    attn = FlashAttention(causal=True, attention_dropout=0.5, window_size=(20, -1), backend=triton_backend)
    out = attn.eval()(q, k[:, :, :2], v[:, :, :2])  # GQA 4:2; eval: no dropout
    ref = attention_reference(q.double(), k[:, :, :2].double(), v[:, :, :2].double(), causal=True,
                              window_size=(20, -1))
    low = attention_reference(q, k[:, :, :2], v[:, :, :2], causal=True, window_size=(20, -1))
    assert_error_bound(out, ref, low, name="FlashAttention")
    assert not torch.equal(attn.train()(q, k, v), attn.eval()(q, k, v))  # dropout only in training


def test_registry_basics():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    assert P.model_type_of(model) == "Sequential"
    assert mmfast.patch(model) is model and P.patched_rules(model) == []
    names = [r.name for r in P.all_rules()]
    assert "hf.attention" in names and "open_clip.attention" in names
    with pytest.raises(ValueError, match="kinds"):
        mmfast.patch(model, kinds=("bogus",))
    with pytest.raises(ValueError, match="kind"):
        P.PatchRule("x", "bogus", (), lambda m: None)


def test_causal_mask_check_syncs_once_per_mask():
    """open_clip passes the same causal mask buffer to every text layer at every step; reading the check's
    answer off the device is a host sync, so it is made once per mask (and again after an in-place edit)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmfast.nn.attention import mask_is_causal

    class CountSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.n += 1
            return func(*args, **(kwargs or {}))

    mask = torch.full((7, 7), float("-inf")).triu(1)
    with CountSyncs():
        first = mask_is_causal(mask, 7, 7)
        n_first = CountSyncs.n
        assert all(mask_is_causal(mask, 7, 7) for _ in range(5)) and CountSyncs.n == n_first > 0
        assert first and not mask_is_causal(torch.zeros(7, 7), 7, 7)
        mask[0, 1] = 0.0  # edited in place: checked again, and now it is not causal
        assert not mask_is_causal(mask, 7, 7)
        assert mask_is_causal(torch.full((9, 9), float("-inf")).triu(1), 5, 5)  # a causal corner


def test_each_patched_model_keeps_its_own_backend(monkeypatch, triton_backend):
    """Two HF models patched with different backends in one process: each model's attention calls run on
    the backend given to its own patch (once, a later patch's backend overrode every earlier model's:
    a 'reference' model then ran the Triton interpreter, ~40x slower), and the process-wide
    ``register(backend=...)`` applies to models patched without one."""
    import mmfast.models.hf_attention as hfa

    seen = []
    real = hfa.flash_attn_func
    monkeypatch.setattr(hfa, "flash_attn_func", lambda *a, **k: seen.append(k.get("backend")) or real(*a, **k))
    monkeypatch.setitem(hfa._BACKEND, "value", None)
    torch.manual_seed(0)
    models = {b: transformers.LlamaForCausalLM(_llama_config()).eval() for b in ("reference", triton_backend, None)}
    ids = torch.randint(0, 96, (1, 7))
    for backend, model in models.items():
        mmfast.patch(model, kinds=("attention",), backend=backend)
    hfa.register(backend="reference")  # process-wide: only models without a backend of their own take it
    with torch.no_grad():
        for backend, model in models.items():
            seen.clear()
            model(input_ids=ids)
            assert seen == [backend or "reference"] * 2, (backend, seen)  # one call per layer
        mmfast.unpatch(models[triton_backend])
        assert all(hfa.MODULE_BACKEND_ATTR not in vars(m) for m in models[triton_backend].modules())
