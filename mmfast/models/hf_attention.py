"""mmfast flash attention as a transformers attention implementation: ``attn_implementation="mmfast"``.

    import mmfast.models.hf_attention as hfa
    hfa.register()                                   # once; idempotent
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mmfast")
    model.set_attn_implementation("mmfast")          # or switch an existing model

Two registrations (transformers 5.x): the attention function in ``AttentionInterface`` and a mask
function in ``AttentionMaskInterface``. Masks: the plain causal and bidirectional masks reach the
attention as None (no padding) or the 2-D (batch, kv_len) padding mask, which the attention removes by
packing the valid tokens and calling the varlen kernel (as transformers' flash-attn path does). Any other
mask pattern (packed sequences, or/and mask functions, sliding windows) arrives as transformers' 4-D
boolean mask; the attention accepts it only when it equals the causal/bidirectional(/window) pattern
with no padding, and raises otherwise rather than computing a different function.

Decoding: when the model kwarg ``mmfast_kv_cache`` holds an :class:`mmfast.models.kv_cache.MmfastKVCache`
(preallocated per-layer caches with per-row lengths), the attention appends the new keys/values to it and
attends through :func:`mmfast.ops.flash_attn_with_kvcache`; no padding mask is needed there.
"""
from __future__ import annotations

import torch

from mmfast.ops.attention import flash_attn_func, flash_attn_varlen_func, visible_reference

NAME = "mmfast"
PREFIX_KWARG = "mmfast_prefix_len"  # model kwarg: (B,) prefix lengths of a prefix-LM mask
KV_CACHE_KWARG = "mmfast_kv_cache"  # model kwarg: an mmfast.models.kv_cache.MmfastKVCache
_BACKEND = {"value": None}  # backend forced by `register(backend=...)` / mmfast.patch(..., backend=...)


def _mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):
    from transformers import masking_utils as mu

    if mask_function in (None, mu.causal_mask_function, mu.bidirectional_mask_function):
        return mu.flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                       attention_mask=attention_mask, **kwargs)
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


def _window(sliding_window) -> tuple[int, int]:
    # transformers' flash path: a sliding window of w tokens sees w - 1 keys either side (causal: back).
    return (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)


def _check_4d(mask: torch.Tensor, sq: int, sk: int, causal: bool, window) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mmfast attention got an attention_mask of shape {tuple(mask.shape)}; expected None, "
                         "(batch, kv_len) or (batch, 1, q_len, kv_len)")
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    wl, wr = window
    big = sq + sk + 1
    expect = visible_reference(sq, sk, big if wl < 0 else wl, 0 if causal else (big if wr < 0 else wr),
                               causal or wl >= 0, None, mask.device)
    if not torch.equal(allowed[:, 0, :, -sk:], expect.expand(mask.shape[0], sq, sk)):
        raise NotImplementedError(
            "mmfast attention supports causal/bidirectional (and sliding-window) masks with right or left padding; "
            "this model built another mask pattern (packed sequences or a custom mask function). Use "
            "attn_implementation='sdpa' for it.")


def _unpadded(query, key, value, kv_mask, causal, kwargs, prefix=None):
    """Attention over the valid tokens only; query rows of padding come back as zeros. ``prefix``
    (B,) counts from each row's first valid token."""
    b, sq, h, d = query.shape
    sk = key.shape[1]
    kv_valid = kv_mask[:, -sk:].bool()  # (B, Sk)
    q_valid = kv_valid[:, -sq:]  # queries are the last Sq positions
    lens_k = kv_valid.sum(1, dtype=torch.int32)
    lens_q = q_valid.sum(1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.nn.functional.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    q_idx = q_valid.reshape(-1).nonzero().squeeze(1)
    k_idx = kv_valid.reshape(-1).nonzero().squeeze(1)
    out = flash_attn_varlen_func(query.reshape(b * sq, h, d)[q_idx], key.reshape(b * sk, -1, d)[k_idx],
                                 value.reshape(b * sk, -1, d)[k_idx], cu_q, cu_k, int(lens_q.max()),
                                 int(lens_k.max()), causal=causal, prefix_lens=prefix, **kwargs)  # (Tq, H, D)
    full = out.new_zeros(b * sq, h, d).index_copy(0, q_idx, out)
    return full.reshape(b, sq, h, d)


def _with_kv_cache(module, cache, q, k, v, attention_mask, causal, prefix, op_kwargs):
    from mmfast.models.kv_cache import MmfastKVCache

    if not isinstance(cache, MmfastKVCache):
        raise TypeError(f"{KV_CACHE_KWARG} must be an mmfast.models.kv_cache.MmfastKVCache, got {type(cache).__name__}")
    if attention_mask is not None:
        # Rows of different lengths are per-row cache lengths here, never a padding mask.
        raise ValueError(f"mmfast attention with {KV_CACHE_KWARG} takes no attention_mask (got shape "
                         f"{tuple(attention_mask.shape)}): right-pad the prompts and set the cache's lengths")
    if op_kwargs["dropout_p"]:
        raise ValueError(f"{KV_CACHE_KWARG} is for inference; got attention dropout {op_kwargs['dropout_p']}")
    return cache.attend(module.layer_idx, q, k, v, causal=causal, softmax_scale=op_kwargs["softmax_scale"],
                        window_size=op_kwargs["window_size"], softcap=op_kwargs.get("softcap", 0.0),
                        prefix=prefix, backend=op_kwargs["backend"])


def mmfast_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, softcap=None, sliding_window=None, **kwargs):
    """transformers attention interface: query (B, H, Sq, D), key/value (B, Hk, Sk, D) → ((B, Sq, H, D), None)."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='mmfast' cannot return attention weights (output_attentions=True)")
    # A prefix-LM mask (LLaVA's bidirectional image tokens) arrives as a model kwarg, (B,) int32.
    prefix = kwargs.get(PREFIX_KWARG)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _window(sliding_window)
    op_kwargs = {"dropout_p": dropout, "softmax_scale": scaling, "window_size": window,
                     "backend": _BACKEND["value"]}
    if softcap:
        op_kwargs["softcap"] = float(softcap)
    kv_cache = kwargs.get(KV_CACHE_KWARG)
    if kv_cache is not None:
        return _with_kv_cache(module, kv_cache, q, k, v, attention_mask, causal, prefix, op_kwargs), None
    if attention_mask is not None and attention_mask.dim() == 2:
        return _unpadded(q, k, v, attention_mask, causal, op_kwargs, prefix), None
    if attention_mask is not None:
        _check_4d(attention_mask, q.shape[1], k.shape[1], causal, window)
    return flash_attn_func(q, k, v, causal=causal, prefix_len=prefix, **op_kwargs), None


def register(backend: str | None = None) -> str:
    """Register ``"mmfast"`` with transformers (idempotent); returns the name. ``backend`` forces an mmfast
    backend for every model using it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from mmfast.ops._dispatch import check_backend_name

    check_backend_name(backend)
    _BACKEND["value"] = backend
    AttentionInterface.register(NAME, mmfast_attention_forward)
    AttentionMaskInterface.register(NAME, _mask_interface)
    return NAME


__all__ = ["KV_CACHE_KWARG", "NAME", "PREFIX_KWARG", "mmfast_attention_forward", "register"]
