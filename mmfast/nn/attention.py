"""Attention modules over :func:`mmfast.ops.flash_attn_func`.

* :class:`FlashAttention` — the core op as a module: (B, S, H, D) q/k/v in, (B, S, H, D) out.
* :class:`MultiheadAttention` — a drop-in for ``torch.nn.MultiheadAttention`` (same parameters and
  state dict, same call) whose attention runs on the flash kernels. Masks it understands: none, a causal
  mask (additive -inf above the diagonal or boolean True above it, as open_clip and PyTorch build them)
  or ``is_causal=True``; anything else raises instead of silently computing something different.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops.attention import flash_attn_func


class FlashAttention(nn.Module):
    """``softmax(scale · q kᵀ | mask) v`` on (batch, seqlen, heads, headdim) tensors (k/v may have fewer heads).

    ``attention_dropout`` applies only in training mode, like ``nn.Dropout``."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None, attention_dropout: float = 0.0,
                 window_size=(-1, -1), softcap: float = 0.0, backend: str | None = None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.dropout_p = attention_dropout
        self.window_size = tuple(window_size)
        self.softcap = softcap
        self.backend = backend

    def forward(self, q, k, v, *, prefix_len=None):
        return flash_attn_func(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                               softmax_scale=self.softmax_scale, causal=self.causal, window_size=self.window_size,
                               softcap=self.softcap, prefix_len=prefix_len, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, dropout={self.dropout_p}, "
                f"window_size={self.window_size}, softcap={self.softcap}, backend={self.backend}")


# id(mask) -> (weak reference to it, its version counter, sq, sk, answer): models pass the same mask
# buffer every layer and step, and reading the answer off the device is a host sync that stalls the
# launch queue each time. (Keyed by id, not by the tensor: tensors compare elementwise.)
_CAUSAL_SEEN: dict[int, tuple] = {}


def mask_is_causal(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """True when ``mask`` (additive or boolean, (Sq, Sk) or (Sk, Sk) with Sq = Sk) hides exactly j > i.
    Remembered per mask tensor until it is modified in place, so the check costs one device sync per
    mask rather than one per call."""
    if mask.dim() != 2 or mask.shape[0] < sq or mask.shape[1] < sk:
        return False
    key = id(mask)
    seen = _CAUSAL_SEEN.get(key)
    if seen is not None and seen[0]() is mask and seen[1:4] == (mask._version, sq, sk):
        return seen[4]
    answer = _mask_is_causal(mask[:sq, :sk], sq, sk)
    if not torch.compiler.is_compiling():
        if seen is None or seen[0]() is not mask:
            weakref.finalize(mask, _CAUSAL_SEEN.pop, key, None)
        _CAUSAL_SEEN[key] = (weakref.ref(mask), mask._version, sq, sk, answer)
    return answer


def _mask_is_causal(mask: torch.Tensor, sq: int, sk: int) -> bool:
    upper = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool((mask[upper] == float("-inf")).all() and (mask[~upper] == 0).all())


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with flash attention inside; loads its state dict unchanged.

    Supports self- and cross-attention with equal q/k/v widths (``kdim = vdim = embed_dim``), with or
    without biases, ``batch_first`` either way. ``need_weights=True`` is refused: the weights are never
    formed. ``causal=True`` (or ``is_causal=True`` at call time) selects the causal mask."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, causal: bool = False, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.causal = causal
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        if not bias:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self):
        # The same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, causal: bool = False, backend: str | None = None):
        """A module sharing ``mha``'s parameters (the same Parameter objects, so optimisers keep working)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with kdim = vdim = embed_dim, no bias_k/bias_v and "
                             "add_zero_attn=False can be converted")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        new.dropout, new.batch_first, new.causal, new.backend = mha.dropout, mha.batch_first, causal, backend
        new.in_proj_weight = mha.in_proj_weight
        if mha.in_proj_bias is None:
            new.register_parameter("in_proj_bias", None)
        else:
            new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        return new

    def _project(self, query, key, value):
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is query and value is query:
            return F.linear(query, w, b).chunk(3, dim=-1)
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        key = query if key is None else key
        value = key if value is None else value
        if need_weights:
            raise ValueError("need_weights=True is not available: flash attention never forms the weights")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported; pack the sequences and use "
                             "mmfast.ops.flash_attn_varlen_func")
        if query.dim() != 3:
            raise ValueError(f"query must be 3-D (batched), got shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, sq, _ = query.shape
        sk = key.shape[1]
        causal = self.causal or is_causal
        if attn_mask is not None:
            if not mask_is_causal(attn_mask, sq, sk):
                raise ValueError("attn_mask must be None or a causal mask (-inf / True above the diagonal); "
                                 f"got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)} with another pattern")
            causal = True
        q, k, v = self._project(query, key, value)
        q = q.reshape(b, sq, self.num_heads, self.head_dim)  # (B, Sq, H, D)
        k = k.reshape(b, sk, self.num_heads, self.head_dim)  # (B, Sk, H, D)
        v = v.reshape(b, sk, self.num_heads, self.head_dim)
        out = flash_attn_func(q, k, v, dropout_p=self.dropout if self.training else 0.0, causal=causal,
                              backend=self.backend)  # (B, Sq, H, D)
        out = self.out_proj(out.reshape(b, sq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"causal={self.causal}, backend={self.backend}")


__all__ = ["FlashAttention", "MultiheadAttention", "mask_is_causal"]
