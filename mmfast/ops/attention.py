"""Flash attention with flash-attn's interface, plus the masks multimodal models need.

Layout (batch, seqlen, heads, headdim), as flash-attn. For one head of one sequence, with
``qa = i + Sk - Sq`` (causal masks align bottom-right when Sq ≠ Sk):

    s_ij = scale · q_i·k_j                     softcap > 0:  s_ij = softcap · tanh(scale · q_i·k_j / softcap)
    alibi_slopes:  s_ij -= slope_h · |qa - j|  (flash-attn's documented bias, causal or not)
    visible(i, j) = (qa - wl ≤ j ≤ qa + wr)  ∨  (qa < P ∧ j < P)
    o_i = Σ_j dropout(softmax_j(s_ij | visible)) · v_j,       lse_i = log Σ_{j visible} exp(s_ij)

``window_size=(wl, wr)`` with -1 meaning unbounded; ``causal`` sets wr = 0. ``prefix_len`` P is the
prefix-LM mask (image tokens then text): the first P positions attend to each other both ways, the
rest causally; it implies ``causal``, and the prefix block is visible even outside a sliding window.
A row that sees no key outputs 0 and has lse = +inf (flash-attn's convention).

Dropout (``dropout_p`` > 0) is applied to the normalised probabilities and is a deterministic function
of a seed: pass ``dropout_seed=`` or the seed is drawn from torch's default CPU generator, so
``torch.manual_seed`` makes a run reproducible. Both backends drop the same entries.

dtypes: fp16 and bf16 (fp32 accumulation), and fp32, which the Triton kernels compute in full fp32
(``input_precision="ieee"``), not tf32. Head dims 1–256 (the Triton kernels pad to a power of two).

The public functions are flash-attn 2.8's, name for name, position for position, default for default
(``flash_attn_func``, ``flash_attn_varlen_func``, the qkv/kv-packed forms, ``flash_attn_with_kvcache``;
also importable as :mod:`mmfast.compat.flash_attn`); mmfast's own parameters (``prefix_len(s)``,
``dropout_seed``, ``backend``, ``return_lse``) are keyword-only. Where results can differ from flash-attn's:
the lse with causal ALiBi (flash-attn's CUDA kernel adds slope·j there, a per-row constant away from the
documented bias: same outputs and gradients); S_dmask is normalised and unpadded (see ``_finish``).
``deterministic`` always holds (the backward has no atomics). ``flash_attn_with_kvcache`` also takes a
paged cache of any page size (flash-attn: multiples of 256) and cache_leftpad together with a block table
(flash-attn refuses the pair); ``num_splits`` is accepted and ignored (no split-K).

Backends (the contract: :mod:`mmfast.ops._dispatch`; one module each under :mod:`mmfast.ops.backends`):
``triton`` (CUDA) and ``triton_interpret`` (the same kernels on CPU, tests): every mask and feature;
``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math`` (PyTorch SDPA pinned to one kernel),
``flex`` (FlexAttention with a block mask), ``flash_attn`` (the flash-attn package, when it imports) and
``reference`` (plain PyTorch, any device; materialises the S×S scores). Each vendor backend refuses, with
the reason, what it cannot do (softcap, ALiBi, seeded dropout, varlen, prefix-LM, kv caches, the lse...).
Explicit-backward backends (Triton)::

    forward(q, k, v, p: AttnParams) -> (out like q, lse fp32, saved: tuple of tensors)
    backward(dout, q, k, v, out, saved, p) -> (dq, dk, dv)

``AUTOGRAD`` backends (vendor kernels with their own backward, and the reference)::

    forward(q, k, v, p: AttnParams, need_lse) -> (out like q, lse fp32 or None when not need_lse)

q/k/v arrive as the public functions take them ((B, S, H, D), or (T, H, D) with ``p.cu_seqlens_q``; paged
k/v with ``p.block_table``); lse is (B, H, Sq), or (H, T) packed, +inf on rows that see no key.
The facts a backend is asked about (``Facts.extra``): head_dim, heads, kv_heads, batch, seqlen_q, seqlen_k,
mask ("full" | "causal" | "window" | "prefix"), softcap, alibi, dropout, varlen, kvcache, paged, need_lse,
grad, empty_rows (some query row sees no key). ``auto``: the preference table's row for the device family
and the shape class ``<mask>/<s256|s512|s1k|s2k|s4k|long>/<train|infer>`` (``decode/...`` for kv caches),
then the default order: triton, triton_interpret, flash_attn, sdpa_cudnn, sdpa_flash, sdpa_efficient, flex,
sdpa_math, reference (on CPU: triton_interpret, reference, then the others), so a vendor kernel runs by
default only where the table measured it faster or where mmfast's kernels cannot run. ``mmfast info --explain attention --shape B,S,H,D ...`` shows the choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts, Op, check_backend_name, register

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (*_SUPPORTED_DTYPES, torch.float64)  # fp64: the oracle, reference backend only
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------- parameters of a call
@dataclass
class AttnParams:
    """Everything but the tensors q/k/v; windows are resolved (an unbounded side is a big number)."""

    scale: float
    band: bool  # any of causal / window: the band mask is on
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    seed: int
    max_seqlen_q: int
    max_seqlen_k: int
    prefix: torch.Tensor | None = None  # int32 (B,)
    cu_seqlens_q: torch.Tensor | None = None  # int32 (B+1,)
    cu_seqlens_k: torch.Tensor | None = None
    seqused_k: torch.Tensor | None = None  # int32 (B,): keys used per batch row (kv cache)
    alibi: torch.Tensor | None = None  # fp32 (B, H) contiguous: ALiBi slopes
    kv_batch_idx: torch.Tensor | None = None  # int32 (B,): cache row of each batch row (kv cache)
    leftpad: torch.Tensor | None = None  # int32 (B,): first key of each row (kv cache)
    block_table: torch.Tensor | None = None  # int32 (B, max_pages): paged k/v (num_pages, page_size, Hk, D)
    page_size: int = 0

    def dummy_int(self, device) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.int32, device=device)


def _window_pair(window_size) -> tuple[int, int]:
    """(left, right) from a tuple, a list or a 2-element tensor (flash-attn's tests pass all three)."""
    if isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2 or window_size.dtype.is_floating_point:
            raise ValueError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
        window_size = window_size.reshape(2).tolist()
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    wl, wr = (int(w) for w in window_size)
    if wl < -1 or wr < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return wl, wr


def _resolve_window(window_size, causal: bool, prefix: bool, big: int) -> tuple[bool, int, int]:
    wl, wr = _window_pair(window_size)
    if causal or prefix:
        wr = 0
    band = causal or prefix or wl >= 0 or wr >= 0
    return band, big if wl < 0 else wl, big if wr < 0 else wr


# --------------------------------------------------------------------------- reference (oracle)
_M32 = 0xFFFFFFFF


def _hash_u32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' 32-bit mixer on int64 tensors holding uint32 values (products wrap mod 2⁶⁴,
    so their low 32 bits are the uint32 products)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep_reference(seed: int, bh: torch.Tensor, sq: int, sk: int, p: float, device) -> torch.Tensor:
    """Keep-mask (len(bh), sq, sk) identical to the kernels' for heads ``bh`` (= batch·H + head)."""
    base = _hash_u32((int(seed) + bh.long() * 0x9E3779B9) & _M32)  # (n,)
    lin = (torch.arange(sq, device=device)[:, None] * sk + torch.arange(sk, device=device)[None, :]) & _M32
    r = _hash_u32(lin[None] ^ base[:, None, None])
    return (r >> 8).double() * (1.0 / 16777216.0) >= p


def visible_reference(sq: int, sk: int, wl: int, wr: int, band: bool, prefix: int | None, device) -> torch.Tensor:
    """Boolean (Sq, Sk) mask of visible keys; see the module docstring."""
    qa = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    if not band:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    ok = (j >= qa - wl) & (j <= qa + wr)
    if prefix is not None:
        ok = ok | ((qa < prefix) & (j < prefix))
    return ok


def alibi_bias_reference(slopes: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """(B, H, Sq, Sk) ALiBi bias -slope·|i + Sk - Sq - j| for (B, H) slopes (flash-attn's documented bias,
    causal or not; flash-attn's CUDA kernel adds slope·j under causal instead, which differs per query row
    by a constant: the same softmax, outputs and gradients, a different lse)."""
    qa = torch.arange(sq, device=slopes.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=slopes.device)[None, :]
    return -slopes[:, :, None, None] * (qa - j).abs().to(slopes.dtype)


def _reference_dense(q, k, v, p: AttnParams, batch_offset: int, prefix_list, n_heads_total: int):
    """(B, Sq, H, D) attention by materialising the scores; returns (out, lse (B, H, Sq) fp32)."""
    b, sq, h, _d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=2)
        v = v.repeat_interleave(h // hk, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    s = qt @ kt.transpose(-1, -2)  # (B, H, Sq, Sk); scores rounded to q's dtype first
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * p.scale
    if p.softcap > 0:
        s = p.softcap * torch.tanh(s / p.softcap)
    if p.alibi is not None:
        s = s + alibi_bias_reference(p.alibi[batch_offset : batch_offset + b], sq, sk).to(s.dtype)
    masks = []
    for i in range(b):
        pre = None if prefix_list is None else min(prefix_list[i], sk)
        masks.append(visible_reference(sq, sk, p.window_left, p.window_right, p.band, pre, q.device))
    mask = torch.stack(masks)[:, None]  # (B, 1, Sq, Sk)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq)
    empty = torch.isinf(lse) & (lse < 0)
    prob = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    if p.dropout_p > 0:
        heads = torch.arange(h, device=q.device)
        bh = (torch.arange(b, device=q.device)[:, None] + batch_offset) * n_heads_total + heads  # (B, H)
        keep = dropout_keep_reference(p.seed, bh.reshape(-1), sq, sk, p.dropout_p, q.device).reshape(b, h, sq, sk)
        prob = prob * keep / (1.0 - p.dropout_p)
    out = prob.to(q.dtype) @ vt  # (B, H, Sq, D)
    lse = lse.masked_fill(empty, float("inf"))
    return out.transpose(1, 2), lse


def _cache_row(cache: torch.Tensor, p: AttnParams, i: int, end: int) -> torch.Tensor:
    """Keys (or values) 0..end of batch row ``i`` of a kv cache as a (1, end, Hk, D) tensor: the cache row
    ``kv_batch_idx[i]``, or the pages of ``block_table[i]``."""
    if p.block_table is not None:
        pages = p.block_table[i, : -(-end // p.page_size)].long()
        return cache[pages].reshape(1, -1, *cache.shape[2:])[:, :end]
    row = i if p.kv_batch_idx is None else int(p.kv_batch_idx[i])
    return cache[row : row + 1, :end]


def _reference(q, k, v, p: AttnParams):
    """Dense or packed reference with the same (out, lse) layouts as the kernels."""
    prefix_list = None if p.prefix is None else [int(x) for x in p.prefix.tolist()]
    if p.cu_seqlens_q is None:
        if p.seqused_k is None and p.block_table is None and p.kv_batch_idx is None and p.leftpad is None:
            return _reference_dense(q, k, v, p, 0, prefix_list, q.shape[2])
        used = p.seqused_k.tolist() if p.seqused_k is not None else [k.shape[1]] * q.shape[0]
        outs, lses = [], []
        for i, end in enumerate(used):
            start = 0 if p.leftpad is None else int(p.leftpad[i])
            ki, vi = _cache_row(k, p, i, end)[:, start:], _cache_row(v, p, i, end)[:, start:]
            o, lse = _reference_dense(q[i : i + 1], ki, vi, p, i,
                                      None if prefix_list is None else prefix_list[i : i + 1], q.shape[2])
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
    cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        if p.block_table is not None:
            ki, vi = _cache_row(k, p, i, ck[i + 1] - ck[i]), _cache_row(v, p, i, ck[i + 1] - ck[i])
        else:
            ki, vi = k[None, ck[i] : ck[i + 1]], v[None, ck[i] : ck[i + 1]]
        o, lse = _reference_dense(q[None, cq[i] : cq[i + 1]], ki, vi,
                                  p, i, None if prefix_list is None else prefix_list[i : i + 1], q.shape[1])
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)  # (T, H, D), (H, T)


def _probs_reference(q, k, v, p: AttnParams) -> torch.Tensor:
    """flash-attn's ``S_dmask`` for ``return_attn_probs``: (B, H, Sq, Sk) softmax probabilities in q's dtype,
    0 where masked, negated where dropout dropped the entry (varlen: (B, H, max_seqlen_q, max_seqlen_k),
    each sequence top-left). Materialises the scores: O(B·H·Sq·Sk) memory and one extra pass."""
    with torch.no_grad():
        if p.cu_seqlens_q is None:
            seqs = [(q[i : i + 1], k[i : i + 1]) for i in range(q.shape[0])]
        else:
            cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
            seqs = [(q[None, cq[i] : cq[i + 1]], k[None, ck[i] : ck[i + 1]]) for i in range(len(cq) - 1)]
        h = q.shape[-2]
        probs = q.new_zeros((len(seqs), h, p.max_seqlen_q, p.max_seqlen_k))
        prefix_list = None if p.prefix is None else [int(x) for x in p.prefix.tolist()]
        for i, (qi, ki) in enumerate(seqs):
            sq, sk = qi.shape[1], ki.shape[1]
            kk = ki.repeat_interleave(h // ki.shape[2], dim=2)
            s = torch.einsum("bqhd,bkhd->bhqk", qi, kk)
            s = s.to(torch.promote_types(s.dtype, torch.float32)) * p.scale
            if p.softcap > 0:
                s = p.softcap * torch.tanh(s / p.softcap)
            if p.alibi is not None:
                s = s + alibi_bias_reference(p.alibi[i : i + 1], sq, sk).to(s.dtype)
            pre = None if prefix_list is None else min(prefix_list[i], sk)
            vis = visible_reference(sq, sk, p.window_left, p.window_right, p.band, pre, q.device)
            s = s.masked_fill(~vis, float("-inf"))
            lse = torch.logsumexp(s, -1, keepdim=True)
            prob = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))
            if p.dropout_p > 0:
                bh = i * h + torch.arange(h, device=q.device)
                keep = dropout_keep_reference(p.seed, bh, sq, sk, p.dropout_p, q.device)[None]
                prob = torch.where(keep, prob, -prob)
            probs[i, :, :sq, :sk] = prob[0].to(q.dtype)
        return probs


def attention_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        prefix_len=None, dropout_p=0.0, dropout_seed=0, return_lse=False, alibi_slopes=None):
    """Plain-PyTorch attention over (B, S, H, D) tensors with every mask of :func:`flash_attn_func`.

    Computes in the inputs' dtype (scores upcast to fp32 for the softmax, as eager attention does);
    pass fp64 tensors for an oracle."""
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                q.shape[1], k.shape[1], _prefix_tensor(prefix_len, q.shape[0], q.device, "prefix_len"),
                alibi=_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device))
    out, lse = _reference(q, k, v, p)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- backends and dispatch
def _seq_bucket(n: int) -> str:
    for limit, name in ((256, "s256"), (512, "s512"), (1024, "s1k"), (2048, "s2k"), (4096, "s4k")):
        if n <= limit:
            return name
    return "long"


def shape_class(facts: Facts) -> str:
    """The preference table's row for a call: ``<mask>/<length bucket>/<train|infer>``."""
    f = facts.extra
    sq, sk = f.get("seqlen_q", 0), f.get("seqlen_k", 0)
    if f.get("kvcache") or f.get("paged"):
        return f"decode/{_seq_bucket(sk)}/infer"
    mask = ("varlen-" if f.get("varlen") else "") + f.get("mask", "full")
    return f"{mask}/{_seq_bucket(max(sq, sk))}/{'train' if f.get('grad') else 'infer'}"


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32,
                 {"head_dim": 64, "heads": 12, "kv_heads": 12, "batch": 256, "seqlen_q": 197, "seqlen_k": 197,
                  "mask": "full", "grad": True})


def _supports(backend: str, facts: Facts) -> list[str]:
    d = facts.extra.get("head_dim")
    if d is not None and not 1 <= d <= MAX_HEAD_DIM:
        return [f"head dim {d} is outside 1..{MAX_HEAD_DIM}"]
    return []


_B = "mmfast.ops.backends"
ATTENTION_OP = register(Op("flash_attention", supports=_supports, example=_example, shape_class=shape_class,
                           device_order={"cpu": ("triton_interpret", "reference")}))
ATTENTION_OP.add("triton", f"{_B}.attention_triton:TRITON")
ATTENTION_OP.add("triton_interpret", f"{_B}.attention_triton:INTERPRET")
ATTENTION_OP.add("flash_attn", f"{_B}.attention_flash_attn:FLASH_ATTN")
ATTENTION_OP.add("sdpa_cudnn", f"{_B}.attention_sdpa:CUDNN")
ATTENTION_OP.add("sdpa_flash", f"{_B}.attention_sdpa:FLASH")
ATTENTION_OP.add("sdpa_efficient", f"{_B}.attention_sdpa:EFFICIENT")
ATTENTION_OP.add("flex", f"{_B}.attention_flex:FLEX")
ATTENTION_OP.add("sdpa_math", f"{_B}.attention_sdpa:MATH")
ATTENTION_OP.add("reference", Backend(devices=None, forward=lambda q, k, v, p, need_lse=False: _reference(q, k, v, p),
                                      dtypes=_REFERENCE_DTYPES, doc="plain PyTorch, S×S scores"))


def _facts(q, k, p: AttnParams, need_lse: bool, grad: bool) -> Facts:
    """The call as the backends see it (see the module docstring for the keys)."""
    big = p.max_seqlen_q + p.max_seqlen_k + 1
    wl, wr = p.window_left, p.window_right
    if not p.band:
        mask = "full"
    elif p.prefix is not None:
        mask = "prefix"
    elif wr == 0 and wl >= big:
        mask = "causal"
    else:
        mask = "window"
    packed = p.cu_seqlens_q is not None
    kvcache = p.seqused_k is not None or p.leftpad is not None or p.kv_batch_idx is not None
    # A query row sees no key when the band ends before key 0 (bottom-right alignment, Sq > Sk + wr),
    # unless a prefix block covers it; per-sequence lengths (varlen, caches) are not inspected here.
    empty = p.band and p.prefix is None and not packed and p.max_seqlen_k - p.max_seqlen_q + min(wr, big) < 0
    return Facts(q.device.type, q.dtype, {
        "head_dim": q.shape[-1], "heads": q.shape[-2], "kv_heads": k.shape[-2],
        "batch": (p.cu_seqlens_q.shape[0] - 1) if packed else q.shape[0],
        "seqlen_q": p.max_seqlen_q, "seqlen_k": p.max_seqlen_k, "mask": mask,
        "softcap": p.softcap > 0, "alibi": p.alibi is not None, "dropout": p.dropout_p > 0, "varlen": packed,
        "kvcache": kvcache, "paged": p.block_table is not None, "need_lse": bool(need_lse), "grad": bool(grad),
        "empty_rows": bool(empty or p.max_seqlen_k == 0),
    })


class _FlashAttnFn(torch.autograd.Function):
    """(out, lse) through an explicit-backward backend; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, p, be):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse, saved = be.forward(q, k, v, p)
        ctx.save_for_backward(q, k, v, out, *saved)
        ctx.p = p
        ctx.be = be
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, *saved = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = ctx.be.backward(dout, q, k, v, out, tuple(saved), ctx.p)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, packed: bool, paged: bool = False, names=("q", "k", "v")):
    """q is (B, S, H, D), or (T, H, D) when ``packed``; k/v are like q, or 4-D caches/pages when ``paged``."""
    q_dims = 3 if packed else 4
    layouts = {3: "(total, heads, headdim)", 4: "(batch, seqlen, heads, headdim)"}
    kv_dims = 4 if paged else q_dims
    for name, t, dims in zip(names, (q, k, v), (q_dims, kv_dims, kv_dims)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layouts[dims]}, got shape {tuple(t.shape)}")
        if t.dtype not in _REFERENCE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32 "
                            "(float64 with backend='reference')")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but {names[0]} is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} shape {tuple(k.shape)} != {names[2]} shape {tuple(v.shape)}")
    if not packed and not paged and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != {names[1]} head dim {k.shape[-1]}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} is outside 1..{MAX_HEAD_DIM}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk:
        raise ValueError(f"k/v heads ({hk}) must divide q heads ({h}) for GQA/MQA")


def _prefix_tensor(prefix, batch: int, device, name: str) -> torch.Tensor | None:
    if prefix is None:
        return None
    if isinstance(prefix, int):
        if prefix < 0:
            raise ValueError(f"{name} must be >= 0, got {prefix}")
        return torch.full((batch,), prefix, dtype=torch.int32, device=device)
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 1 or prefix.numel() != batch:
        raise ValueError(f"{name} must be an int or a 1-D tensor of {batch} lengths, got {prefix!r}")
    if prefix.dtype.is_floating_point or (prefix < 0).any():
        raise ValueError(f"{name} must hold non-negative integers")
    return prefix.to(device=device, dtype=torch.int32)


def _alibi(slopes, batch: int, heads: int, device) -> torch.Tensor | None:
    """ALiBi slopes as a contiguous fp32 (batch, heads) tensor; flash-attn takes (heads,) or (batch, heads)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor of shape ({heads},) or ({batch}, {heads}), "
                        f"got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as flash-attn requires), got {slopes.dtype}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (nheads = {heads}), "
                         f"got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device}, expected {device}")
    return slopes.expand(batch, heads).contiguous()


def _params(q, k, scale, causal, window_size, softcap, dropout_p, seed, max_q, max_k, prefix, **seq) -> AttnParams:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if float(softcap) < 0:
        raise ValueError(f"softcap must be >= 0 (0: off), got {softcap}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    band, wl, wr = _resolve_window(window_size, bool(causal), prefix is not None, int(max_q) + int(max_k) + 1)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return AttnParams(scale, band, wl, wr, float(softcap), float(dropout_p), int(seed or 0),
                      int(max_q), int(max_k), prefix=prefix, **seq)


def _backend(q, k, p: AttnParams, backend, need_lse: bool, grad: bool):
    check_backend_name(backend)
    return ATTENTION_OP.backend(ATTENTION_OP.select(_facts(q, k, p, need_lse, grad), backend))


def _run(q, k, v, p: AttnParams, backend, need_lse: bool = True):
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    be = _backend(q, k, p, backend, need_lse, grad)
    if be.backward is AUTOGRAD:  # AUTOGRAD backends: differentiable as they are
        return be.forward(q, k, v, p, need_lse)
    return _FlashAttnFn.apply(q, k, v, p, be)


# --------------------------------------------------------------------------- public API
# flash-attn 2.8's functions, parameter for parameter and default for default; mmfast's own parameters
# (prefix_len(s), dropout_seed, backend, return_lse) are keyword-only, after flash-attn's.
#
# ``deterministic`` is accepted and always holds: the backward has no atomics (dk/dv and dq are each
# reduced by one program in a fixed order), so two backward passes are bitwise equal whatever the flag.
#
# ``return_attn_probs=True`` returns (out, softmax_lse, S_dmask) as flash-attn does. S_dmask follows
# flash-attn: an empty tensor unless dropout_p > 0; with dropout it is the (batch, nheads, seqlen_q,
# seqlen_k) softmax probabilities in q's dtype, 0 where masked and negated where dropout dropped the entry
# (flash-attn: "negative means dropped"; ours are normalised, flash-attn's are "possibly with different
# scaling" and padded to multiples of 128). It is computed by a second, plain-PyTorch pass that
# materialises the scores: O(batch·nheads·seqlen_q·seqlen_k) memory and time, for tests only.
def _finish(q, k, v, p: AttnParams, backend, return_attn_probs: bool, return_lse: bool, forward_only=False):
    need_lse = return_lse or return_attn_probs
    if forward_only:
        out, lse = _run_forward_only(q, k, v, p, backend, need_lse)
    else:
        out, lse = _run(q, k, v, p, backend, need_lse)
    if return_attn_probs:
        s_dmask = _probs_reference(q.detach(), k.detach(), v, p) if p.dropout_p > 0 else q.new_empty((0,))
        return out, lse, s_dmask
    return (out, lse) if return_lse else out


def _run_forward_only(q, k, v, p: AttnParams, backend, need_lse: bool = True):
    """(out, lse) without autograd (paged k/v, kv cache)."""
    be = _backend(q, k, p, backend, need_lse, False)
    with torch.no_grad():
        if be.backward is AUTOGRAD:
            return be.forward(q, k, v, p, need_lse)
        q = q if q.stride(-1) == 1 else q.contiguous()
        out, lse, _saved = be.forward(q, k, v, p)
        return out, lse


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, prefix_len=None,
                    dropout_seed=None, backend=None, return_lse=False):
    """flash-attn's ``flash_attn_func``: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k,
    headdim) with nheads_k dividing nheads (GQA/MQA). Returns out like q; with ``return_attn_probs`` also the
    fp32 (batch, nheads, seqlen_q) log-sum-exp and S_dmask (see above).

    ``alibi_slopes``: fp32 (nheads,) or (batch, nheads); adds -slope·|i + seqlen_k - seqlen_q - j| to the
    score of query i and key j. mmfast extensions: ``prefix_len`` (int or (batch,) tensor, the prefix-LM
    mask), ``dropout_seed``, ``backend``, ``return_lse`` (returns (out, lse)); fp32 inputs are computed in
    full fp32."""
    _check_qkv(q, k, v, packed=False)
    prefix = _prefix_tensor(prefix_len, q.shape[0], q.device, "prefix_len")
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                q.shape[1], k.shape[1], prefix, alibi=_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device))
    return _finish(q, k, v, p, backend, return_attn_probs, return_lse)


def _unpack(t, name: str, dims: int, n: int, axis: int, layout: str):
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[axis] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {dims}-D {layout}, got {shape}")
    return t.unbind(axis)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              prefix_len=None, dropout_seed=None, backend=None, return_lse=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim)."""
    q, k, v = _unpack(qkv, "qkv", 5, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, prefix_len=prefix_len, dropout_seed=dropout_seed,
                           backend=backend, return_lse=return_lse)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             prefix_len=None, dropout_seed=None, backend=None, return_lse=False):
    """flash-attn's ``flash_attn_kvpacked_func``: q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k,
    2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 5, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, prefix_len=prefix_len, dropout_seed=dropout_seed,
                           backend=backend, return_lse=return_lse)


def _check_cu(cu, name: str, total: int | None, device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor (batch+1,) of offsets, got {cu!r}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, expected {device}")
    if int(cu[0]) != 0 or (total is not None and int(cu[-1]) != total) or (cu[1:] < cu[:-1]).any():
        to = "" if total is None else f" to {total} (the packed length)"
        raise ValueError(f"{name} must rise from 0{to}, got {cu.tolist()}")
    return cu.to(torch.int32)


def _check_block_table(block_table, batch: int, num_pages: int, page_size: int, starts, ends, device):
    """The block table as contiguous int32 after checking its shape, capacity and the pages in use."""
    if (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype.is_floating_point
            or block_table.dtype == torch.bool):
        raise ValueError("block_table must be a 2-D integer tensor (batch, max_num_blocks_per_seq), got "
                         f"{tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table!r}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but the batch has {batch} sequences")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device}, expected {device}")
    capacity = block_table.shape[1] * page_size
    top = int(ends.max()) if ends.numel() else 0
    if top > capacity:
        raise ValueError(f"block_table has room for {capacity} tokens per sequence ({block_table.shape[1]} pages "
                         f"of {page_size}) but a sequence needs {top}")
    j = torch.arange(block_table.shape[1], device=device)[None]
    used = (j * page_size < ends[:, None]) & ((j + 1) * page_size > starts[:, None])
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        row, col = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{row}, {col}] = {int(block_table[row, col])} is not a page index in "
                         f"0..{num_pages - 1} (the k/v caches hold {num_pages} pages)")
    return block_table.to(torch.int32).contiguous()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, prefix_lens=None,
                           dropout_seed=None, backend=None, return_lse=False):
    """flash-attn's ``flash_attn_varlen_func`` over packed sequences: q (total_q, nheads, headdim), k/v
    (total_k, nheads_k, headdim); sequence i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``. lse is (nheads,
    total_q) fp32. With ``block_table`` (batch, max_pages) k/v are paged caches (num_pages, page_size,
    nheads_k, headdim), sequence i's keys being the first ``cu_seqlens_k[i+1] - cu_seqlens_k[i]`` slots of its
    pages (forward only, as flash-attn). ``prefix_lens``: (batch,) prefix-LM lengths (mmfast)."""
    paged = block_table is not None
    _check_qkv(q, k, v, packed=True, paged=paged)
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    cu_k = _check_cu(cu_seqlens_k, "cu_seqlens_k", None if paged else k.shape[0], q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}")
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    if int(lens_q.max()) > int(max_seqlen_q) or int(lens_k.max()) > int(max_seqlen_k):
        raise ValueError(f"max_seqlen_q/k ({max_seqlen_q}, {max_seqlen_k}) are below the longest sequences "
                         f"({int(lens_q.max())}, {int(lens_k.max())})")
    batch = cu_q.numel() - 1
    extra = {}
    if paged:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("flash_attn_varlen_func with block_table is forward only (as flash-attn's); run it "
                             "under torch.no_grad() or detach q/k/v")
        extra = {"block_table": _check_block_table(block_table, batch, k.shape[0], k.shape[1],
                                                   torch.zeros_like(lens_k), lens_k, q.device),
                 "page_size": k.shape[1]}
    prefix = _prefix_tensor(prefix_lens, batch, q.device, "prefix_lens")
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                max_seqlen_q, max_seqlen_k, prefix, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                alibi=_alibi(alibi_slopes, batch, q.shape[1], q.device), **extra)
    return _finish(q, k, v, p, backend, return_attn_probs, return_lse, forward_only=paged)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, prefix_lens=None, dropout_seed=None, backend=None,
                                     return_lse=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim)."""
    q, k, v = _unpack(qkv, "qkv", 4, 3, 1, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  prefix_lens=prefix_lens, dropout_seed=dropout_seed, backend=backend,
                                  return_lse=return_lse)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    prefix_lens=None, dropout_seed=None, backend=None, return_lse=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, nheads, headdim), kv (total_k, 2, nheads_k,
    headdim)."""
    k, v = _unpack(kv, "kv", 4, 2, 1, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, prefix_lens=prefix_lens, dropout_seed=dropout_seed,
                                  backend=backend, return_lse=return_lse)


# --------------------------------------------------------------------------- kv cache
def _index_vector(t, name: str, batch: int, device) -> torch.Tensor | None:
    """A (batch,) non-negative integer tensor as int32, or None."""
    if t is None:
        return None
    if (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != batch or t.dtype.is_floating_point
            or t.dtype == torch.bool):
        raise ValueError(f"{name} must be a ({batch},) integer tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
    return t.to(torch.int32)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                           interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first ``2·cos.shape[1]`` channels of x (B, S, H, D) at positions pos (B, S),
    in fp32, as flash-attn applies it: interleaved pairs (0, 1), (2, 3), … or GPT-NeoX halves
    (i, i + rotary_dim/2)."""
    rd = 2 * cos.shape[1]
    c = cos.float()[pos][:, :, None, :]  # (B, S, 1, rd/2)
    s = sin.float()[pos][:, :, None, :]
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, backend=None):
    """flash-attn's ``flash_attn_with_kvcache`` (forward only, no autograd).

    q (batch, seqlen_q, nheads, headdim). k_cache/v_cache (batch_cache, seqlen_cache, nheads_k, headdim), or
    with ``block_table`` (batch, max_pages) int32 a paged cache (num_pages, page_size, nheads_k, headdim)
    whose row b holds logical position t in page ``block_table[b, t // page_size]`` (any page size; flash-attn
    requires multiples of 256). ``cache_seqlens``: int or (batch,) int32, each row's length before this call
    (None: the whole cache). New k/v (batch, seqlen_new, nheads_k, headdim) are written in place at
    positions cache_seqlens… (after rotary on k), then q attends over keys ``cache_leftpad[b]`` (default 0)
    to ``cache_seqlens[b] + seqlen_new``, with the mask aligned to that range's end. ``cache_batch_idx``
    picks the cache row of each batch row. ``rotary_cos/sin`` (seqlen_ro, rotary_dim / 2): rotate the new
    k at positions cache_seqlens + i and q at cache_seqlens + i when causal or local, else all at
    cache_seqlens. ``num_splits`` is accepted and ignored (no split-K: one program per query block and head
    walks all the row's keys). Returns out, or (out, softmax_lse (batch, nheads, seqlen_q) fp32)."""
    paged = block_table is not None
    _check_qkv(q, k_cache, v_cache, packed=False, paged=True, names=("q", "k_cache", "v_cache"))
    b, sq, h, d = q.shape
    hk = k_cache.shape[2]
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: heuristic), got {num_splits!r}")
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: the block table maps each "
                             "batch row to its pages")
        page_size = k_cache.shape[1]
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError("block_table must be a 2-D integer tensor (batch, max_num_blocks_per_seq), got "
                             f"{tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table!r}")
        capacity = block_table.shape[1] * page_size
        batch_idx = None
    else:
        capacity = k_cache.shape[1]
        batch_idx = _index_vector(cache_batch_idx, "cache_batch_idx", b, dev)
        if batch_idx is None and k_cache.shape[0] != b:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has batch {b}; pass cache_batch_idx to "
                             "pick cache rows")
        if batch_idx is not None and bool((batch_idx >= k_cache.shape[0]).any()):
            raise ValueError(f"cache_batch_idx must index the {k_cache.shape[0]} cache rows, got {batch_idx.tolist()}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v to append, or neither")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required to append k/v (None means the whole cache is in use)")
        lens = torch.full((b,), capacity, dtype=torch.int32, device=dev)
        top = capacity
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        lens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=dev)
        top = cache_seqlens
    else:
        lens = _index_vector(cache_seqlens, "cache_seqlens", b, dev)
        # The longest row, read on the host once per call (a device sync on a GPU); an int length needs none.
        top = int(lens.max())
    snew = 0
    if k is not None:
        if (k.shape != v.shape or k.dim() != 4 or k.shape[0] != b or k.shape[2:] != k_cache.shape[2:]
                or k.dtype != k_cache.dtype):
            raise ValueError(f"k/v must be {k_cache.dtype} (batch, seqlen_new, {hk}, {k_cache.shape[3]}) with batch "
                             f"{b}, got {k.dtype} {tuple(k.shape)} and {v.dtype} {tuple(v.shape)}")
        snew = k.shape[1]
    if not paged:
        if snew and top + snew > capacity:
            raise ValueError(f"appending {snew} tokens to cache lengths up to {top} overflows "
                             f"the cache capacity {capacity}")
        if top > capacity:
            raise ValueError(f"cache_seqlens up to {top} exceed the cache capacity {capacity}")
    ends = lens + snew
    leftpad = _index_vector(cache_leftpad, "cache_leftpad", b, dev)
    if leftpad is not None and bool((leftpad > lens).any()):
        raise ValueError(f"cache_leftpad ({leftpad.tolist()}) must not exceed cache_seqlens ({lens.tolist()})")
    table = None
    if paged:
        starts = torch.zeros_like(lens) if leftpad is None else leftpad
        table = _check_block_table(block_table, b, k_cache.shape[0], page_size, starts, ends, dev)
    wl, wr = _window_pair(window_size)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new keys: pass k and v as well (as flash-attn)")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or not 0 < 2 * rotary_cos.shape[1] <= d:
            raise ValueError(f"rotary_cos/rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= {d}, "
                             f"got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        base = lens.long()[:, None]
        if causal or (wl, wr) != (-1, -1):
            q_pos = base + torch.arange(sq, device=dev)
        else:
            q_pos = base.expand(b, sq)
        k_pos = base + torch.arange(snew, device=dev)
        need = max(int(q_pos.max()), int(k_pos.max())) + 1
        if need > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but position {need - 1} "
                             "is needed (cache_seqlens + seqlen)")
        q = apply_rotary_reference(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        k = apply_rotary_reference(k, rotary_cos, rotary_sin, k_pos, rotary_interleaved)
    with torch.no_grad():
        if k is not None:
            pos = lens.long()[:, None] + torch.arange(snew, device=dev)  # (B, Snew)
            if paged:
                page = table.long().gather(1, pos // page_size)
                slot = pos % page_size
                k_cache[page, slot] = k
                v_cache[page, slot] = v
            else:
                rows = (torch.arange(b, device=dev) if batch_idx is None else batch_idx.long())[:, None]
                rows = rows.expand_as(pos)
                k_cache[rows, pos] = k
                v_cache[rows, pos] = v
        p = _params(q, k_cache, softmax_scale, causal, (wl, wr), softcap, 0.0, 0, sq, capacity, None,
                    seqused_k=ends, alibi=_alibi(alibi_slopes, b, h, dev), kv_batch_idx=batch_idx,
                    leftpad=leftpad, block_table=table, page_size=page_size if paged else 0)
        out, lse = _run_forward_only(q, k_cache, v_cache, p, backend, return_softmax_lse)
    return (out, lse) if return_softmax_lse else out


# --------------------------------------------------------------------------- `mmfast info --explain attention`
def explain_facts(argv: list[str]):
    """Parse ``mmfast info --explain attention`` options into (Facts, op name, fake machine facts)."""
    import argparse
    from types import SimpleNamespace

    ap = argparse.ArgumentParser(prog="mmfast info --explain attention",
                                 description="Which attention backend auto picks for one call, and why.")
    ap.add_argument("--shape", required=True, help="B,S,H,D (batch, seqlen, heads, head dim)")
    ap.add_argument("--seqlen-k", type=int, help="keys per row (default: S)")
    ap.add_argument("--kv-heads", type=int, help="k/v heads (GQA; default: H)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--window", help="L,R (-1: unbounded)")
    ap.add_argument("--prefix", type=int, help="prefix-LM length (implies causal)")
    ap.add_argument("--softcap", type=float, default=0.0)
    ap.add_argument("--alibi", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--varlen", action="store_true", help="packed sequences (cu_seqlens)")
    ap.add_argument("--kvcache", action="store_true", help="flash_attn_with_kvcache (per-row lengths)")
    ap.add_argument("--paged", action="store_true", help="paged k/v (block_table)")
    ap.add_argument("--lse", action="store_true", help="the call returns the log-sum-exp")
    ap.add_argument("--no-grad", action="store_true", help="inference (no backward)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) | float16 | float32")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when --family is given)")
    ap.add_argument("--family", help="explain as on a CUDA card of this family (sm90, sm80, ...), "
                                     "whatever this machine has")
    a = ap.parse_args(argv)
    try:
        b, sq, h, d = (int(x) for x in a.shape.replace("x", ",").split(","))
    except ValueError:
        ap.error(f"--shape must be B,S,H,D, got {a.shape!r}")
    device = a.device or ("cuda" if a.family else "cpu")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device == "cuda" else "float32"))
    sk = a.seqlen_k or sq
    hk = a.kv_heads or h
    q = SimpleNamespace(device=SimpleNamespace(type=device), dtype=dtype, shape=(b, sq, h, d))
    k = SimpleNamespace(shape=(b, sk, hk, d))
    window = tuple(int(x) for x in a.window.split(",")) if a.window else (-1, -1)
    prefix = torch.full((b,), a.prefix, dtype=torch.int32) if a.prefix is not None else None
    extra = {}
    if a.varlen:
        cu = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
        extra.update(cu_seqlens_q=cu, cu_seqlens_k=torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32))
    if a.kvcache or a.paged:
        extra["seqused_k"] = torch.full((b,), sk, dtype=torch.int32)
    if a.paged:
        extra.update(block_table=torch.zeros((b, 1), dtype=torch.int32), page_size=sk)
    if a.alibi:
        extra["alibi"] = torch.zeros((b, h))
    p = _params(q, k, None, a.causal, window, a.softcap, a.dropout, 0, sq, sk, prefix, **extra)
    facts = _facts(q, k, p, a.lse, not a.no_grad)
    fake = {"cuda_available": True, "arch": a.family} if a.family else {}
    return facts, ATTENTION_OP.name, fake


__all__ = [
    "AttnParams",
    "alibi_bias_reference",
    "apply_rotary_reference",
    "attention_reference",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
