"""Fused linear cross-entropy: the LM head's matmul and the cross-entropy without the (T × V) logits.

Math. For hidden rows ``h_i`` (T, H), weight ``W`` (V, H), bias ``b`` and targets ``t_i``:

    x_i  = W h_i + b,   z_i = cap · tanh(x_i / cap)  (softcap, optional),   lse_i = log Σ_j e^{z_ij}
    ℓ_i  = lse_i − (1−ε) z_i,t − (ε/V) Σ_j z_ij + λ · lse_i²            (ℓ_i = 0 where t_i = ignore)
    loss = Σ ℓ_i / #{t_i ≠ ignore}  ("mean"; 0 when every row is ignored) | Σ ℓ_i ("sum") | ℓ ("none")

Algorithm. Tokens are processed in chunks of C rows, C chosen so the chunk's logits (C, V) fit a
byte budget. Per chunk: ``logits = h_c Wᵀ (+ b)`` (cuBLAS), one row pass (a Triton kernel, or plain
PyTorch on the reference backend) computes ℓ and lse and overwrites the logits with ``s_i · dℓ_i/dx``,
then ``dh_c = dlogits W``. The weight gradient:

* one chunk (or an fp32 weight, or ``dw_fp32=False``): ``dW += dlogitsᵀ h_c`` per chunk, into dW in
  its own dtype (one chunk: that single GEMM's fp32 accumulation is the whole sum);
* several chunks of a bf16/fp16 weight (``dw_fp32=True``, the default): a second pass over the
  vocabulary in blocks of Vb rows, each block's logits for *all* T tokens ``(T, Vb) = h W_vbᵀ``
  recomputed, turned into their gradient from the row pass's lse (``_flce_triton.ce_grad_block``) and
  ``dW_vb = dlogits_vbᵀ h`` written by one GEMM whose fp32 accumulator spans every token: the sum over
  tokens is fp32 and rounded once, as in an unchunked GEMM, with no (V, H) fp32 buffer. The cost is
  one more logits GEMM (4 instead of 3 T·V·H products).
  Extra memory, fwd + bwd (what the step allocates, the returned gradients included):
  ``T·H·b (dh) + V·H·b (dW) + max(C·V, T·Vb)·b (one chunk or block of logits) + 12·T (fp32 loss, lse,
  scale)`` bytes, b the element size: at T = 8192, H = 4096, V = 32064 bf16 with the 64 MiB budget
  64 + 250.5 + 64 MiB ≈ 379 MiB (0.37 GiB); the former fp32 buffer and its cast held 501 + 250.5 MiB.

``db += Σ_rows dlogits`` (fp32), per chunk or per vocabulary block.
With reduction "mean"/"sum" the gradients are computed during the forward (s_i = 1/n or 1) and
the backward only scales them by the incoming scalar gradient, so neither ``W`` nor the logits are
kept for the backward (this is also what makes a ZeRO-3 partitioned ``W`` work: it is only read
while its module's forward holds it gathered). With "none" the backward recomputes each chunk
with s_i = grad_output_i.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch
import torch.nn.functional as F

from mmfast.ops._host import eager_fast, once_differentiable

# Bytes of one chunk's (or vocabulary block's) logits in the GEMM dtype; MMFAST_FLCE_CHUNK_MB sets it.
# 64 MiB everywhere: with the weight gradient summed by vocabulary blocks (see above) a larger budget no
# longer saves passes over an fp32 dW sum, and 64 MiB keeps T = 8192, V = 32064 under 0.4 GiB extra.
# CUDA_SINGLE_CHUNK_BYTES: on CUDA a sequence whose whole (T, V) logits fit it runs as one chunk (three
# GEMMs, no vocabulary pass; a LLaVA-length 2048 × 32000 bf16 sequence is 125 MiB).
_ENV_CHUNK_MB = os.environ.get("MMFAST_FLCE_CHUNK_MB")
DEFAULT_CHUNK_BYTES = int(_ENV_CHUNK_MB or 64) << 20  # CPU and other devices
CUDA_CHUNK_BYTES = int(_ENV_CHUNK_MB or 64) << 20
CUDA_SINGLE_CHUNK_BYTES = int(_ENV_CHUNK_MB or 256) << 20


def default_chunk_bytes(device: torch.device | str | None) -> int:
    """The logits budget of one chunk on ``device`` (see ``CUDA_CHUNK_BYTES``)."""
    return CUDA_CHUNK_BYTES if torch.device(device or "cpu").type == "cuda" else DEFAULT_CHUNK_BYTES


def chunk_rows(T: int, V: int, itemsize: int, budget: int | None = None, device=None) -> int:
    """Rows per chunk: as many as fit ``budget`` bytes (default: the device's) of (rows, V) logits, a
    multiple of 16 when > 16. Default budget on CUDA: all T rows when they fit ``CUDA_SINGLE_CHUNK_BYTES``.
    ``device``: a torch.device, a device string or a device type ("cuda")."""
    if budget is None:
        dev = device.type if isinstance(device, torch.device) else (device or "cpu")
        if dev not in ("cpu", "cuda"):
            dev = torch.device(dev).type
        args = (T, V, itemsize, None, dev, DEFAULT_CHUNK_BYTES, CUDA_CHUNK_BYTES, CUDA_SINGLE_CHUNK_BYTES)
    else:
        args = (T, V, itemsize, budget, "", 0, 0, 0)
    # memoised in eager mode (a dictionary read); torch.compile traces the plain arithmetic
    return _chunk_rows.__wrapped__(*args) if torch.compiler.is_compiling() else _chunk_rows(*args)


@functools.lru_cache(maxsize=256)  # keyed on the budgets too: they are module settings a test may patch
def _chunk_rows(T, V, itemsize, budget, dev, default_bytes, cuda_bytes, cuda_single_bytes):
    if budget is None:
        budget = cuda_bytes if dev == "cuda" else default_bytes
        if dev == "cuda" and T * V * itemsize <= cuda_single_bytes:
            return max(1, T)
    c = max(1, budget // max(1, V * itemsize))
    if c > 16:
        c -= c % 16
    return max(1, min(T, c))


# --------------------------------------------------------------------------- target check + count
_BAD = 1 << 32  # an out-of-range target's weight in the sum: the count stays in the low 32 bits


@functools.lru_cache(maxsize=64)
def _target_tables(ignore_index: int, V: int, device: torch.device):
    """Boundaries cutting the integers into intervals that lie wholly inside or outside [0, V), with
    ``ignore_index`` alone in its own, and each interval's weight: 1 inside [0, V), 0 for ignore_index,
    ``_BAD`` elsewhere. ``bucketize(t, bounds, right=True)`` is t's interval."""
    bounds = sorted({0, V, ignore_index, ignore_index + 1})
    edges = [None, *bounds, None]  # interval i is [edges[i], edges[i + 1])
    weights = []
    for lo, hi in itertools.pairwise(edges):
        if lo == ignore_index:
            weights.append(0)
        elif lo is not None and hi is not None and 0 <= lo and hi <= V:
            weights.append(1)
        else:
            weights.append(_BAD)
    return (torch.tensor(bounds, dtype=torch.int64, device=device),
            torch.tensor(weights, dtype=torch.int64, device=device))


def count_targets(t: torch.Tensor, V: int, ignore_index: int) -> int:
    """#{t_i != ignore_index}, checking that every such target lies in [0, V) (``ValueError`` naming the
    argument otherwise). ``t`` (T,) int64, T < 2³¹. One reduction and one host read (on a GPU a sync, as any
    such check); the example index is looked up only when the check fails."""
    bounds, weights = _target_tables(int(ignore_index), int(V), t.device)
    total = int(torch.take(weights, torch.bucketize(t, bounds, right=True)).sum())
    if total >= _BAD:
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        raise ValueError(f"target has class indices outside [0, {V}) that are not ignore_index={ignore_index}, "
                         f"e.g. {int(t[bad][0])}")
    return total


# --------------------------------------------------------------------------- oracle (full logits)
def fused_linear_cross_entropy_reference(
    hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
    reduction="mean", z_loss=0.0, softcap=None,
):
    """Plain PyTorch over the full (T, V) logits: ``F.linear`` + softcap + ``F.cross_entropy`` + z-loss.
    Differentiable by autograd; the test oracle (run it in fp64 for the reference values)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    x = F.linear(h, weight, bias)  # (T, V)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = t != ignore_index
    if z_loss:
        ce = ce + z_loss * torch.where(valid, x.logsumexp(-1), torch.zeros((), dtype=x.dtype, device=x.device)) ** 2
    if reduction == "none":
        return ce.reshape(target.shape)
    total = ce.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------- row pass, plain PyTorch
def ce_rows_torch(logits, target, loss, lse, scale, per_row, *, ignore_index, smoothing, z_loss, softcap, write_grad):
    """The reference backend's row pass: same contract as ``_projection_triton.ce_rows``."""
    V = logits.shape[1]
    x = logits.float()  # (C, V)
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    row_lse = z.logsumexp(-1)  # (C,)
    zt = z.gather(1, t[:, None]).squeeze(1)
    row = row_lse - (1.0 - smoothing) * zt - (smoothing / V) * z.sum(-1) + z_loss * row_lse * row_lse
    loss.copy_(torch.where(valid, row, torch.zeros_like(row)))
    lse.copy_(row_lse)
    if not write_grad:
        return
    s = scale if per_row else scale.expand(logits.shape[0])
    s = torch.where(valid, s, torch.zeros_like(s))
    g = torch.exp(z - row_lse[:, None]) * (1.0 + 2.0 * z_loss * row_lse)[:, None] - smoothing / V
    g.scatter_add_(1, t[:, None], torch.full_like(zt[:, None], -(1.0 - smoothing)))
    if softcap is not None:
        g = g * (1.0 - (z / softcap) ** 2)
    logits.copy_(g * s[:, None])


def ce_grad_block_torch(logits, target, lse, scale, per_row, v0, V, *, ignore_index, smoothing, z_loss, softcap):
    """The reference backend's vocabulary-block pass: same contract as ``_flce_triton.ce_grad_block``."""
    T, Vb = logits.shape
    x = logits.float()
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    valid = target != ignore_index
    s = scale if per_row else scale.expand(T)
    s = torch.where(valid, s, torch.zeros_like(s))
    g = torch.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None] - smoothing / V
    col = target - v0
    hit = valid & (col >= 0) & (col < Vb)
    rows = torch.arange(T, device=logits.device)[hit]
    g[rows, col[hit]] -= 1.0 - smoothing
    if softcap is not None:
        g = g * (1.0 - (z / softcap) ** 2)
    logits.copy_(g * s[:, None])


@functools.cache  # a dictionary read per call, not an import statement
def _row_pass(backend: str):
    if backend == "reference":
        return ce_rows_torch
    from mmfast.ops._projection_triton import ce_rows

    return ce_rows


def _grad_block_pass(backend: str):
    if backend == "reference":
        return ce_grad_block_torch
    from mmfast.ops._flce_triton import ce_grad_block

    return ce_grad_block


def vocab_block_rows(T: int, V: int, chunk: int) -> int:
    """Vocabulary rows per block of the dW pass: a (T, Vb) block no larger than a (chunk, V) chunk,
    a multiple of 16 when > 16."""
    vb = max(1, (chunk * V) // max(1, T))
    if vb > 16:
        vb -= vb % 16
    return max(1, min(V, vb))


# --------------------------------------------------------------------------- chunked driver
def flce_chunked(
    hidden, weight, bias, target, scale, per_row, ignore_index, smoothing, z_loss, softcap,
    need_dh, need_dw, need_db, chunk, backend, dw_fp32=True,
):
    """Loss rows (T,) fp32, lse (T,) fp32 and the scaled gradients (empty (0,) tensors when not needed).

    ``hidden`` (T, H) and ``weight`` (V, H) contiguous, same dtype; ``target`` (T,) int64;
    ``scale`` fp32, (T,) when ``per_row`` else (1,).
    """
    T = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    row_pass = _row_pass(backend)
    loss = torch.empty(T, device=dev, dtype=torch.float32)
    lse = torch.empty(T, device=dev, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    n_chunks = -(-T // chunk) if T else 0
    # dW by vocabulary blocks (exact fp32 sum over tokens, no (V, H) fp32 buffer) when a low-precision
    # weight's gradient would otherwise be summed over several chunks; else per chunk, in dW's dtype.
    vocab_pass = need_dw and weight.dtype != torch.float32 and n_chunks > 1 and dw_fp32
    one = n_chunks == 1  # one chunk: the whole tensors (no slice views); dW and db are their op's output
    # (None: filled by the one chunk's GEMM, or an empty (0,) tensor when not wanted)
    dw = torch.zeros_like(weight) if need_dw and not vocab_pass and not one else None
    db = torch.zeros(V, device=dev, dtype=torch.float32) if need_db and not one else None
    write_grad = need_dh or (need_dw and not vocab_pass) or (need_db and not vocab_pass)
    wt = weight.t()  # (H, V)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        h = hidden if one else hidden[s:e]  # (C, H)
        logits = torch.mm(h, wt) if bias is None else torch.addmm(bias, h, wt)  # (C, V)
        row_pass(
            logits, target if one else target[s:e], loss if one else loss[s:e], lse if one else lse[s:e],
            scale[s:e] if per_row and not one else scale, per_row,
            ignore_index=ignore_index, smoothing=smoothing, z_loss=z_loss, softcap=softcap, write_grad=write_grad,
        )
        if need_dh:
            torch.mm(logits, weight, out=dh if one else dh[s:e])
        if need_dw and not vocab_pass:
            if one:
                dw = torch.mm(logits.t(), h)
            else:
                dw.addmm_(logits.t(), h)
        if need_db and not vocab_pass:
            if one:
                db = logits.sum(0, dtype=torch.float32)
            else:
                db.add_(logits.sum(0, dtype=torch.float32))
        logits = None
    if vocab_pass:
        grad_block = _grad_block_pass(backend)
        dw = torch.empty_like(weight)
        vb = vocab_block_rows(T, V, chunk)
        for v0 in range(0, V, vb):
            v1 = min(V, v0 + vb)
            w = weight[v0:v1]  # (Vb, H)
            logits = torch.mm(hidden, w.t()) if bias is None else torch.addmm(bias[v0:v1], hidden, w.t())  # (T, Vb)
            grad_block(logits, target, lse, scale, per_row, v0, V, ignore_index=ignore_index, smoothing=smoothing,
                       z_loss=z_loss, softcap=softcap)
            torch.mm(logits.t(), hidden, out=dw[v0:v1])  # one GEMM over all T: fp32 sum, one rounding
            if need_db:
                db[v0:v1] = logits.sum(0, dtype=torch.float32)
            logits = None
    return loss, lse, dh, weight.new_empty(0) if dw is None else dw, weight.new_empty(0) if db is None else db


@torch.library.custom_op("mmfast::flce_chunked", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    scale: torch.Tensor,
    per_row: bool,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk: int,
    backend: str,
    dw_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return flce_chunked(
        hidden, weight, bias, target, scale, per_row, ignore_index, smoothing, z_loss, softcap,
        need_dh, need_dw, need_db, chunk, backend, dw_fp32,
    )


@_flce_op.register_fake
def _(hidden, weight, bias, target, scale, per_row, ignore_index, smoothing, z_loss, softcap,
      need_dh, need_dw, need_db, chunk, backend, dw_fp32):
    T = hidden.shape[0]
    V = weight.shape[0]
    f32 = {"device": hidden.device, "dtype": torch.float32}
    return (
        hidden.new_empty(T, dtype=torch.float32),
        torch.empty(T, **f32),
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
        torch.empty(V, **f32) if need_db else weight.new_empty(0),
    )


_flce_call = eager_fast(_flce_op)


# --------------------------------------------------------------------------- autograd
class FLCEFunction(torch.autograd.Function):
    """Returns the reduced loss (0-d fp32) for "mean"/"sum", the per-row losses (T,) fp32 for "none"."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, smoothing, z_loss, softcap, reduction, chunk, backend,
                dw_fp32=True, n_valid=None):
        """hidden (..., H), flattened to (T, H) here (a view made inside the Function is no autograd node).
        ``n_valid``: #{target != ignore_index} when the caller has counted it (``count_targets``); None: the
        mean's count is taken on the device."""
        ctx.hidden_shape = None  # the gradient's shape, when not the (T, H) it is computed in
        if hidden.dim() != 2:
            ctx.hidden_shape = hidden.shape
            hidden = hidden.reshape(-1, hidden.shape[-1])
        hidden = hidden.contiguous()  # (T, H)
        need = ctx.needs_input_grad
        need_dh, need_dw = need[0], need[1]
        need_db = bias is not None and need[2]
        ctx.cfg = (ignore_index, smoothing, z_loss, softcap, chunk, backend, need_dh, need_dw, need_db, dw_fp32)
        ctx.reduction = reduction
        ctx.bias_dtype = None if bias is None else bias.dtype
        any_grad = need_dh or need_dw or need_db
        if reduction != "mean":
            scale = torch.full((), 1.0, device=hidden.device, dtype=torch.float32)
        elif n_valid is not None:  # counted by the caller's target check: 1 / max(n, 1), rounded once to fp32
            scale = torch.full((), 1.0 / max(n_valid, 1), device=hidden.device, dtype=torch.float32)
        else:  # 1 / #{t != ignore} (at least 1), fp32 0-d, on the device: no host read
            # (the count summed in fp32 is exact up to 2^24 rows, as the int64 count's conversion is)
            scale = (target != ignore_index).sum(dtype=torch.float32).clamp_min_(1).reciprocal_()
        one = scale if reduction == "sum" else None
        if reduction == "none" or not any_grad:
            if one is None:
                one = torch.full((), 1.0, device=hidden.device, dtype=torch.float32)
            rows, _, _, _, _ = _flce_call(
                hidden, weight, bias, target, one, False, ignore_index, smoothing, z_loss, softcap,
                False, False, False, chunk, backend, dw_fp32,
            )
            if any_grad:
                ctx.save_for_backward(hidden, weight, bias, target)
            return rows if reduction == "none" else rows.sum() * scale
        rows, _, dh, dw, db = _flce_call(
            hidden, weight, bias, target, scale, False, ignore_index, smoothing, z_loss, softcap,
            need_dh, need_dw, need_db, chunk, backend, dw_fp32,
        )
        # Kept as attributes, not saved tensors: the backward scales them in place, once.
        ctx.grads = (dh, dw, db)
        return rows.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ignore_index, smoothing, z_loss, softcap, chunk, backend, need_dh, need_dw, need_db, dw_fp32 = ctx.cfg
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            _, _, dh, dw, db = _flce_call(
                hidden, weight, bias, target, grad.float().contiguous(), True, ignore_index, smoothing,
                z_loss, softcap, need_dh, need_dw, need_db, chunk, backend, dw_fp32,
            )
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same graph "
                                   "(retain_graph=True is not supported with reduction='mean'/'sum')")
            dh, dw, db = ctx.grads
            ctx.grads = None
            g = grad if grad.dtype == torch.float32 else grad.float()  # 0-d
            if need_dh:
                dh = dh.mul_(g if dh.dtype == torch.float32 else g.to(dh.dtype))
            if need_dw:
                dw = dw.mul_(g if dw.dtype == torch.float32 else g.to(dw.dtype))
            if need_db:
                db = db.mul_(g)
        dh = (dh if ctx.hidden_shape is None else dh.view(ctx.hidden_shape)) if need_dh else None
        dw = dw if need_dw else None
        db = db.to(ctx.bias_dtype) if need_db else None
        return dh, dw, db, None, None, None, None, None, None, None, None, None, None
