"""``cpp``: kv-cache (decode) and packed-sequence (varlen prefill) attention on CPU through ``mmfast._C``
(csrc/attention_kvcache.cpp).

One pass per (batch row, kv head) over the row's cached keys, addressed through the block table (paged) or
the row's cache slot (``cache_batch_idx``): scores, softmax and the weighted sum of values in fp32 (fp64 for
fp64), no gather of pages, no S×S scores. The new k/v are appended by :func:`flash_attn_with_kvcache`
before the backend runs, as for every backend. Contract (``AUTOGRAD``: forward only, the kv-cache API has
no backward)::

    forward(q, k_cache, v_cache, p: AttnParams, need_lse) -> (out (B, Sq, H, D), lse (B, H, Sq) fp32 or None)

``flash_attn_varlen_func`` without a block table (the serving engine's prefill) runs the same kernel over
the packed rows (out (T, H, D), lse (H, T)). What it refuses, with the reason: dense ``flash_attn_func``
calls and varlen sequences longer than ``VARLEN_MAX`` (the kernel walks keys one by one per query row: no
GEMM tiles, so long self-attention belongs to the reference's matmuls; measured), paged varlen, ALiBi, dropout, the prefix-LM mask, and gradients. Causal / sliding windows (bottom-right aligned to each
row's range), softcap, GQA/MQA, ``cache_leftpad``, paged (any page size) and contiguous caches run.

On CPU ``auto`` puts it before ``reference`` (the op's CPU default order) because it was measured faster
there at every decode shape tried (docs/inference.md); it needs the extension (``needs=("cpp",)``).
"""
from __future__ import annotations

import torch

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts, cpp_extension

VARLEN_MAX = 1024


class CppKVCache(Backend):
    def supports(self, f: Facts):
        r = []
        if not (f.get("kvcache") or f.get("paged") or f.get("varlen")):
            r.append("not a kv-cache or varlen call: the C++ kernel serves flash_attn_with_kvcache (decode) and "
                     "flash_attn_varlen_func (prefill) only")
        if f.get("varlen") and max(f.get("seqlen_q", 0), f.get("seqlen_k", 0)) > VARLEN_MAX:
            r.append(f"varlen sequences longer than {VARLEN_MAX} (max_seqlen {max(f.get('seqlen_q', 0), f.get('seqlen_k', 0))}): "
                     "the C++ kernel walks the keys one by one per query row, and past ~1k tokens the reference's "
                     "GEMMs were measured faster (docs/inference.md), so it takes packed prefill up to that length")
        if f.get("varlen") and f.get("paged"):
            r.append("paged varlen (block_table with cu_seqlens): not written in the C++ kernel")
        if f.get("alibi"):
            r.append("ALiBi: the C++ kv-cache kernel has no per-head slopes")
        if f.get("dropout"):
            r.append("dropout: the C++ kv-cache kernel is inference only")
        if f.get("mask") == "prefix":
            r.append("prefix-LM mask: the C++ kv-cache kernel has causal/window masks only")
        if f.get("grad"):
            r.append("backward: the C++ kv-cache kernel is forward only (inference)")
        return r

    def forward(self, q, k, v, p, need_lse=False):
        if (p.prefix is not None or p.alibi is not None or p.dropout_p > 0
                or (p.cu_seqlens_q is not None and p.block_table is not None)):
            raise ValueError("the cpp attention backend got a call it refuses (paged varlen, prefix, ALiBi or dropout)")
        if p.cu_seqlens_q is not None:
            out, lse = cpp_extension().varlen_attention_fwd(
                q, k, v, _i32(p.cu_seqlens_q), _i32(p.cu_seqlens_k), p.scale, p.window_left, p.window_right, p.band,
                p.softcap)
            return out, (lse if need_lse else None)
        b = q.shape[0]
        ends = p.seqused_k
        if ends is None:
            cap = p.block_table.shape[1] * p.page_size if p.block_table is not None else k.shape[1]
            ends = torch.full((b,), cap, dtype=torch.int32)
        out, lse = cpp_extension().kvcache_attention_fwd(
            q, k, v, ends.to(torch.int32).contiguous(), _i32(p.leftpad), _i32(p.kv_batch_idx), _i32(p.block_table),
            p.scale, p.window_left, p.window_right, p.band, p.softcap)
        return out, (lse if need_lse else None)



def _i32(t):
    return None if t is None else t.to(torch.int32).contiguous()


CPP = CppKVCache(devices=("cpu",), needs=("cpp",), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                 cpp_kernel=("varlen_attention_fwd", "the kv-cache/varlen kernels"), backward=AUTOGRAD,
                 doc="C++ kv-cache decode attention (CPU, mmfast._C)")
