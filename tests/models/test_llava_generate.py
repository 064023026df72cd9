"""LLaVA generation through mmfast's preallocated KV cache (flash_attn_with_kvcache) on the tiny preset:
token-for-token equal to the DynamicCache path and to recomputation, greedy and top-p, stop strings."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from llava_helpers import square_image as _image

from mmfast.models import kv_cache as mkv
from mmfast.models.llava import generate as mg
from mmfast.models.llava import model as ml


def _inputs(llava):
    """Three rows of different lengths, with and without an image."""
    images = [_image(), None, _image((30, 200, 30), (30, 50))]
    prompts = [llava.prompt("What is it?"), llava.prompt("Hello there, how are you today, my friend?", with_image=False),
               llava.prompt("Where is the green square in this picture?")]
    return images, prompts


def _count_kvcache_calls(monkeypatch):
    calls = []
    real = mkv.flash_attn_with_kvcache

    def counted(q, *args, **kwargs):
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(mkv, "flash_attn_with_kvcache", counted)
    return calls


def test_auto_cache_choice(fast, plain):
    assert mg.cache_kind(fast) == "paged" and mg.cache_kind(plain) == "dynamic"
    assert mg.cache_kind(fast, use_cache=False) == "none"
    with pytest.raises(ValueError, match="patched with mmfast attention"):
        plain.generate([None], [plain.prompt("Hi", with_image=False)], cache="mmfast")
    with pytest.raises(ValueError, match="cache must be one of"):
        fast.generate([None], [fast.prompt("Hi", with_image=False)], cache="static")
    with pytest.raises(ValueError, match="takes no cache"):
        fast.generate([None], [fast.prompt("Hi", with_image=False)], use_cache=False, cache="dynamic")
    with pytest.raises(ValueError, match="max_new_tokens"):
        fast.generate([None], [fast.prompt("Hi", with_image=False)], max_new_tokens=0)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_greedy_mmfast_cache_equals_dynamic_and_no_cache(fast, plain, image_attention, monkeypatch):
    monkeypatch.setattr(fast, "image_attention", image_attention)
    monkeypatch.setattr(plain, "image_attention", image_attention)
    images, prompts = _inputs(fast)
    calls = _count_kvcache_calls(monkeypatch)
    ours = fast.generate(images, prompts, max_new_tokens=8, cache="mmfast", stop="")
    assert calls and 1 in calls  # decode steps went through flash_attn_with_kvcache
    n_calls = len(calls)
    assert fast.generate(images, prompts, max_new_tokens=8, cache="dynamic", stop="") == ours
    assert fast.generate(images, prompts, max_new_tokens=8, use_cache=False, stop="") == ours
    assert len(calls) == n_calls  # the other paths never touch it
    assert plain.generate(images, prompts, max_new_tokens=8, stop="") == ours  # unpatched transformers
    assert any(ours) and len(set(ours)) > 1  # rows generated text of their own
    # A row's answer does not depend on the other rows (right padding after the prompt).
    assert fast.generate(images[1:2], prompts[1:2], max_new_tokens=8, stop="") == ours[1:2]


def test_greedy_on_triton_kernels_equals_no_cache(triton_backend, device):
    llava = ml.build_llava("tiny", kernels=True, seed=0, backend=triton_backend, device=device)
    images, prompts = _inputs(llava)
    assert mg.cache_kind(llava) == "paged"
    ours = llava.generate(images, prompts, max_new_tokens=4, stop="")
    assert llava.generate(images, prompts, max_new_tokens=4, use_cache=False, stop="") == ours


def test_top_p_sampling_same_tokens_on_both_caches(fast):
    images, prompts = _inputs(fast)
    kw = {"max_new_tokens": 8, "do_sample": True, "top_p": 0.9, "temperature": 1.5, "seed": 3, "stop": ""}
    ours = fast.generate(images, prompts, cache="mmfast", **kw)
    assert ours == fast.generate(images, prompts, cache="dynamic", **kw)
    assert ours == fast.generate(images, prompts, use_cache=False, **kw)
    assert ours != fast.generate(images, prompts, cache="mmfast", **kw | {"seed": 4})  # the seed matters


def test_decode_steps_call_flash_attn_with_kvcache(fast, monkeypatch):
    import mmfast.models.hf_attention as hfa

    calls = _count_kvcache_calls(monkeypatch)
    generic = []  # head dims of the attentions that took mmfast's other paths (the vision tower does)
    for name in ("flash_attn_func", "_unpadded"):
        real = getattr(hfa, name)
        monkeypatch.setattr(hfa, name, lambda q, *a, _real=real, **k: generic.append(q.shape[-1]) or _real(q, *a, **k))
    steps = []
    real_sample = mg._sample
    monkeypatch.setattr(mg, "_sample", lambda *a: steps.append(1) or real_sample(*a))
    images, prompts = _inputs(fast)
    fast.generate(images, prompts, max_new_tokens=5, stop="", cache="mmfast")  # the right-padded path
    n_layers = fast.config.text_config.num_hidden_layers
    prompt_len = max(len(r) for r in mg._rows(fast, images, prompts)[0])
    assert calls[:n_layers] == [prompt_len] * n_layers  # the prefill: every layer, the padded batch at once
    assert calls[n_layers:] == [1] * (n_layers * (len(steps) - 1))  # one token per row per layer per decode step
    text_head_dim = fast.config.text_config.hidden_size // fast.config.text_config.num_attention_heads
    assert generic and text_head_dim not in generic  # the language model only attended through the cache
    assert len(steps) > 1


def test_stops_at_the_template_separator(fast, monkeypatch):
    """The model is made to emit the v0 separator ``###`` as its 4th token: every row's answer is its first
    3 tokens, and generation stops there."""
    monkeypatch.setattr(fast, "template", "v0")
    images, prompts = _inputs(fast)
    free = fast.generate(images, prompts, max_new_tokens=3, stop="")
    sep = fast.tokenizer.convert_tokens_to_ids("###")
    steps = []

    def force_sep(module, args, out):  # lm_head hook: (B, V) logits of each step
        steps.append(1)
        if len(steps) == 4:
            out[:, sep] = out.max() + 100.0
        return out

    hook = fast.model.lm_head.register_forward_hook(force_sep)
    try:
        stopped = fast.generate(images, prompts, max_new_tokens=10)
    finally:
        hook.remove()
    assert len(steps) == 4  # no decode step after every row emitted the separator
    assert stopped == free
    assert "###" not in "".join(stopped)


def test_chat_cache_option(fast):
    from mmfast.models.chat import _parser, reply

    conv = [{"from": "human", "value": "<image>\nWhat is it?"}]
    texts = set()
    for cache in ("mmfast", "dynamic"):
        args = _parser().parse_args(["--model", "unused", "--cache", cache, "--max-new-tokens", "4"])
        texts.add(reply(fast, conv, _image(), args))
    assert len(texts) == 1
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "unused", "--cache", "static"])
