"""Attention through FlexAttention (``torch.nn.attention.flex_attention``) with a block mask.

Contract (``AUTOGRAD``: FlexAttention's own backward runs)::

    forward(q, k, v, p: AttnParams, need_lse) -> (out like q, lse fp32 like the kernels' or None)

mmfast's masks become a ``mask_mod`` (bottom-right band, windows, prefix-LM per batch row, varlen as a
document mask over the packed sequence) and softcap/ALiBi a ``score_mod``; GQA is ``enable_gqa``. On CUDA
the function is compiled once per mask kind (``torch.compile(flex_attention)``; the first call of a kind
pays the compile) and block masks are cached per shape; on CPU it runs eagerly (PyTorch's unfused path:
a correctness path, not a fast one) and forward only (PyTorch has no FlexAttention backward on CPU).
Refused: mmfast's seeded dropout (flex has none), kv caches with per-row lengths / paged k/v, a backward
on CPU, and on CUDA head dims that are not a power of two >= 16.
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts

_COMPILED: dict = {}
_BLOCK_MASKS: dict = {}
_MAX_CACHED_MASKS = 64


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _compiled(kind):
    """flex_attention compiled once per mask kind (CUDA); eager elsewhere and inside an outer compile."""
    if kind not in _COMPILED:
        _COMPILED[kind] = torch.compile(_flex(), dynamic=False)
    return _COMPILED[kind]


def _unbounded(p, w: int) -> bool:
    return w >= p.max_seqlen_q + p.max_seqlen_k + 1


def _mods(q, k, p):
    """(mask_mod, score_mod, B for the block mask, Sq, Sk, cache key, kind) for dense or packed inputs."""
    dev = q.device
    wl, wr = p.window_left, p.window_right
    band = p.band
    if p.cu_seqlens_q is not None:
        cu_q, cu_k = p.cu_seqlens_q.long(), p.cu_seqlens_k.long()
        nb = cu_q.numel() - 1
        tq, tk = q.shape[0], k.shape[0]
        doc_q = torch.repeat_interleave(torch.arange(nb, device=dev), cu_q.diff(), output_size=tq)
        doc_k = torch.repeat_interleave(torch.arange(nb, device=dev), cu_k.diff(), output_size=tk)
        pos_q = torch.arange(tq, device=dev) - cu_q[doc_q]
        pos_k = torch.arange(tk, device=dev) - cu_k[doc_k]
        off = (cu_k.diff() - cu_q.diff())  # per sequence: Sk - Sq
        pre = None if p.prefix is None else p.prefix.long()

        def qa_of(b, qi):
            return pos_q[qi] + off[doc_q[qi]]

        def kpos(ki):
            return pos_k[ki]

        def same(qi, ki):
            return doc_q[qi] == doc_k[ki]

        def pre_of(b, qi):
            return pre[doc_q[qi]]

        def slope(b, h, qi):
            return p.alibi[doc_q[qi], h]

        key = ("varlen", tuple(p.cu_seqlens_q.tolist()), tuple(p.cu_seqlens_k.tolist()))
        mb, sq, sk = 1, tq, tk
    else:
        sq, sk = q.shape[1], k.shape[1]
        off = sk - sq
        pre = None if p.prefix is None else p.prefix.long()

        def qa_of(b, qi):
            return qi + off

        def kpos(ki):
            return ki

        same = None

        def pre_of(b, qi):
            return pre[b]

        def slope(b, h, qi):
            return p.alibi[b, h]

        key = ("dense", sq, sk)
        mb = q.shape[0] if pre is not None else None

    def mask_mod(b, h, qi, ki):
        qa, j = qa_of(b, qi), kpos(ki)
        ok = (j >= qa - wl) & (j <= qa + wr) if band else (j >= 0)
        if pre is not None:
            pr = pre_of(b, qi)
            ok = ok | ((qa < pr) & (j < pr))
        if same is not None:
            ok = ok & same(qi, ki)
        return ok

    score_mod = None
    if p.softcap > 0 or p.alibi is not None:
        cap = p.softcap

        def score_mod(score, b, h, qi, ki):
            s = score
            if cap > 0:
                s = cap * torch.tanh(s / cap)
            if p.alibi is not None:
                s = s - slope(b, h, qi) * (qa_of(b, qi) - kpos(ki)).abs().to(s.dtype)
            return s

    pre_key = None if pre is None else tuple(p.prefix.tolist())
    mask_key = key + (band, wl if not _unbounded(p, wl) else -1, wr if not _unbounded(p, wr) else -1, pre_key,
                      mb, str(dev))
    kind = (key[0], band, pre is not None, p.softcap > 0, p.alibi is not None)
    return mask_mod, score_mod, mb, sq, sk, mask_key, kind


class FlexAttention(Backend):
    doc = "FlexAttention with a block mask (compiled once per mask kind on CUDA)"

    def supports(self, f: Facts):
        r = []
        if f.get("dropout"):
            r.append("dropout: FlexAttention has no dropout")
        if f.get("kvcache") or f.get("paged"):
            r.append("kv cache with per-row lengths / paged k/v: not mapped to FlexAttention")
        if f.device != "cuda" and f.get("grad"):
            r.append(f"backward on {f.device}: PyTorch's FlexAttention is inference-only there")
        d = f.get("head_dim")
        if f.device == "cuda" and d is not None and (d < 16 or d & (d - 1)):
            r.append(f"head dim {d}: compiled FlexAttention needs a power of two >= 16")
        try:
            _flex()
        except ImportError as e:
            r.append(f"torch.nn.attention.flex_attention does not import ({e})")
        return r

    def forward(self, q, k, v, p, need_lse=False):
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod, score_mod, mb, sq, sk, mkey, kind = _mods(q, k, p)
        block = _BLOCK_MASKS.get(mkey)
        if block is None:
            block = create_block_mask(mask_mod, mb, None, sq, sk, device=q.device)
            if len(_BLOCK_MASKS) >= _MAX_CACHED_MASKS:
                _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
            _BLOCK_MASKS[mkey] = block
        packed = p.cu_seqlens_q is not None
        if packed:
            qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
        else:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        fn = _flex() if (q.device.type != "cuda" or torch.compiler.is_compiling()) else _compiled(kind)
        gqa = k.shape[-2] != q.shape[-2]
        kw = {}
        if need_lse:
            try:
                from torch.nn.attention.flex_attention import AuxRequest

                kw["return_aux"] = AuxRequest(lse=True)
            except ImportError:  # older PyTorch: the return_lse flag
                kw["return_lse"] = True
        res = fn(qt, kt, vt, score_mod=score_mod, block_mask=block, scale=p.scale, enable_gqa=gqa, **kw)
        if not need_lse:
            o, lse = res, None
        else:
            o, aux = res
            lse = aux.lse if hasattr(aux, "lse") else aux
        o = (o[0].transpose(0, 1) if packed else o.transpose(1, 2)).contiguous()
        if lse is not None:
            lse = lse[0] if packed else lse  # (H, T) / (B, H, Sq)
            lse = torch.where(torch.isneginf(lse), float("inf"), lse.float())  # mmfast: +inf for empty rows
        return o, lse


FLEX = FlexAttention(devices=("cpu", "cuda"), backward=AUTOGRAD)
