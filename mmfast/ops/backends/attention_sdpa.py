"""Attention through PyTorch's ``F.scaled_dot_product_attention``, pinned to one of its kernels with
``torch.nn.attention.sdpa_kernel``: ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math``.

Contract (``AUTOGRAD``: SDPA's own backward kernels run)::

    forward(q, k, v, p: AttnParams, need_lse) -> (out (B, S, H, D) contiguous, None)

What SDPA cannot do, refused with the reason: softcap, ALiBi slopes, mmfast's seeded dropout (SDPA draws
its own mask), packed varlen (cu_seqlens), kv caches with per-row lengths / paged k/v, returning the
log-sum-exp, and rows that see no key (SDPA gives NaN or garbage there, mmfast 0). ``is_causal`` in SDPA
aligns the mask top-left, mmfast bottom-right: equal lengths use ``is_causal``; anything else (unequal
lengths, windows, the prefix-LM mask) needs a dense boolean (B, 1, Sq, Sk) mask, which only the
``efficient`` and ``math`` kernels take (``flash`` and ``cudnn`` refuse it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts

_HALF = (torch.float16, torch.bfloat16)


def dense_mask(p, b: int, sq: int, sk: int, device) -> torch.Tensor:
    """(B or 1, 1, Sq, Sk) boolean mask of visible keys (True = attend), mmfast's masks bottom-right aligned."""
    qa = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = (j >= qa - p.window_left) & (j <= qa + p.window_right)  # (Sq, Sk)
    if p.prefix is None:
        return ok[None, None]
    pre = p.prefix.to(device=device, dtype=torch.long).clamp(max=sk)[:, None, None, None]  # (B, 1, 1, 1)
    return ok[None, None] | ((qa < pre) & (j < pre))


class SdpaAttention(Backend):
    kernel: SDPBackend = SDPBackend.MATH
    takes_mask: bool = True  # a dense boolean attn_mask
    native_gqa: bool = True  # enable_gqa=True (else k/v heads are repeated)
    max_head_dim: int = 1 << 30
    cuda_dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)

    def supports(self, f: Facts):
        r = []
        if f.get("softcap"):
            r.append("softcap: SDPA has no score modifier (tanh soft-capping)")
        if f.get("alibi"):
            r.append("ALiBi: SDPA takes no per-head slopes (only a dense float bias)")
        if f.get("dropout"):
            r.append("dropout: SDPA draws its own mask from torch's generator, not mmfast's seeded one")
        if f.get("varlen"):
            r.append("varlen: SDPA has no packed (cu_seqlens) entry point; per-row lengths would need padding")
        if f.get("kvcache") or f.get("paged"):
            r.append("kv cache with per-row lengths / paged k/v: SDPA takes dense k/v only")
        if f.get("need_lse"):
            r.append("return_lse/return_attn_probs: SDPA does not return the log-sum-exp")
        if f.get("empty_rows"):
            r.append("query rows that see no key: SDPA does not give mmfast's 0 output there")
        if not self.takes_mask and self.needs_mask(f):
            r.append(f"mask '{f.get('mask')}' (seqlen_q {f.get('seqlen_q')}, seqlen_k {f.get('seqlen_k')}) needs a "
                     f"dense boolean mask, which SDPA's {self.kernel.name.lower()} kernel does not take "
                     "(its is_causal aligns top-left)")
        d = f.get("head_dim")
        if f.device == "cuda":
            if f.dtype not in self.cuda_dtypes:
                r.append(f"dtype {str(f.dtype).replace('torch.', '')} on CUDA: SDPA's "
                         f"{self.kernel.name.lower()} kernel takes fp16/bf16 only")
            if d is not None and self.kernel != SDPBackend.MATH and d % 8:
                r.append(f"head dim {d} is not a multiple of 8")
            if d is not None and d > self.max_head_dim:
                r.append(f"head dim {d} > {self.max_head_dim}")
        return r

    @staticmethod
    def needs_mask(f: Facts) -> bool:
        mask = f.get("mask")
        return mask in ("prefix", "window") or (mask == "causal" and f.get("seqlen_q") != f.get("seqlen_k"))

    def forward(self, q, k, v, p, need_lse=False):
        b, sq, h, _ = q.shape
        sk, hk = k.shape[1], k.shape[2]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) views
        gqa = hk != h
        if gqa and not self.native_gqa:
            kt, vt = kt.repeat_interleave(h // hk, dim=1), vt.repeat_interleave(h // hk, dim=1)
            gqa = False
        mask, causal = None, False
        if p.band:
            plain_causal = (p.prefix is None and sq == sk and p.window_right == 0
                            and p.window_left >= p.max_seqlen_q + p.max_seqlen_k + 1)
            if plain_causal:
                causal = True
            else:
                mask = dense_mask(p, b, sq, sk, q.device)
        with sdpa_kernel(self.kernel):
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal, scale=p.scale,
                                               enable_gqa=gqa)
        # (B, S, H, D) as flash-attn returns it; a no-op copy when the kernel wrote q's layout (flash, cuDNN)
        return o.transpose(1, 2).contiguous(), None


CUDNN = SdpaAttention(kernel=SDPBackend.CUDNN_ATTENTION, takes_mask=False, native_gqa=False, max_head_dim=128,
                      cuda_dtypes=_HALF, devices=("cuda",), backward=AUTOGRAD,
                      doc="SDPA, cuDNN kernel (fastest dense kernel on Hopper in our runs)")
FLASH = SdpaAttention(kernel=SDPBackend.FLASH_ATTENTION, takes_mask=False, native_gqa=True, max_head_dim=256,
                      cuda_dtypes=_HALF, devices=("cpu", "cuda"), backward=AUTOGRAD,
                      doc="SDPA, FlashAttention-2 kernel (CUDA) / PyTorch's flash CPU kernel")
EFFICIENT = SdpaAttention(kernel=SDPBackend.EFFICIENT_ATTENTION, takes_mask=True, native_gqa=False,
                          devices=("cuda",), backward=AUTOGRAD, doc="SDPA, memory-efficient (xformers) kernel")
MATH = SdpaAttention(kernel=SDPBackend.MATH, takes_mask=True, native_gqa=True, devices=("cpu", "cuda"),
                     backward=AUTOGRAD, doc="SDPA, math kernel (composite PyTorch ops; materialises the scores)")
