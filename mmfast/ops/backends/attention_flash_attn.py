"""Attention through the ``flash-attn`` package (Dao-AILab), only when it imports.

Contract (``AUTOGRAD``: flash-attn's own backward kernels run)::

    forward(q, k, v, p: AttnParams, need_lse) -> (out like q, lse fp32 or None)

flash-attn takes causal (bottom-right, as mmfast), windows, softcap, ALiBi slopes, GQA and packed varlen.
Refused: the prefix-LM mask (no such mask in flash-attn), mmfast's seeded dropout (flash-attn draws from
torch's CUDA generator), kv caches / paged k/v through this path, fp32, head dims > 256.
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts

try:
    import flash_attn as _fa

    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - any failure (missing package, ABI mismatch) is a refusal reason
    _fa = None
    _IMPORT_ERROR = f"the flash-attn package does not import ({type(e).__name__}: {e})"


class FlashAttnPackage(Backend):
    doc = "the flash-attn package's CUDA kernels"

    def supports(self, f: Facts):
        r = []
        if _IMPORT_ERROR:
            r.append(_IMPORT_ERROR)
        if f.get("mask") == "prefix":
            r.append("prefix-LM: flash-attn has no such mask")
        if f.get("dropout"):
            r.append("dropout: flash-attn draws its own mask, not mmfast's seeded one")
        if f.get("kvcache") or f.get("paged"):
            r.append("kv cache / paged k/v: not mapped to flash-attn through this path")
        d = f.get("head_dim")
        if d is not None and d > 256:
            r.append(f"head dim {d} > 256")
        return r

    def forward(self, q, k, v, p, need_lse=False):
        big = p.max_seqlen_q + p.max_seqlen_k + 1
        wl = -1 if p.window_left >= big else p.window_left
        wr = -1 if p.window_right >= big else p.window_right
        causal = p.band and wr == 0
        window = (wl, -1 if causal else wr) if p.band else (-1, -1)
        kw = {"softmax_scale": p.scale, "causal": causal, "window_size": window, "softcap": p.softcap,
              "alibi_slopes": p.alibi, "return_attn_probs": need_lse}
        if p.cu_seqlens_q is not None:
            res = _fa.flash_attn_varlen_func(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q,
                                             p.max_seqlen_k, 0.0, **kw)
        else:
            res = _fa.flash_attn_func(q, k, v, 0.0, **kw)
        if need_lse:
            return res[0], res[1].float()
        return res, None


FLASH_ATTN = FlashAttnPackage(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), backward=AUTOGRAD)
