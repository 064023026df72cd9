"""attn_implementation="mmfast" against "eager" on the masks transformers builds.

Tiny random LLaMA, Mistral (sliding window), LLaVA and CLIP, built in-process. Logits are compared in
fp32 against the model in fp64 (the oracle), bounded by the larger of eager's and sdpa's fp32 errors;
generated tokens must equal eager's. The fp64 oracle runs "sdpa": fp64 eager turns a fully masked row
(left padding) into NaN (its float32 softmax sees -inf), which then reaches every row of the next layer.
Positions that are padding are not compared (their rows are not tokens).
"""
import copy
import inspect

import pytest
import torch
from patch_helpers import tiny_clip_config

import mmfast
import mmfast.models.hf_attention as hfa
from mmfast.testing import assert_error_bound

transformers = pytest.importorskip("transformers")

V = 96


@pytest.fixture(autouse=True)
def _registered(triton_backend):
    hfa.register(triton_backend)
    hfa.PATHS.clear()
    yield
    hfa.register(None)


def _llama_cfg(**kw):
    return dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **kw)


def _model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_cfg())).eval()
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**_llama_cfg(sliding_window=3))).eval()
    raise ValueError(kind)


def _inputs(batch=3, length=9, padding="left", seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 8, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate((0, 3, 5)[:batch]):
        if padding == "left" and pad:
            mask[row, :pad] = 0
        elif padding == "right" and pad:
            mask[row, length - pad:] = 0
    return ids, mask


def _cache(model, kind, max_len=24):
    if kind == "dynamic":
        return transformers.DynamicCache(config=model.config)
    return transformers.StaticCache(config=model.config, max_cache_len=max_len)


def _two_steps(model, ids, mask, cache_kind, extra):
    """Prefill the prompt into a cache, then a 2-token continuation (queries at an offset): both logits."""
    cache = _cache(model, cache_kind)
    first = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    mask2 = torch.cat([mask, torch.ones(ids.shape[0], extra.shape[1], dtype=mask.dtype)], dim=1)
    second = model(input_ids=extra, attention_mask=mask2, past_key_values=cache, use_cache=True).logits
    return first, second


def _set(model, impl):
    model.set_attn_implementation(impl)
    return model


def _err(t, ref, keep):
    k = keep.bool()[..., None]
    return (t.double() - ref.double()).masked_fill(~k, 0).abs().max().item()


def _check_logits(model, run, keep, how="impl", backend=None, ref_impl="sdpa", low_impls=("eager", "sdpa")):
    """run(model) -> tuple of logits; ours fp32 vs fp64 (oracle) bounded by eager/sdpa fp32 (keep: valid rows)."""
    ref = run(_set(copy.deepcopy(model).double(), ref_impl))
    lows = [run(_set(model, impl)) for impl in low_impls]
    low = [max(ts, key=lambda t, r=r: _err(t, r, k)) for *ts, r, k in zip(*lows, ref, keep)]
    if how == "impl":
        _set(model, "mmfast")
    else:
        mmfast.patch(model, kinds=("attention",), backend=backend)
    ours = run(model)
    for i, (o, r, lo, k) in enumerate(zip(ours, ref, low, keep)):
        k = k.bool()[..., None]
        assert_error_bound(o.masked_fill(~k, 0), r.masked_fill(~k, 0), lo.masked_fill(~k, 0), name=f"logits {i}")
    return ours


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_forward_matches_eager(kind, padding, cache_kind):
    model = _model(kind)
    ids, mask = _inputs(padding=padding)
    extra = torch.randint(0, V - 8, (ids.shape[0], 2), generator=torch.Generator().manual_seed(2))
    keep = (mask, torch.ones(ids.shape[0], 2))
    _check_logits(model, lambda m: _two_steps(m, ids, mask, cache_kind, extra), keep)
    # Padding and static caches take the varlen kernel path, not the dense fallback.
    assert hfa.PATHS["varlen"] > 0 and hfa.PATHS["dense"] == 0, dict(hfa.PATHS)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("how", ["impl", "patch"])
def test_generate_matches_eager(kind, cache_kind, how, triton_backend):
    model = _model(kind, seed=3)
    ids, mask = _inputs(padding="left", seed=4)
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True}
    ref = _set(copy.deepcopy(model).double(), "sdpa").generate(
        ids, past_key_values=_cache(model, cache_kind), **kw)
    low = _set(model, "eager").generate(ids, past_key_values=_cache(model, cache_kind), **kw)
    if how == "impl":
        _set(model, "mmfast")
    else:
        mmfast.patch(model, backend=triton_backend)
    ours = model.generate(ids, past_key_values=_cache(model, cache_kind), **kw)
    assert torch.equal(ours.sequences, ref.sequences) and torch.equal(low.sequences, ref.sequences)
    for step, (o, r, lo) in enumerate(zip(ours.scores, ref.scores, low.scores)):
        assert_error_bound(o, r, lo, name=f"scores step {step}")
    assert hfa.PATHS["dense"] == 0, dict(hfa.PATHS)


def test_sliding_window_without_padding_uses_the_kernel():
    model = _model("mistral", seed=5)  # sliding_window=3 over 11 tokens: the window matters
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(6))
    _check_logits(model, lambda m: (m(input_ids=ids).logits,), (torch.ones(2, 11),))
    assert hfa.PATHS["full"] > 0 and hfa.PATHS["dense"] == hfa.PATHS["varlen"] == 0, dict(hfa.PATHS)


def test_right_padding_gradients_match_eager():
    model = _model("mistral", seed=7).float()
    ids, mask = _inputs(padding="right", seed=8)
    keep = mask.bool()[..., None]

    def grads(m):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask).logits.masked_fill(~keep, 0)
        out.double().square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if "q_proj" in n or "k_proj" in n}

    ref = grads(_set(copy.deepcopy(model).double(), "sdpa"))
    low = grads(_set(model, "eager"))
    ours = grads(_set(model, "mmfast"))
    for name in ref:
        assert_error_bound(ours[name], ref[name], low[name], name=f"grad {name}")
    assert hfa.PATHS["varlen"] > 0


# --------------------------------------------------------------------------- attention weights
@pytest.mark.parametrize("via", ["kwarg", "config"])
def test_attention_weights_are_returned(via):
    model = _model("llama", seed=9)
    ids, mask = _inputs(padding="right", seed=10)  # fp64 eager (the only oracle with weights) NaNs on left padding

    def run(m):
        if via == "config":
            # As a config saved with output_attentions=True loads (the property's setter refuses non-eager).
            m.config._output_attentions = True
            out = m(input_ids=ids, attention_mask=mask)
            m.config._output_attentions = False
        else:
            out = m(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert out.attentions is not None and len(out.attentions) == 2
        return (out.logits, *out.attentions)

    rows = mask.bool()
    keep = (mask, *[rows[:, None, :].expand(3, 4, 9)] * 2)  # weights: rows of real tokens
    ours = _check_logits(model, run, keep, ref_impl="eager", low_impls=("eager",))
    assert ours[1].shape == (3, 4, 9, 9)
    valid_rows = ours[1].sum(-1)[rows[:, None, :].expand(3, 4, 9)]
    torch.testing.assert_close(valid_rows, torch.ones_like(valid_rows))


# --------------------------------------------------------------------------- packed sequences, chunks, odd masks
def test_packed_sequences_from_position_ids():
    model = _model("llama", seed=11)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    # use_cache=False: transformers looks for packed sequences only without a cache
    _check_logits(model, lambda m: (m(input_ids=ids, position_ids=pos, use_cache=False).logits,), (torch.ones(1, 12),))
    assert hfa.PATHS["varlen"] > 0 and hfa.PATHS["dense"] == 0, dict(hfa.PATHS)
    # The same through transformers' flash-attention keyword arguments (DataCollatorWithFlattening).
    cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                   max_length_k=5).logits
    ref = _set(copy.deepcopy(model).double(), "sdpa")(input_ids=ids, position_ids=pos, use_cache=False).logits
    low = _set(copy.deepcopy(model), "eager")(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert_error_bound(packed, ref, low, name="cu_seq_lens")
    assert hfa.PATHS["cu_seqlens"] > 0


class _Module(torch.nn.Module):
    is_causal = True
    layer_idx = 0


def _direct(mask4, causal=True, sliding_window=None, seed=13, want=False, call_mask=None, rows=None):
    """mmfast_attention_forward (given ``call_mask``, default ``mask4``) vs a dense fp64 computation of mask4."""
    gen = torch.Generator().manual_seed(seed)
    b, sq, sk = mask4.shape[0], mask4.shape[2], mask4.shape[3]
    q = torch.randn(b, 4, sq, 16, generator=gen)
    k, v = (torch.randn(b, 2, sk, 16, generator=gen) for _ in range(2))
    mod = _Module()
    mod.is_causal = causal
    out, w = hfa.mmfast_attention_forward(mod, q, k, v, mask4 if call_mask is None else call_mask,
                                          sliding_window=sliding_window,
                                          output_attentions=want)

    def dense(dt):
        kk, vv = (t.to(dt).repeat_interleave(2, dim=1) for t in (k, v))
        s = q.to(dt) @ kk.transpose(-1, -2) / 4.0
        if mask4.dtype == torch.bool:
            s = s.masked_fill(~mask4, float("-inf"))
        else:
            s = s + mask4.to(dt)
        p = torch.softmax(s, -1).nan_to_num(0)
        return (p @ vv).transpose(1, 2), p

    (ref, pref), (low, plow) = dense(torch.float64), dense(torch.float32)
    if rows is not None:  # (B, Sq) query rows that are tokens; padding rows are not compared
        keep = rows[:, :, None, None]
        ref, low, out = (t.masked_fill(~keep, 0) for t in (ref, low, out))
    assert_error_bound(out, ref, low, name="out")
    if want:
        assert_error_bound(w, pref, plow, name="weights")
    return out


def test_chunked_attention_mask():
    from transformers import masking_utils as mu

    fn = mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    mask4 = mu.sdpa_mask(2, 11, 11, mask_function=fn, allow_is_causal_skip=False)
    _direct(mask4)
    assert hfa.PATHS["varlen"] == 1 and hfa.PATHS["dense"] == 0  # chunks are segments: the kernel


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_2d_padding_mask_with_holes(sliding_window):
    """A (batch, kv_len) mask with padding inside a row (right-padded prompt, then new tokens): packing is exact
    without a window; with a window over the hole it is not, and the exact path takes over."""
    keys = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    i = torch.arange(7)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - (sliding_window or 99))
    mask4 = (band[None] & keys[:, None, :])[:, None]
    out = _direct(mask4, sliding_window=sliding_window, call_mask=keys, rows=keys)
    assert hfa.PATHS["varlen" if sliding_window is None else "dense"] == 1, dict(hfa.PATHS)
    assert out.shape == (2, 7, 4, 16)


def test_any_mask_is_computed_exactly():
    gen = torch.Generator().manual_seed(14)
    mask4 = torch.rand(2, 1, 7, 10, generator=gen) > 0.4
    mask4[0, 0, 3] = False  # a row that sees nothing: zeros
    out = _direct(mask4)
    assert hfa.PATHS["dense"] == 1 and out[0, 3].abs().max() == 0
    bias = torch.randn(2, 1, 7, 10, generator=gen)  # an additive float mask: a bias
    _direct(bias)
    _direct(mask4, want=True)  # attention weights for an arbitrary mask


def test_bad_mask_shape_names_the_argument():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 10, 16)
    for bad in (torch.ones(2, 7, 10, dtype=torch.bool), torch.ones(2, 1, 7, 9, dtype=torch.bool),
                torch.ones(2, 9, dtype=torch.bool)):
        with pytest.raises(ValueError, match="attention_mask"):
            hfa.mmfast_attention_forward(_Module(), q, k, k, bad)


def test_compile_fullgraph_static_cache_decode():
    """A decode step with a StaticCache and a padding mask traces as one graph (no host reads)."""
    model = _set(_model("llama", seed=15), "mmfast")
    ids, mask = _inputs(padding="left", seed=16)
    cache, saved = _cache(model, "static"), _cache(model, "static")
    with torch.no_grad():
        for c in (cache, saved):
            model(input_ids=ids, attention_mask=mask, past_key_values=c, use_cache=True)
    step = torch.randint(0, V, (3, 1), generator=torch.Generator().manual_seed(17))
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        eager_logits = model(input_ids=step, attention_mask=mask2, past_key_values=cache, use_cache=True).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        logits = compiled(input_ids=step, attention_mask=mask2, past_key_values=saved, use_cache=True).logits
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_generate_with_compile_fullgraph():
    """generate's own compiled decode (StaticCache, CompileConfig(fullgraph=True)) with left padding."""
    from transformers.generation.configuration_utils import CompileConfig

    model = _model("llama", seed=25)
    ids, mask = _inputs(padding="left", seed=26)
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False}
    expected = _set(copy.deepcopy(model), "eager").generate(ids, **kw)
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    got = _set(model, "mmfast").generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(got, expected)
    assert hasattr(model, "_compiled_call")  # generate did compile the decode steps
    assert hfa.PATHS["varlen"] > 0  # the prefill (not compiled) took the kernel; the decode steps were traced


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_left_padding_leaves_the_last_token_unchanged(kind):
    """A row's logits do not depend on the padding put before it (given its own position ids)."""
    model = _set(_model(kind, seed=27), "mmfast")
    ids = torch.randint(0, V - 8, (2, 8), generator=torch.Generator().manual_seed(28))
    plain = model(input_ids=ids).logits
    pad = 4
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, pad:]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- LLaVA and CLIP
def _clip_vision(**kw):
    return dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, **kw)


def _llava():
    torch.manual_seed(18)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_clip_vision()),
        text_config=transformers.LlamaConfig(**_llama_cfg()), image_token_index=V - 1, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("cache_kind,how", [("dynamic", "impl"), ("static", "impl"), ("static", "patch")])
def test_llava_left_padded_generate_matches_eager(cache_kind, how, triton_backend):
    model = _llava()
    gen = torch.Generator().manual_seed(19)
    text = torch.randint(0, V - 8, (2, 4), generator=gen)
    ids = torch.cat([text[:, :2], torch.full((2, 16), V - 1), text[:, 2:]], 1)
    ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[0, :3] = torch.randint(0, V - 8, (3,), generator=gen)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True}
    ref = _set(copy.deepcopy(model).double(), "sdpa").generate(
        ids, pixel_values=pixels.double(), past_key_values=_cache(model.model.language_model, cache_kind, 40), **kw)
    low = _set(model, "eager").generate(ids, pixel_values=pixels,
                                        past_key_values=_cache(model.model.language_model, cache_kind, 40), **kw)
    if how == "impl":
        _set(model, "mmfast")
    else:
        mmfast.patch(model, backend=triton_backend)
        assert model.config.text_config._attn_implementation == "mmfast"
    ours = model.generate(ids, pixel_values=pixels,
                          past_key_values=_cache(model.model.language_model, cache_kind, 40), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for step, (o, r, lo) in enumerate(zip(ours.scores, ref.scores, low.scores)):
        assert_error_bound(o, r, lo, name=f"scores step {step}")
    assert hfa.PATHS["dense"] == 0


@pytest.mark.parametrize("padding", ["left", "right"])
def test_clip_matches_eager(padding):
    torch.manual_seed(20)
    model = transformers.CLIPModel(tiny_clip_config()).eval()
    ids, mask = _inputs(batch=3, length=9, padding=padding, seed=21)
    ids = ids % 63
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(22))

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(m.dtype))
        return (out.text_model_output.last_hidden_state, out.vision_model_output.last_hidden_state,
                out.text_embeds, out.image_embeds)

    _check_logits(model, run, (mask, torch.ones(3, 17), torch.ones(3), torch.ones(3)))
    assert hfa.PATHS["varlen"] > 0 and hfa.PATHS["full"] > 0 and hfa.PATHS["dense"] == 0, dict(hfa.PATHS)
    if padding == "right":  # attention weights: fp64 eager is the oracle, which left padding turns to NaN

        def weights(m):
            out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(m.dtype), output_attentions=True)
            return (out.text_model_output.attentions[0], out.vision_model_output.attentions[1])

        _check_logits(model, weights, (mask.bool()[:, None, :].expand(3, 2, 9), torch.ones(3, 2, 17)),
                      ref_impl="eager", low_impls=("eager",))


# --------------------------------------------------------------------------- mmfast.patch keeps forward signatures
def test_patch_keeps_forward_signature(triton_backend):
    model = _model("llama", seed=23)
    before = inspect.signature(model.forward)
    norm_before = inspect.signature(model.model.norm.forward)
    ids, mask = _inputs(padding="left", seed=24)
    expected = _set(copy.deepcopy(model), "eager").generate(ids, attention_mask=mask, max_new_tokens=4,
                                                            do_sample=False)
    mmfast.patch(model, backend=triton_backend)
    assert "causal_lm.fused_linear_cross_entropy" in mmfast.models.patch.patched_rules(model)
    assert "forward" in vars(model)  # the loss rule put an instance forward there
    assert inspect.signature(model.forward) == before
    assert inspect.signature(model.model.norm.forward) == norm_before
    for name in ("logits_to_keep", "inputs_embeds", "position_ids"):
        assert name in inspect.signature(model.forward).parameters
    # generate sees logits_to_keep and inputs_embeds as the model's own arguments
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, expected[:, ids.shape[1]:])
    mmfast.unpatch(model)
    assert "forward" not in vars(model)
