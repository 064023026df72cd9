"""MmfastKVCache on a tiny patched LLaMA: right-padded prefill + per-row decode equals full forwards."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import mmfast
from mmfast.models.kv_cache import MmfastKVCache, cache_kwargs


def _llama(backend: str | None, patched: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    return mmfast.patch(model, backend=backend) if patched else model


def _decode_with_cache(model, rows, n_new, device):
    """Right-padded prefill of ``rows`` then ``n_new`` fed tokens per row; per-row logits of every step."""
    b, length = len(rows), max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows], device=device)  # (B, L), a real token pads
    lens = torch.tensor([len(r) for r in rows], device=device)
    cache = MmfastKVCache(model.config, b, length + n_new)
    pos = torch.arange(length, device=device).expand(b, length)
    out = model(input_ids=ids, position_ids=pos, **cache_kwargs(model, cache), use_cache=True, **cache.attention_kwargs())
    cache.check_consumed()
    cache.set_lengths(lens)
    steps = [out.logits[torch.arange(b, device=device), lens - 1]]  # (B, V)
    fed = torch.randint(1, model.config.vocab_size, (b, n_new), generator=torch.Generator().manual_seed(1)).to(device)
    for t in range(n_new - 1):
        pos = cache.lengths().long()[:, None]  # (B, 1)
        assert torch.equal(pos[:, 0], lens + t)
        out = model(input_ids=fed[:, t : t + 1], position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                    **cache.attention_kwargs())
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), fed  # (B, n_new, V)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_right_padded_decode_equals_full_forward(backend, triton_backend, device):
    backend = triton_backend if backend == "triton" else backend
    model = _llama(backend).to(device)
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 3, 5)]
    n_new = 4
    with torch.no_grad():
        logits, fed = _decode_with_cache(model, rows, n_new, device)
        for i, r in enumerate(rows):
            # The oracle: row i alone, unpadded, through the same patched model without a cache.
            full = model(input_ids=torch.tensor([r + fed[i, : n_new - 1].tolist()], device=device)).logits[0]
            want = full[len(r) - 1 :]  # (n_new, V)
            torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-4)


def test_unpatched_model_is_refused_not_silently_wrong():
    model = _llama(None, patched=False)
    cache = MmfastKVCache(model.config, 1, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention did not use it"):
        model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), use_cache=True)


def test_patched_model_without_the_kwarg_is_refused():
    model = _llama("reference")
    cache = MmfastKVCache(model.config, 1, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="mmfast_kv_cache"):
        model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), use_cache=True)


def test_cache_errors():
    model = _llama("reference")
    with pytest.raises(ValueError, match="max_len"):
        MmfastKVCache(model.config, 2, 0)
    cache = MmfastKVCache(model.config, 2, 4)
    with pytest.raises(ValueError, match="prefill"):
        cache.set_lengths(torch.tensor([1, 2]))
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch size 2"):
            model(input_ids=torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), use_cache=True, **cache.attention_kwargs())
        cache = MmfastKVCache(model.config, 2, 4)
        model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), **cache_kwargs(model, cache), use_cache=True, **cache.attention_kwargs())
        with pytest.raises(ValueError, match="shape \\(2,\\)"):
            cache.set_lengths(torch.tensor([1]))
        with pytest.raises(ValueError, match="overflows the cache's max_len=4"):
            model(input_ids=torch.tensor([[1, 2], [3, 4]]), **cache_kwargs(model, cache), use_cache=True, **cache.attention_kwargs())


def test_cache_kwargs_follow_the_installed_transformers_spelling():
    """transformers renamed ``past_key_values`` to ``cache``; the cache must go in under the name the model's
    forward takes (under the other name it would vanish into ``**kwargs`` while the model made its own)."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    marker = object()
    assert cache_kwargs(Old(), marker) == {"past_key_values": marker}
    assert cache_kwargs(New(), marker) == {"cache": marker}
    assert Old()(**cache_kwargs(Old(), marker)) is marker and New()(**cache_kwargs(New(), marker)) is marker
