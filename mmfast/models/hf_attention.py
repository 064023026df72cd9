"""mmfast flash attention as a transformers attention implementation: ``attn_implementation="mmfast"``.

    import mmfast.models.hf_attention as hfa
    hfa.register()                                   # once; idempotent
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mmfast")
    model.set_attn_implementation("mmfast")          # or switch an existing model

Two registrations (transformers 5.x): the attention function in ``AttentionInterface`` and a mask
function in ``AttentionMaskInterface``.

Masks. The mask function returns None only when the mask is the plain causal / bidirectional /
sliding-window pattern of the model with no padding and the keys are exactly the positions up to the
last query (no cache, a dynamic cache, a dynamic sliding-window cache); the attention then calls
:func:`flash_attn_func` with ``causal`` and the module's window. Every other case (padding, a static
cache whose keys include unwritten slots, chunked attention, packed sequences found from
``position_ids``, custom or/and mask functions) gets transformers' own boolean
``(batch, 1, q_len, kv_len)`` mask, exactly as ``"sdpa"`` would, and the attention computes exactly that
mask, by one of three paths:

* *varlen*: when the mask equals "each row (or each packed segment of a row) attends causally /
  bidirectionally (with the window) over its own valid tokens", the valid queries and keys are gathered
  and :func:`flash_attn_varlen_func` runs over them. Query rows that are padding come back as zeros
  (as transformers' flash-attention paths), every other row is exact. The decision is made once per
  mask tensor (a host read) and reused by every layer.
* *dense*: anything else (and always under ``torch.compile``, where the host read above would break
  the graph, and when attention weights are requested) is computed exactly in PyTorch: the scores
  materialised in fp32, the mask applied, a row with no visible key gives zeros. It costs
  O(batch·heads·q_len·kv_len) memory, like ``"eager"``. Float (additive) 4-D masks are added as a bias.
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments (transformers' ``DataCollatorWithFlattening``)
  go straight to :func:`flash_attn_varlen_func`.

Attention weights: when they are requested (``output_attentions=True`` or ``config.output_attentions``),
the dense path computes them and returns them as ``(batch, heads, q_len, kv_len)``, in the query's dtype.

Decoding: when the model kwarg ``mmfast_kv_cache`` holds an :class:`mmfast.models.kv_cache.MmfastKVCache`
(preallocated per-layer caches with per-row lengths), the attention appends the new keys/values to it and
attends through :func:`mmfast.ops.flash_attn_with_kvcache`; no padding mask is needed there.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from mmfast.ops.attention import flash_attn_func, flash_attn_varlen_func

NAME = "mmfast"
PREFIX_KWARG = "mmfast_prefix_len"  # model kwarg: (B,) prefix lengths of a prefix-LM mask
KV_CACHE_KWARG = "mmfast_kv_cache"  # model kwarg: an mmfast.models.kv_cache.MmfastKVCache
_BACKEND = {"value": None}  # backend forced process-wide by `register(backend=...)`
# Set by mmfast.patch(model, backend=...) on that model's modules: its choice wins over the process-wide one,
# so two models patched with different backends in one process each keep their own.
MODULE_BACKEND_ATTR = "_mmfast_attention_backend"
_QUERY_VALID_ATTR = "_mmfast_query_valid"  # (B, Sq) bool set on masks we build: which query rows are tokens
_PLANS_ATTR = "_mmfast_plans"  # per-mask cache of the path chosen for it
PATHS: collections.Counter = collections.Counter()  # calls per path ("full", "varlen", "cu_seqlens", "dense")


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


# --------------------------------------------------------------------------- mask function
def _mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, local_size=None, **kwargs):
    """transformers' mask interface: None for the plain aligned pattern without padding, else sdpa's
    boolean 4-D mask (with the query rows that are real tokens recorded on it)."""
    from transformers import masking_utils as mu

    config = kwargs.get("config")
    plain = mask_function in (None, mu.causal_mask_function, mu.bidirectional_mask_function)
    if not plain and local_size is not None and kwargs.get("allow_is_causal_skip", False) \
            and not kwargs.get("use_vmap", False) and config is not None \
            and local_size == getattr(config, "sliding_window", None) \
            and getattr(config, "attention_chunk_size", None) != local_size:
        plain = True  # create_sliding_window_causal_mask without packing / overlays
    compiling = _compiling()
    aligned = (isinstance(q_offset, int) or (not compiling and q_offset.dim() == 0)) and isinstance(kv_offset, int) \
        and int(kv_offset) + int(kv_length) == int(q_offset) + int(q_length)
    if plain and aligned and not compiling:
        if attention_mask is None:
            return None
        keys = attention_mask[:, kv_offset:kv_offset + kv_length] if attention_mask.shape[1] >= kv_offset + kv_length \
            else None
        if keys is not None and bool(keys.all()):
            return None
        if keys is not None:
            # (batch, kv_len) key padding with the queries the last q_len keys: the attention packs the valid
            # tokens in O(batch·kv_len), without a (q_len, kv_len) mask.
            return keys.bool()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")}
    mask = mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                        mask_function=mask_function or mu.causal_mask_function, attention_mask=attention_mask,
                        local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    if mask is not None and attention_mask is not None and not compiling:
        # Query i sits at absolute position q_offset + i of the 2-D (batch, positions) padding mask.
        start = int(q_offset)
        if attention_mask.shape[1] >= start + q_length:
            setattr(mask, _QUERY_VALID_ATTR, attention_mask[:, start:start + q_length].bool())
    return mask


# --------------------------------------------------------------------------- helpers
def _window(sliding_window) -> tuple[int, int]:
    # transformers: a sliding window of w tokens sees w - 1 keys back (and, bidirectional, forward).
    return (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)


def _band(qa: torch.Tensor, j: torch.Tensor, causal: bool, window) -> torch.Tensor:
    """The kernels' visibility of key rank j from aligned query position qa (no prefix)."""
    wl, wr = window
    ok = torch.ones(torch.broadcast_shapes(qa.shape, j.shape), dtype=torch.bool, device=qa.device)
    if wl >= 0:
        ok = ok & (j >= qa - wl)
    if causal:
        ok = ok & (j <= qa)
    elif wr >= 0:
        ok = ok & (j <= qa + wr)
    return ok


def _pattern(b: int, sq: int, sk: int, causal: bool, window, prefix, device) -> torch.Tensor:
    """(B, Sq, Sk) what flash_attn_func computes: bottom-right aligned band, plus the prefix block."""
    qa = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = _band(qa, j, causal, window).expand(b, sq, sk)
    if prefix is not None:
        p = prefix.to(device=device, dtype=torch.long)[:, None, None]
        ok = ok | ((qa[None] < p) & (j[None] < p))
    return ok


def _bool_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """A 4-D mask as booleans (B, Sq, Sk), or None when it is an additive float mask with values other than
    0 and "minus infinity" (a bias: only the dense path computes it)."""
    if mask.dtype == torch.bool:
        return mask[:, 0]
    low = torch.finfo(mask.dtype).min / 2
    m = mask[:, 0]
    if not bool(((m == 0) | (m <= low)).all()):
        return None
    return m == 0


def _varlen_plan(q_seq, k_seq, n_seq, causal, window, prefix, implied=True):
    """Gather layout of a varlen call where query (b, i) belongs to packed sequence ``q_seq[b, i]`` and key
    (b, j) to ``k_seq[b, j]`` (-1: left out); sequences appear in increasing order, row-major. Returns the
    plan and the (B, Sq, Sk) mask it computes."""
    dev = q_seq.device
    qf, kf = q_seq.reshape(-1), k_seq.reshape(-1)
    q_idx, k_idx = (qf >= 0).nonzero().squeeze(1), (kf >= 0).nonzero().squeeze(1)
    lens_q = torch.bincount(qf[q_idx], minlength=n_seq)[:n_seq]
    lens_k = torch.bincount(kf[k_idx], minlength=n_seq)[:n_seq]
    cu_q = F.pad(lens_q.cumsum(0), (1, 0))
    cu_k = F.pad(lens_k.cumsum(0), (1, 0))
    rank_q = torch.full_like(qf, -1)
    rank_k = torch.full_like(kf, -1)
    rank_q[q_idx] = torch.arange(q_idx.numel(), device=dev) - cu_q[qf[q_idx]]
    rank_k[k_idx] = torch.arange(k_idx.numel(), device=dev) - cu_k[kf[k_idx]]
    plan = {"kind": "varlen", "q_idx": q_idx, "k_idx": k_idx, "cu_q": cu_q.to(torch.int32),
            "cu_k": cu_k.to(torch.int32), "max_q": int(lens_q.max()) if n_seq else 0,
            "max_k": int(lens_k.max()) if n_seq else 0, "prefix": None if prefix is None else prefix.to(torch.int32)}
    if not implied:
        return plan, None
    rank_q, rank_k = rank_q.view_as(q_seq), rank_k.view_as(k_seq)
    qs = q_seq.clamp(min=0)
    qa = rank_q + (lens_k - lens_q)[qs]  # bottom-right alignment inside each sequence
    same = (q_seq[:, :, None] == k_seq[:, None, :]) & (q_seq >= 0)[:, :, None] & (k_seq >= 0)[:, None, :]
    vis = _band(qa[:, :, None], rank_k[:, None, :], causal, window)
    if prefix is not None:
        p = prefix.to(dev, torch.long)[qs][:, :, None]
        vis = vis | ((qa[:, :, None] < p) & (rank_k[:, None, :] < p))
    return plan, same & vis


def _segments(allowed: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Packed sequences / chunks in a causal mask with Sq == Sk and no padding: query i's first visible key
    starts its segment. Returns (seq id per position, number of sequences) or None."""
    b, s, _ = allowed.shape
    if not bool(allowed.any(-1).all()):
        return None
    first = allowed.to(torch.uint8).argmax(-1)  # (B, S)
    starts = first == torch.arange(s, device=allowed.device)
    seq = starts.reshape(-1).long().cumsum(0).view(b, s) - 1
    return seq, int(seq.max()) + 1


def _cached(t: torch.Tensor, key: tuple, make):
    """``make()`` once per (mask tensor, key): stored on the tensor (every layer of a forward shares the
    mask), keyed with its version counter so an in-place change is seen. Host reads: eager only."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor: no version counter (transformers builds a fresh mask per forward)
        version = None
    key = (*key, version)
    cache = getattr(t, _PLANS_ATTR, None)
    if cache is not None and key in cache:
        return cache[key]
    plan = make()
    try:
        setattr(t, _PLANS_ATTR, {**(cache or {}), key: plan})
    except (AttributeError, RuntimeError):
        pass
    return plan


def _prefix_key(prefix):
    return None if prefix is None else tuple(prefix.tolist())


def _plan(mask4, b, sq, sk, causal, window, prefix):
    """The path for this (mask, shapes, flags)."""
    return _cached(mask4, (sq, sk, causal, window, _prefix_key(prefix)),
                   lambda: _make_plan(mask4, b, sq, sk, causal, window, prefix))


def _plan_2d(keys, b, sq, sk, window, prefix):
    """(B, Sk) key padding, queries the last Sq keys: one varlen sequence per row over its valid tokens. Exact
    for causal and bidirectional masks whatever the holes; with a sliding window only when each row's valid
    tokens are one run (a window counts positions, the packed kernel counts tokens). None otherwise."""
    return _cached(keys, ("2d", sq, sk, window, _prefix_key(prefix)),
                   lambda: _make_plan_2d(keys, b, sq, sk, window, prefix))


def _make_plan_2d(keys, b, sq, sk, window, prefix):
    kv = keys.bool()
    runs = kv[:, :1].sum(1) + (kv[:, 1:] & ~kv[:, :-1]).sum(1)
    if sq <= sk and ((window[0] < 0 and window[1] < 0) or not bool((runs > 1).any())):
        rowid = torch.arange(b, device=kv.device)[:, None]
        return _varlen_plan(torch.where(kv[:, sk - sq:], rowid, -1), torch.where(kv, rowid, -1), b, False, window,
                            prefix, implied=False)[0]
    return None


def _make_plan(mask4, b, sq, sk, causal, window, prefix):
    allowed = _bool_mask(mask4)
    if allowed is None:
        return {"kind": "dense"}
    dev = allowed.device
    qvalid = getattr(mask4, _QUERY_VALID_ATTR, None)
    rows = allowed.any(-1)  # query rows that see something
    must = rows if qvalid is None else (rows & qvalid.to(dev))  # rows that must come out exact
    # 1. the pattern itself, no padding: flash_attn_func on the tensors as they are
    expect = _pattern(b, sq, sk, causal, window, prefix, dev)
    base = expect if prefix is None else _pattern(b, sq, sk, causal, window, None, dev)
    if torch.equal(expect, allowed | (expect & ~base)):  # the prefix block is ours to add
        return {"kind": "full"}
    # 2. one sequence per batch row over its valid keys (padding of any side, static caches)
    kv = allowed.any(1)  # (B, Sk) keys someone sees
    rowid = torch.arange(b, device=dev)[:, None]
    q_seq = torch.where(must, rowid, -1)
    k_seq = torch.where(kv, rowid, -1)
    plan, implied = _varlen_plan(q_seq, k_seq, b, causal, window, prefix)
    target = allowed | (implied & ~_varlen_plan(q_seq, k_seq, b, causal, window, None)[1])  # + prefix block
    if _agrees(implied, target, must):
        return plan
    # 3. packed sequences / chunks: segments of a causal mask
    if prefix is None and causal and sq == sk and qvalid is None:
        seg = _segments(allowed)
        if seg is not None:
            seq, n = seg
            plan, implied = _varlen_plan(seq, seq, n, causal, window, None)
            if _agrees(implied, allowed, must):
                return plan
    return {"kind": "dense"}


def _agrees(implied, target, must) -> bool:
    return not bool(((implied != target) & must[:, :, None]).any()) and not bool((implied & ~must[:, :, None]).any())


def _dense(q, k, v, allowed, bias, scale, softcap, dropout, want_weights):
    """Exact attention with the scores materialised: q (B, Sq, H, D), k/v (B, Sk, Hk, D); ``allowed``
    (B, Sq, Sk) bool or None, ``bias`` (B, 1, Sq, Sk) additive or None. Returns (out, weights or None)."""
    h, d = q.shape[2], q.shape[3]
    hk = k.shape[2]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=2)
        v = v.repeat_interleave(h // hk, dim=2)
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, S, D)
    s = (qt @ kt.transpose(-1, -2)) * (d ** -0.5 if scale is None else float(scale))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.float()
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros((), dtype=p.dtype, device=p.device), p)  # rows seeing no key
    weights = p.to(q.dtype) if want_weights else None
    if dropout:
        p = F.dropout(p, dropout, training=True)
    out = (p @ vt).transpose(1, 2).to(q.dtype)
    return out.contiguous(), weights


def _weights_requested(kwargs) -> bool:
    if kwargs.get("output_attentions", False):
        return True
    try:  # config.output_attentions / output_attentions=True reach the attention only through the collector
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _with_kv_cache(module, cache, q, k, v, attention_mask, causal, prefix, op_kwargs):
    # The cache (mmfast.models.kv_cache, which builds on this adapter) is known here by what it does.
    if not callable(getattr(cache, "attend", None)):
        raise TypeError(f"{KV_CACHE_KWARG} must be an mmfast.models.kv_cache.MmfastKVCache, got {type(cache).__name__}")
    if attention_mask is not None:
        # Rows of different lengths are per-row cache lengths here, never a padding mask.
        raise ValueError(f"mmfast attention with {KV_CACHE_KWARG} takes no attention_mask (got shape "
                         f"{tuple(attention_mask.shape)}): right-pad the prompts and set the cache's lengths")
    if op_kwargs["dropout_p"]:
        raise ValueError(f"{KV_CACHE_KWARG} is for inference; got attention dropout {op_kwargs['dropout_p']}")
    return cache.attend(module.layer_idx, q, k, v, causal=causal, softmax_scale=op_kwargs["softmax_scale"],
                        window_size=op_kwargs["window_size"], softcap=op_kwargs["softcap"],
                        prefix=prefix, backend=op_kwargs["backend"])


def _unpadded(q, k, v, plan, causal, op_kwargs):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = flash_attn_varlen_func(q.reshape(b * sq, h, d)[plan["q_idx"]], k.reshape(b * sk, hk, d)[plan["k_idx"]],
                                 v.reshape(b * sk, hk, d)[plan["k_idx"]], cu_seqlens_q=plan["cu_q"],
                                 cu_seqlens_k=plan["cu_k"], max_seqlen_q=plan["max_q"], max_seqlen_k=plan["max_k"],
                                 dropout_p=op_kwargs["dropout_p"], softmax_scale=op_kwargs["softmax_scale"],
                                 causal=causal, window_size=op_kwargs["window_size"], softcap=op_kwargs["softcap"],
                                 prefix_lens=plan["prefix"], backend=op_kwargs["backend"])  # (Tq, H, D)
    full = out.new_zeros(b * sq, h, d).index_copy(0, plan["q_idx"], out)
    return full.reshape(b, sq, h, d)


def _run_cu_seqlens(q, k, v, kwargs, causal, op_kwargs):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    max_q = kwargs.get("max_length_q")
    max_k = kwargs.get("max_length_k")
    max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
    max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
    out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d),
                                 cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                                 max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=op_kwargs["dropout_p"],
                                 softmax_scale=op_kwargs["softmax_scale"], causal=causal,
                                 window_size=op_kwargs["window_size"], softcap=op_kwargs["softcap"],
                                 backend=op_kwargs["backend"])
    return out.reshape(b, sq, h, d)


# --------------------------------------------------------------------------- attention function
def _module_backend(module) -> str | None:
    return vars(module).get(MODULE_BACKEND_ATTR) if module is not None else None


def mmfast_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, softcap=None, sliding_window=None, **kwargs):
    """transformers attention interface: query (B, H, Sq, D), key/value (B, Hk, Sk, D) → ((B, Sq, H, D),
    attention weights (B, H, Sq, Sk) when requested, else None)."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("attn_implementation='mmfast' takes no position_bias; use 'eager' or 'sdpa'")
    # A prefix-LM mask (LLaVA's bidirectional image tokens) arrives as a model kwarg, (B,) int32.
    prefix = kwargs.get(PREFIX_KWARG)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _window(sliding_window)
    softcap = float(softcap or 0.0)
    op_kwargs = {"dropout_p": float(dropout or 0.0), "softmax_scale": scaling, "window_size": window,
                 "softcap": softcap, "backend": _module_backend(module) or _BACKEND["value"]}
    kv_cache = kwargs.get(KV_CACHE_KWARG)
    if kv_cache is not None:
        return _with_kv_cache(module, kv_cache, q, k, v, attention_mask, causal, prefix, op_kwargs), None
    if prefix is not None and not isinstance(prefix, torch.Tensor):
        prefix = torch.full((b,), int(prefix), dtype=torch.int32, device=q.device)

    want_weights = _weights_requested(kwargs)
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # (B, kv_len) key padding, queries the last Sq positions
            if attention_mask.shape != (b, sk):
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match "
                                 f"(batch, kv_len) = ({b}, {sk})")
            plan2 = None if want_weights or _compiling() else _plan_2d(attention_mask, b, sq, sk, window, prefix)
            if plan2 is not None and kwargs.get("cu_seq_lens_q") is None:
                PATHS["varlen"] += 1
                return _unpadded(q, k, v, plan2, causal, op_kwargs), None
            keys = attention_mask.bool()
            mask4 = (_pattern(b, sq, sk, causal, window, None, q.device) & keys[:, None, :])[:, None]
            setattr(mask4, _QUERY_VALID_ATTR, keys[:, -sq:] if sq <= sk else None)
            attention_mask = mask4
        elif attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, b) \
                or attention_mask.shape[2] != sq or attention_mask.shape[3] < sk:
            raise ValueError(f"mmfast attention got an attention_mask of shape {tuple(attention_mask.shape)}; "
                             f"expected None, (batch, kv_len) or (batch, 1, q_len, >= kv_len) with batch={b}, "
                             f"q_len={sq}, kv_len={sk}")
        elif attention_mask.shape[3] > sk:  # as sdpa: the keys are the mask's first kv_len columns
            sliced = attention_mask[..., :sk]
            qv = getattr(attention_mask, _QUERY_VALID_ATTR, None)
            if qv is not None:
                setattr(sliced, _QUERY_VALID_ATTR, qv)
            attention_mask = sliced
        if attention_mask.shape[0] != b:
            qv = getattr(attention_mask, _QUERY_VALID_ATTR, None)
            attention_mask = attention_mask.expand(b, -1, -1, -1)
            if qv is not None:
                setattr(attention_mask, _QUERY_VALID_ATTR, qv.expand(b, -1))

    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None and not want_weights:
        if prefix is not None:
            raise ValueError(f"{PREFIX_KWARG} cannot be combined with cu_seq_lens_q/cu_seq_lens_k")
        PATHS["cu_seqlens"] += 1
        return _run_cu_seqlens(q, k, v, kwargs, causal, op_kwargs), None

    plan = {"kind": "full"} if attention_mask is None and not want_weights else None
    if plan is None and not want_weights and not _compiling():
        plan = _plan(attention_mask, b, sq, sk, causal, window, prefix)
    if not _compiling():
        PATHS[plan["kind"] if plan is not None else "dense"] += 1
    if plan is not None and plan["kind"] == "full":
        out = flash_attn_func(q, k, v, dropout_p=op_kwargs["dropout_p"], softmax_scale=scaling, causal=causal,
                              window_size=window, softcap=softcap, prefix_len=prefix, backend=op_kwargs["backend"])
        return out, None
    if plan is not None and plan["kind"] == "varlen":
        return _unpadded(q, k, v, plan, causal, op_kwargs), None

    # Dense: exact for any mask (and the attention weights).
    bias = None
    if attention_mask is None:
        allowed = _pattern(b, sq, sk, causal, window, prefix, q.device)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, 0]
    else:
        allowed, bias = None, attention_mask
    if prefix is not None and attention_mask is not None:
        if allowed is None:
            raise NotImplementedError(f"{PREFIX_KWARG} with an additive float attention_mask")
        allowed = allowed | _prefix_block(allowed, getattr(attention_mask, _QUERY_VALID_ATTR, None), prefix)
    out, weights = _dense(q, k, v, allowed, bias, scaling, softcap, op_kwargs["dropout_p"], want_weights)
    return out, weights


def _prefix_block(allowed, qvalid, prefix):
    """The prefix-LM block of the varlen path (per row, counted over the row's valid keys), as (B, Sq, Sk)."""
    kv = allowed.any(1)
    rank_k = kv.long().cumsum(1) - 1
    q_rows = allowed.any(-1) if qvalid is None else qvalid.to(allowed.device) & allowed.any(-1)
    n_q = q_rows.sum(1, keepdim=True)
    rank_q = q_rows.long().cumsum(1) - 1 + kv.sum(1, keepdim=True) - n_q
    p = prefix.to(allowed.device, torch.long)[:, None, None]
    return q_rows[:, :, None] & kv[:, None, :] & (rank_q[:, :, None] < p) & (rank_k[:, None, :] < p)


def register(backend: str | None = None) -> str:
    """Register ``"mmfast"`` with transformers (idempotent); returns the name. ``backend`` forces an mmfast
    backend for every model using it, except models patched with a backend of their own
    (``mmfast.patch(model, backend=...)``)."""
    from mmfast.ops._dispatch import check_backend_name

    check_backend_name(backend)
    _BACKEND["value"] = backend
    return register_interfaces()


def register_interfaces() -> str:
    """Register the ``"mmfast"`` attention and mask functions with transformers (idempotent), leaving the
    process-wide backend as it is; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, mmfast_attention_forward)
    AttentionMaskInterface.register(NAME, _mask_interface)
    return NAME


__all__ = ["KV_CACHE_KWARG", "MODULE_BACKEND_ATTR", "NAME", "PREFIX_KWARG", "mmfast_attention_forward", "register",
           "register_interfaces"]
