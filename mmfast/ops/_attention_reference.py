"""The attention oracle: a call's parameters (:class:`AttnParams`) and plain-PyTorch references for every
feature of :mod:`mmfast.ops.attention` (masks, ALiBi, softcap, dropout, paged caches, rotary). The
``reference`` backend runs these; the tests compare every other backend with them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
        """A zero int32 (1,) tensor standing for an absent index tensor; one per device, kept (not one
        allocation per call), except one made while a CUDA graph captures (its zeros are not written yet)."""
        d = _DUMMIES.get(device)
        if d is None:
            d = torch.zeros(1, dtype=torch.int32, device=device)
            if not (d.is_cuda and torch.cuda.is_current_stream_capturing()):
                _DUMMIES[device] = d
        return d


_DUMMIES: dict = {}


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


def cache_rows_dense(q, k_cache, v_cache, p: AttnParams):
    """A kv-cache call's keys and values as dense (B, Smax, Hk, D) tensors and the visible keys (B, Sq, Smax):
    row b's keys ``leftpad[b]`` to ``seqused_k[b]`` (through its pages of ``block_table`` or its cache row
    ``kv_batch_idx[b]``), the mask aligned bottom-right to the row's range as in :func:`visible_reference`
    (no prefix)."""
    b, sq = q.shape[:2]
    dev = q.device
    ends = p.seqused_k.long() if p.seqused_k is not None else torch.full((b,), k_cache.shape[1], device=dev)
    starts = p.leftpad.long() if p.leftpad is not None else torch.zeros_like(ends)
    smax = max(int(ends.max()), 1)
    j = torch.arange(smax, device=dev)  # (Smax,) absolute key slot
    if p.block_table is not None:
        n_pages = min(-(-smax // p.page_size), p.block_table.shape[1])
        pages = p.block_table[:, :n_pages].long()  # (B, n_pages): one gather of whole pages per row
        k = k_cache[pages].flatten(1, 2)[:, :smax]  # (B, Smax, Hk, D)
        v = v_cache[pages].flatten(1, 2)[:, :smax]
    else:
        rows = torch.arange(b, device=dev) if p.kv_batch_idx is None else p.kv_batch_idx.long()
        k, v = k_cache[rows, :smax], v_cache[rows, :smax]
    r = j[None, None, :] - starts[:, None, None]  # (B, 1, Smax): key rank within the row's range
    qa = torch.arange(sq, device=dev)[None, :, None] + (ends - starts - sq)[:, None, None]  # (B, Sq, 1)
    ok = (r >= 0) & (j[None, None, :] < ends[:, None, None])  # (B, 1, Smax)
    # Slots outside a row's range hold anything (NaN included): a zero probability times NaN is NaN.
    v = v.masked_fill(~ok[:, 0, :, None, None], 0.0)
    if p.band:
        ok = ok & (r >= qa - p.window_left) & (r <= qa + p.window_right)
    return k, v, ok.expand(b, sq, smax)


def _reference_cache_batched(q, k_cache, v_cache, p: AttnParams):
    """A kv-cache call (no prefix, ALiBi or dropout) for all rows at once: the same math as one
    :func:`_reference_dense` per row (which costs a Python iteration per row: decoding serves many)."""
    b, sq, h, d = q.shape
    k, v, ok = cache_rows_dense(q, k_cache, v_cache, p)
    hk = k.shape[2]
    g = h // hk  # query heads per kv head: head i reads kv head i // g
    qt = q.reshape(b, sq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, d)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hk, Smax, D)
    s = qt @ kt.transpose(-1, -2)  # (B, Hk, G·Sq, Smax)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * p.scale
    if p.softcap > 0:
        s = p.softcap * torch.tanh(s / p.softcap)
    s = s.masked_fill(~ok.repeat(1, g, 1)[:, None], float("-inf"))  # rows ordered (g, i)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hk, G·Sq)
    empty = torch.isinf(lse) & (lse < 0)
    prob = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    out = prob.to(q.dtype) @ vt  # (B, Hk, G·Sq, D)
    out = out.reshape(b, hk, g, sq, -1).permute(0, 3, 1, 2, 4).reshape(b, sq, h, -1)  # (B, Sq, H, D)
    lse = lse.masked_fill(empty, float("inf")).reshape(b, h, sq)  # (B, H, Sq)
    return out, lse


def _reference(q, k, v, p: AttnParams):
    """Dense or packed reference with the same (out, lse) layouts as the kernels."""
    prefix_list = None if p.prefix is None else [int(x) for x in p.prefix.tolist()]
    if p.cu_seqlens_q is None:
        if p.seqused_k is None and p.block_table is None and p.kv_batch_idx is None and p.leftpad is None:
            return _reference_dense(q, k, v, p, 0, prefix_list, q.shape[2])
        if p.prefix is None and p.alibi is None and p.dropout_p == 0:
            return _reference_cache_batched(q, k, v, p)
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
