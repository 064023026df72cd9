"""How a flash-attention call reaches a backend: the op's registration and shape classes, the call's
:class:`Facts`, argument checks, the autograd glue for explicit-backward backends, and the runners the
public functions in :mod:`mmfast.ops.attention` share."""
from __future__ import annotations

import math

import torch

from mmfast.ops._attention_reference import (
    _REFERENCE_DTYPES,
    MAX_HEAD_DIM,
    AttnParams,
    _probs_reference,
    _reference,
    _resolve_window,
)
from mmfast.ops._dispatch import AUTOGRAD, Backend, Facts, Op, register


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
                           device_order={"cpu": ("triton_interpret", "cpp", "reference")}))
ATTENTION_OP.add("triton", f"{_B}.attention_triton:TRITON")
ATTENTION_OP.add("triton_interpret", f"{_B}.attention_triton:INTERPRET")
ATTENTION_OP.add("flash_attn", f"{_B}.attention_flash_attn:FLASH_ATTN")
ATTENTION_OP.add("sdpa_cudnn", f"{_B}.attention_sdpa:CUDNN")
ATTENTION_OP.add("sdpa_flash", f"{_B}.attention_sdpa:FLASH")
ATTENTION_OP.add("sdpa_efficient", f"{_B}.attention_sdpa:EFFICIENT")
ATTENTION_OP.add("flex", f"{_B}.attention_flex:FLEX")
ATTENTION_OP.add("sdpa_math", f"{_B}.attention_sdpa:MATH")
ATTENTION_OP.add("cpp", f"{_B}.attention_cpp:CPP")
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


def _facts_key(q, k, p: AttnParams, need_lse: bool, grad: bool) -> tuple:
    """What :func:`_facts` reads, as a cheap hashable tuple (the memo key of the backend choice)."""
    return (q.device, q.dtype, q.shape, k.shape, p.max_seqlen_q, p.max_seqlen_k, p.band, p.window_left,
            p.window_right, p.prefix is None, p.softcap > 0, p.alibi is None, p.dropout_p > 0,
            None if p.cu_seqlens_q is None else p.cu_seqlens_q.shape[0], p.seqused_k is None, p.leftpad is None,
            p.kv_batch_idx is None, p.block_table is None, bool(need_lse), bool(grad))


def _backend(q, k, p: AttnParams, backend, need_lse: bool, grad: bool):
    # memoised on _facts_key: a repeated call with the same shapes and flags is a dictionary lookup
    return ATTENTION_OP.choose(backend, _facts_key(q, k, p, need_lse, grad),
                               lambda: _facts(q, k, p, need_lse, grad))


def _run(q, k, v, p: AttnParams, backend, need_lse: bool = True):
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    be = _backend(q, k, p, backend, need_lse, grad)
    if be.backward is AUTOGRAD:  # AUTOGRAD backends: differentiable as they are
        return be.forward(q, k, v, p, need_lse)
    return _FlashAttnFn.apply(q, k, v, p, be)


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


def _unpack(t, name: str, dims: int, n: int, axis: int, layout: str):
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[axis] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {dims}-D {layout}, got {shape}")
    return t.unbind(axis)


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
