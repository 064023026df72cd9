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
``flex`` (FlexAttention with a block mask), ``flash_attn`` (the flash-attn package, when it imports),
``cpp`` (``flash_attn_with_kvcache`` on CPU through ``mmfast._C``: decode attention walking the block table,
no gather) and ``reference`` (plain PyTorch, any device; materialises the S×S scores). Each vendor backend refuses, with
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
sdpa_math, cpp, reference (on CPU: triton_interpret, cpp, reference, then the others; ``cpp`` takes
kv-cache calls only, measured faster there than the reference), so a vendor kernel runs by
default only where the table measured it faster or where mmfast's kernels cannot run. ``mmfast info --explain attention --shape B,S,H,D ...`` shows the choice.

Layout: this module holds the public functions (flash-attn's, the kv cache, ``attention_reference``);
:mod:`mmfast.ops._attention_call` the op's registration, the call's facts, argument checks and the
autograd glue; :mod:`mmfast.ops._attention_reference` :class:`AttnParams` and the plain-PyTorch oracle.
"""
from __future__ import annotations

import torch

from mmfast.ops._attention_call import (  # noqa: F401 - ATTENTION_OP and shape_class: the op, for dispatch users
    ATTENTION_OP,
    _alibi,
    _check_block_table,
    _check_cu,
    _check_qkv,
    _facts,
    _finish,
    _index_vector,
    _params,
    _prefix_tensor,
    _run_forward_only,
    _unpack,
    shape_class,
)
from mmfast.ops._attention_reference import (  # noqa: F401 - the references, public with the functions
    MAX_HEAD_DIM,
    AttnParams,
    _reference,
    _window_pair,
    alibi_bias_reference,
    apply_rotary_reference,
    dropout_keep_reference,
    visible_reference,
)


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
