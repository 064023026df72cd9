"""A preallocated KV cache for decoding with :func:`mmfast.ops.flash_attn_with_kvcache`.

    cache = MmfastKVCache(model.config, batch_size=B, max_len=L + max_new_tokens)
    kw = {**cache_kwargs(model, cache), **cache.attention_kwargs()}
    out = model(inputs_embeds=x, position_ids=pos, **kw)  # prefill
    cache.set_lengths(prompt_lengths)                   # right padding: forget the pad tokens' keys
    out = model(inputs_embeds=x1, position_ids=cache.lengths()[:, None], **kw)  # a token per row, at its length

``cache_kwargs`` names the cache argument as the installed transformers spells it (``cache`` in recent
releases, ``past_key_values`` before).

Each layer holds keys and values (B, Smax, Hk, D) and per-row lengths (B,). A forward appends Snew
tokens to every row at that row's own length: the layer's attention (mmfast's, registered as
``attn_implementation="mmfast"``) finds the cache in its keyword arguments and calls
``flash_attn_with_kvcache``, which writes the new keys/values in place and attends each query over the
first ``length + Snew`` keys of its row (causal, aligned at the end). No padding mask is needed: rows of
different lengths live side by side, and right padding left after a prefill is overwritten by the
next tokens once :meth:`MmfastKVCache.set_lengths` rewinds each row to its real length.

transformers' attention layers call ``cache.update(k, v, layer_idx)`` and then the attention function.
``update`` here writes nothing: it hands the new keys/values through and records that the layer's
attention still has to consume them; if that attention is not mmfast's (an unpatched model, or the
keyword argument was not passed) the next ``update`` (or :meth:`MmfastKVCache.check_consumed`) raises
instead of letting the model attend over the new tokens only.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mmfast.models.hf_attention import KV_CACHE_KWARG
from mmfast.ops.attention import flash_attn_func, flash_attn_with_kvcache


class MmfastKVLayer(CacheLayerMixin):
    """One layer's cache: ``keys``/``values`` (B, Smax, Hk, D), allocated at the first update; ``lens`` (B,) int32."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, batch_size: int, max_len: int):
        super().__init__()
        self.batch_size, self.max_len = batch_size, max_len
        self.lens: torch.Tensor | None = None
        self.max_seen = 0  # host copy of lens.max(): no device sync for get_seq_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hk, _, d = key_states.shape  # transformers' layout (B, Hk, S, D)
        if b != self.batch_size:
            raise ValueError(f"the cache was built for batch size {self.batch_size} but the model got {b} rows")
        self.device = key_states.device
        self.keys = torch.zeros(b, self.max_len, hk, d, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(b, self.max_len, hk, value_states.shape[-1], dtype=value_states.dtype,
                                  device=self.device)
        self.lens = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states  # written by the attention, in flash_attn_with_kvcache

    def attend(self, q, k, v, *, causal, softmax_scale, window_size, softcap, prefix, backend) -> torch.Tensor:
        """q (B, Sq, H, D), new k/v (B, Snew, Hk, D) → (B, Sq, H, D); appends k/v at each row's length."""
        snew = k.shape[1]
        if self.max_seen + snew > self.max_len:
            raise ValueError(f"appending {snew} tokens to rows of up to {self.max_seen} overflows the cache's "
                             f"max_len={self.max_len}; build MmfastKVCache with a larger max_len")
        if prefix is not None:
            # The prefix-LM mask (bidirectional image tokens) is a prefill-only pattern: later tokens are
            # causal over everything before them, which flash_attn_with_kvcache computes.
            if self.max_seen:
                raise ValueError("a prefix-LM mask (mmfast_prefix_len) only applies to the first forward of an "
                                 "empty MmfastKVCache")
            self.keys[:, :snew] = k
            self.values[:, :snew] = v
            out = flash_attn_func(q, k, v, causal=True, softmax_scale=softmax_scale, window_size=window_size,
                                  softcap=softcap, prefix_len=prefix, backend=backend)
        else:
            out = flash_attn_with_kvcache(q, self.keys, self.values, k, v, cache_seqlens=self.lens,
                                          softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                          softcap=softcap, backend=backend)
        self.lens = self.lens + snew
        self.max_seen += snew
        return out

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.lens = lengths.to(device=self.device, dtype=torch.int32)
        self.max_seen = int(self.lens.max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.max_seen

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.lens.zero_()
        self.max_seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            self.lens = self.lens.index_select(0, beam_idx.to(self.device))


class MmfastKVCache(Cache):
    """Preallocated per-layer caches (B, ``max_len``, Hk, D) with per-row lengths; see the module docstring.

    ``config``: the language model's config (or a composite one with ``text_config``), for its layer count.
    """

    def __init__(self, config, batch_size: int, max_len: int):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(text.num_hidden_layers)
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        super().__init__(layers=[MmfastKVLayer(batch_size, max_len) for _ in range(n_layers)])
        self.max_len = max_len  # (batch_size is Cache's property, read from the layers)
        self._pending: int | None = None  # layer whose update has not yet reached mmfast's attention

    def attention_kwargs(self) -> dict:
        """Model keyword arguments that route each layer's attention to this cache."""
        return {KV_CACHE_KWARG: self}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.check_consumed()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._pending = layer_idx
        return out

    def attend(self, layer_idx: int, q, k, v, **kw) -> torch.Tensor:
        """Called by mmfast's attention function for layer ``layer_idx`` (see :class:`MmfastKVLayer`)."""
        if self._pending != layer_idx:
            raise RuntimeError(f"mmfast attention of layer {layer_idx} found an MmfastKVCache that was not updated "
                               "for it (the model must call cache.update before its attention)")
        self._pending = None
        return self.layers[layer_idx].attend(q, k, v, **kw)

    def check_consumed(self) -> None:
        """Raise if the last updated layer's attention did not run through this cache."""
        if self._pending is not None:
            layer, self._pending = self._pending, None
            raise RuntimeError(
                f"layer {layer} updated an MmfastKVCache but its attention did not use it: the cache needs the "
                "model patched with mmfast attention (attn_implementation='mmfast', e.g. mmfast.patch) and the "
                f"model keyword argument {KV_CACHE_KWARG}=cache (cache.attention_kwargs()); use transformers' "
                "DynamicCache otherwise")

    def lengths(self) -> torch.Tensor:
        """Per-row lengths (B,) int32 (the first layer's; every layer holds the same)."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return torch.zeros(self.batch_size, dtype=torch.int32)
        return layer.lens

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Set every layer's per-row lengths (B,), e.g. the real prompt lengths after a right-padded prefill;
        cached entries past a row's length are overwritten by its next tokens."""
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (self.batch_size,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape ({self.batch_size},), got {lengths!r}")
        if int(lengths.min()) < 0 or int(lengths.max()) > self.max_len:
            raise ValueError(f"lengths must lie in [0, {self.max_len}], got {lengths.tolist()}")
        for layer in self.layers:
            if not layer.is_initialized:
                raise ValueError("set_lengths needs a filled cache (run the prefill forward first)")
            layer.set_lengths(lengths)


@functools.cache
def _cache_arg(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for ``model(...)``: transformers renamed ``past_key_values`` to ``cache`` (5.2x); a
    cache passed under the other name would go unseen into ``**kwargs`` while the model made its own."""
    return {_cache_arg(type(model).forward): cache}


__all__ = ["MmfastKVCache", "MmfastKVLayer", "cache_kwargs"]
