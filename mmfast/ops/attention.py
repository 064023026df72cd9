"""Flash attention with flash-attn's interface, plus the masks multimodal models need.

Layout (batch, seqlen, heads, headdim), as flash-attn. For one head of one sequence, with
``qa = i + Sk - Sq`` (causal masks align bottom-right when Sq ≠ Sk):

    s_ij = scale · q_i·k_j                     softcap > 0:  s_ij = softcap · tanh(scale · q_i·k_j / softcap)
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

Backends: ``triton`` (CUDA), ``triton_interpret`` (the same kernels on CPU, tests), ``reference``
(plain PyTorch, any device; materialises the S×S scores).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from mmfast.ops._dispatch import Facts, Op, check_backend_name, eager_fast, register

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

    def dummy_int(self, device) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.int32, device=device)


def _resolve_window(window_size, causal: bool, prefix: bool, big: int) -> tuple[bool, int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    wl, wr = (int(w) for w in window_size)
    if wl < -1 or wr < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
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


def _reference_dense(q, k, v, p: AttnParams, batch_offset: int, prefix_list, n_heads_total: int):
    """(B, Sq, H, D) attention by materialising the scores; returns (out, lse (B, H, Sq) fp32)."""
    b, sq, h, _d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=2)
        v = v.repeat_interleave(h // hk, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    s = (qt @ kt.transpose(-1, -2)).float() * p.scale  # (B, H, Sq, Sk); scores rounded to q's dtype first
    if p.softcap > 0:
        s = p.softcap * torch.tanh(s / p.softcap)
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


def _reference(q, k, v, p: AttnParams):
    """Dense or packed reference with the same (out, lse) layouts as the kernels."""
    prefix_list = None if p.prefix is None else [int(x) for x in p.prefix.tolist()]
    if p.cu_seqlens_q is None:
        if p.seqused_k is None:
            return _reference_dense(q, k, v, p, 0, prefix_list, q.shape[2])
        outs, lses = [], []
        for i, used in enumerate(p.seqused_k.tolist()):
            o, lse = _reference_dense(q[i : i + 1], k[i : i + 1, :used], v[i : i + 1, :used], p, i,
                                      None if prefix_list is None else prefix_list[i : i + 1], q.shape[2])
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
    cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        o, lse = _reference_dense(q[None, cq[i] : cq[i + 1]], k[None, ck[i] : ck[i + 1]], v[None, ck[i] : ck[i + 1]],
                                  p, i, None if prefix_list is None else prefix_list[i : i + 1], q.shape[1])
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)  # (T, H, D), (H, T)


def attention_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        prefix_len=None, dropout_p=0.0, dropout_seed=0, return_lse=False):
    """Plain-PyTorch attention over (B, S, H, D) tensors with every mask of :func:`flash_attn_func`.

    Computes in the inputs' dtype (scores upcast to fp32 for the softmax, as eager attention does);
    pass fp64 tensors for an oracle."""
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                q.shape[1], k.shape[1], _prefix_tensor(prefix_len, q.shape[0], q.device, "prefix_len"))
    out, lse = _reference(q, k, v, p)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- backends and dispatch
_BACKEND_MODULES = {"triton": "mmfast.ops._attention_triton", "triton_interpret": "mmfast.ops._attention_triton"}


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"kernel module {module} failed to import ({e})"
    return None


# Checked once, at import, so that backend selection is plain Python torch.compile can trace.
_KERNEL_IMPORT_ERRORS = {m: _import_error(m) for m in set(_BACKEND_MODULES.values())}


def _supports(backend: str, facts: Facts) -> list[str]:
    reasons = []
    if backend == "reference":
        if facts.dtype not in _REFERENCE_DTYPES:
            reasons.append(f"dtype {facts.dtype} is not a floating-point dtype the reference handles")
    elif facts.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {facts.dtype} is not one of float32/float16/bfloat16")
    d = facts.extra.get("head_dim")
    if d is not None and not 1 <= d <= MAX_HEAD_DIM:
        reasons.append(f"head dim {d} is outside 1..{MAX_HEAD_DIM}")
    if backend in _BACKEND_MODULES and _KERNEL_IMPORT_ERRORS[_BACKEND_MODULES[backend]]:
        reasons.append(_KERNEL_IMPORT_ERRORS[_BACKEND_MODULES[backend]])
    return reasons


def _example(device: str) -> Facts:
    return Facts(device, torch.bfloat16 if device == "cuda" else torch.float32, {"head_dim": 64})


ATTENTION_OP = register(Op("flash_attention", impls={**_BACKEND_MODULES, "reference": "plain PyTorch, S×S scores"},
                           supports=_supports, example=_example))


# --------------------------------------------------------------------------- torch.library ops
# The kernels sit behind opaque custom ops, so torch.compile traces through calls to them (it sees the
# ops and their fake shapes, never the Triton launches).
_P_SCHEMA = ("Tensor? cu_q, Tensor? cu_k, Tensor? seqused_k, Tensor? prefix, int max_q, int max_k, float scale, "
             "bool band, int wl, int wr, float softcap, float dropout_p, int seed")


def _p_args(p: AttnParams) -> tuple:
    return (p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, p.prefix, p.max_seqlen_q, p.max_seqlen_k, p.scale,
            p.band, p.window_left, p.window_right, p.softcap, p.dropout_p, p.seed)


def _p_from(cu_q, cu_k, seqused_k, prefix, max_q, max_k, scale, band, wl, wr, softcap, dropout_p, seed):
    return AttnParams(scale, band, wl, wr, softcap, dropout_p, seed, max_q, max_k, prefix=prefix,
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k)


_TRITON_FWD = "mmfast.ops._attention_triton"


@torch.library.custom_op("mmfast::flash_attn_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_P_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)")
def _fwd_op(q, k, v, *p):
    out, lse, (m_row, il_row) = importlib.import_module(_TRITON_FWD).attn_fwd(q, k, v, _p_from(*p))
    return out, lse, m_row, il_row


@_fwd_op.register_fake
def _(q, k, v, cu_q, *rest):
    if cu_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # (H, T)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)  # (B, H, Sq)
    return torch.empty_like(q), lse, torch.empty_like(lse), torch.empty_like(lse)


@torch.library.custom_op(
    "mmfast::flash_attn_bwd", mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor m_row, Tensor il_row, {_P_SCHEMA})"
    " -> (Tensor, Tensor, Tensor)")
def _bwd_op(dout, q, k, v, out, m_row, il_row, *p):
    return importlib.import_module(_TRITON_FWD + "_bwd").attn_bwd(dout, q, k, v, out, (m_row, il_row), _p_from(*p))


@_bwd_op.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_fwd_call = eager_fast(_fwd_op)
_bwd_call = eager_fast(_bwd_op)


class _FlashAttnFn(torch.autograd.Function):
    """(out, lse) through the Triton kernels; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, p):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse, m_row, il_row = _fwd_call(q, k, v, *_p_args(p))
        ctx.save_for_backward(q, k, v, out, m_row, il_row)
        ctx.p = p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, m_row, il_row = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = _bwd_call(dout, q, k, v, out, m_row, il_row, *_p_args(ctx.p))
        return dq, dk, dv, None


# --------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, packed: bool):
    dims = 3 if packed else 4
    layout = "(total, heads, headdim)" if packed else "(batch, seqlen, heads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _REFERENCE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32 "
                            "(float64 with backend='reference')")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
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


def _select(q, backend):
    check_backend_name(backend)
    return ATTENTION_OP.select(Facts.of([q], head_dim=q.shape[-1]), backend)


def _run(q, k, v, p: AttnParams, backend):
    chosen = _select(q, backend)
    if chosen == "reference":
        return _reference(q, k, v, p)
    return _FlashAttnFn.apply(q, k, v, p)


# --------------------------------------------------------------------------- public API
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, return_lse=False, *, prefix_len=None, dropout_seed=None, backend=None):
    """Attention over (batch, seqlen, heads, headdim) tensors; k/v may have fewer heads (GQA).

    ``prefix_len``: int or (batch,) tensor, the prefix-LM mask. Returns out (like q), and with
    ``return_lse`` also the fp32 (batch, heads, seqlen_q) log-sum-exp."""
    _check_qkv(q, k, v, packed=False)
    prefix = _prefix_tensor(prefix_len, q.shape[0], q.device, "prefix_len")
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                q.shape[1], k.shape[1], prefix)
    out, lse = _run(q, k, v, p, backend)
    return (out, lse) if return_lse else out


def _check_cu(cu, name: str, total: int, device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor (batch+1,) of offsets, got {cu!r}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, expected {device}")
    if int(cu[0]) != 0 or int(cu[-1]) != total or (cu[1:] < cu[:-1]).any():
        raise ValueError(f"{name} must rise from 0 to {total} (the packed length), got {cu.tolist()}")
    return cu.to(torch.int32)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           return_lse=False, *, prefix_lens=None, dropout_seed=None, backend=None):
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, Hk, D); sequence i is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``. lse (with ``return_lse``) is (H, total_q) fp32."""
    _check_qkv(q, k, v, packed=True)
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    cu_k = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}")
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    if int(lens_q.max()) > int(max_seqlen_q) or int(lens_k.max()) > int(max_seqlen_k):
        raise ValueError(f"max_seqlen_q/k ({max_seqlen_q}, {max_seqlen_k}) are below the longest sequences "
                         f"({int(lens_q.max())}, {int(lens_k.max())})")
    prefix = _prefix_tensor(prefix_lens, cu_q.numel() - 1, q.device, "prefix_lens")
    p = _params(q, k, softmax_scale, causal, window_size, softcap, dropout_p, dropout_seed,
                max_seqlen_q, max_seqlen_k, prefix, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse = _run(q, k, v, p, backend)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                            causal=True, window_size=(-1, -1), softcap=0.0, *, backend=None):
    """Decoding step: write k/v (B, Snew, Hk, D) into the caches (B, Smax, Hk, D) at ``cache_seqlens``
    (int or (B,) tensor of current lengths; None = 0) in place, then attend q (B, Sq, H, D) over the
    first ``cache_seqlens + Snew`` cached keys of each row. Forward only (no autograd)."""
    _check_qkv(q, k_cache, v_cache, packed=False)
    b, smax = k_cache.shape[0], k_cache.shape[1]
    if cache_seqlens is None:
        lens = torch.zeros(b, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        if cache_seqlens.dim() != 1 or cache_seqlens.numel() != b or cache_seqlens.dtype.is_floating_point:
            raise ValueError(f"cache_seqlens must be an int or a (batch,) integer tensor, got {cache_seqlens!r}")
        lens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v to append, or neither")
    # The longest row, read on the host once per call (a device sync on a GPU); an int length needs none.
    top = cache_seqlens if isinstance(cache_seqlens, int) else 0 if cache_seqlens is None else int(lens.max())
    with torch.no_grad():
        if k is not None:
            if k.shape != v.shape or k.dim() != 4 or k.shape[0] != b or k.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"k/v must be (batch, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}) "
                                 f"with batch {b}, got {tuple(k.shape)} and {tuple(v.shape)}")
            snew = k.shape[1]
            if top + snew > smax:
                raise ValueError(f"appending {snew} tokens to cache lengths up to {top} overflows "
                                 f"the cache capacity {smax}")
            pos = lens.long()[:, None] + torch.arange(snew, device=q.device)  # (B, Snew)
            rows = torch.arange(b, device=q.device)[:, None].expand_as(pos)
            k_cache[rows, pos] = k.to(k_cache.dtype)
            v_cache[rows, pos] = v.to(v_cache.dtype)
            lens = lens + snew
        elif top > smax:
            raise ValueError(f"cache_seqlens up to {top} exceed the cache capacity {smax}")
        p = _params(q, k_cache, softmax_scale, causal, window_size, softcap, 0.0, 0, q.shape[1], smax, None,
                    seqused_k=lens)
        chosen = _select(q, backend)
        if chosen == "reference":
            return _reference(q, k_cache, v_cache, p)[0]
        return _fwd_call(q, k_cache, v_cache, *_p_args(p))[0]


__all__ = [
    "AttnParams",
    "attention_reference",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]
