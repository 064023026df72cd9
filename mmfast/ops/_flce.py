"""Fused linear cross-entropy: the LM head's matmul and the cross-entropy without the (T × V) logits.

Math. For hidden rows ``h_i`` (T, H), weight ``W`` (V, H), bias ``b`` and targets ``t_i``:

    x_i  = W h_i + b,   z_i = cap · tanh(x_i / cap)  (softcap, optional),   lse_i = log Σ_j e^{z_ij}
    ℓ_i  = lse_i − (1−ε) z_i,t − (ε/V) Σ_j z_ij + λ · lse_i²            (ℓ_i = 0 where t_i = ignore)
    loss = Σ ℓ_i / #{t_i ≠ ignore}  ("mean"; 0 when every row is ignored) | Σ ℓ_i ("sum") | ℓ ("none")

Algorithm. Tokens are processed in chunks of C rows, C chosen so the chunk's logits (C, V) fit a
byte budget. Per chunk: ``logits = h_c Wᵀ (+ b)`` (cuBLAS), one row pass (a Triton kernel, or plain
PyTorch on the reference backend) computes ℓ and overwrites the logits with ``s_i · dℓ_i/dx``, then
``dh_c = dlogits W`` and ``dW += dlogitsᵀ h_c`` (accumulated in fp32), ``db += Σ_rows dlogits``.
With reduction "mean"/"sum" the gradients are computed during the forward (s_i = 1/n or 1) and
the backward only scales them by the incoming scalar gradient, so neither ``W`` nor the logits are
kept for the backward (this is also what makes a ZeRO-3 partitioned ``W`` work: it is only read
while its module's forward holds it gathered). With "none" the backward recomputes each chunk
with s_i = grad_output_i.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mmfast.ops._dispatch import eager_fast

# Bytes of one chunk's logits in the GEMM dtype; the row pass and the three GEMMs all work on it.
# MMFAST_FLCE_CHUNK_MB sets both. CUDA: 256 MiB. On an H100 (bf16, T=8192, H=4096, V=32064,
# benchmarks/results/nvidia-h100-80gb-hbm3/run2) forward + backward took 10.5 ms at 256 MiB against
# 13.2 ms at 64 MiB: four times fewer passes over the fp32 dW sum, for 196 MiB more peak memory.
# A LLaVA-length sequence (2048 tokens × 32000) is then one chunk, which needs no fp32 dW buffer at all.
_ENV_CHUNK_MB = os.environ.get("MMFAST_FLCE_CHUNK_MB")
DEFAULT_CHUNK_BYTES = int(_ENV_CHUNK_MB or 64) << 20  # CPU and other devices
CUDA_CHUNK_BYTES = int(_ENV_CHUNK_MB or 256) << 20


def default_chunk_bytes(device: torch.device | str | None) -> int:
    """The logits budget of one chunk on ``device`` (see ``CUDA_CHUNK_BYTES``)."""
    return CUDA_CHUNK_BYTES if torch.device(device or "cpu").type == "cuda" else DEFAULT_CHUNK_BYTES


def chunk_rows(T: int, V: int, itemsize: int, budget: int | None = None, device=None) -> int:
    """Rows per chunk: as many as fit ``budget`` bytes (default: the device's) of (rows, V) logits, a
    multiple of 16 when > 16."""
    budget = default_chunk_bytes(device) if budget is None else budget
    c = max(1, budget // max(1, V * itemsize))
    if c > 16:
        c -= c % 16
    return max(1, min(T, c))


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


def _row_pass(backend: str):
    if backend == "reference":
        return ce_rows_torch
    from mmfast.ops._projection_triton import ce_rows

    return ce_rows


# --------------------------------------------------------------------------- fp32 dW accumulation
_ADDMM_F32_OK: dict = {}


def _addmm_fp32_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` (bf16/fp16 operands, fp32 accumulator
    updated in the GEMM's epilogue) works on this device; probed once on a 16×16 case."""
    key = (device.type, device.index)
    if key not in _ADDMM_F32_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(16, 16, device=device, dtype=torch.bfloat16)
                c = torch.ones(16, 16, device=device, dtype=torch.float32)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                ok = bool(torch.allclose(c, 1 + a.float() @ a.float(), rtol=1e-3, atol=1e-3))
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _ADDMM_F32_OK[key] = ok
    return _ADDMM_F32_OK[key]


def _accumulate_dw_fp32(dw, logits, h, v_block):
    """dw (V, H) fp32 += logitsᵀ (V, C) @ h (C, H), bf16/fp16 operands."""
    if _addmm_fp32_supported(dw.device):
        torch.addmm(dw, logits.t(), h, out_dtype=torch.float32, out=dw)
        return
    V = dw.shape[0]
    for v0 in range(0, V, v_block):  # (Vb, H) products, each rounded once, summed in fp32
        dw[v0:v0 + v_block].add_(torch.mm(logits[:, v0:v0 + v_block].t(), h))


# --------------------------------------------------------------------------- chunked driver
def flce_chunked(
    hidden, weight, bias, target, scale, per_row, ignore_index, smoothing, z_loss, softcap,
    need_dh, need_dw, need_db, chunk, backend, dw_fp32=True,
):
    """Loss rows (T,) fp32, lse (T,) fp32 and the scaled gradients (empty (0,) tensors when not needed).

    ``hidden`` (T, H) and ``weight`` (V, H) contiguous, same dtype; ``target`` (T,) int64;
    ``scale`` fp32, (T,) when ``per_row`` else (1,).
    """
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    row_pass = _row_pass(backend)
    write_grad = need_dh or need_dw or need_db
    loss = torch.empty(T, device=dev, dtype=torch.float32)
    lse = torch.empty(T, device=dev, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    n_chunks = -(-T // chunk) if T else 0
    # One chunk: the GEMM's own fp32 accumulation is the whole sum, write dW directly. Without
    # dw_fp32 the chunks accumulate into dW in its own dtype (addmm rounds once per chunk).
    direct_dw = weight.dtype == torch.float32 or n_chunks <= 1 or not dw_fp32
    # Vocab rows per dW product when summing in fp32: bounds the product's temporary to ~half a chunk.
    v_block = max(1, min(V, default_chunk_bytes(dev) // 2 // max(1, H * weight.element_size())))
    if need_dw:
        dw = (torch.zeros_like(weight) if direct_dw else torch.zeros(V, H, device=dev, dtype=torch.float32))
    else:
        dw = weight.new_empty(0)
    db = torch.zeros(V, device=dev, dtype=torch.float32) if need_db else weight.new_empty(0)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        h = hidden[s:e]  # (C, H)
        logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())  # (C, V)
        row_pass(
            logits, target[s:e], loss[s:e], lse[s:e], scale[s:e] if per_row else scale, per_row,
            ignore_index=ignore_index, smoothing=smoothing, z_loss=z_loss, softcap=softcap, write_grad=write_grad,
        )
        if need_dh:
            torch.mm(logits, weight, out=dh[s:e])
        if need_dw:
            if direct_dw:
                dw.addmm_(logits.t(), h)
            else:
                _accumulate_dw_fp32(dw, logits, h, v_block)
        if need_db:
            db.add_(logits.sum(0, dtype=torch.float32))
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss, lse, dh, dw, db


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
                dw_fp32=True):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        ctx.cfg = (ignore_index, smoothing, z_loss, softcap, chunk, backend, need_dh, need_dw, need_db, dw_fp32)
        ctx.reduction = reduction
        ctx.bias_dtype = None if bias is None else bias.dtype
        any_grad = need_dh or need_dw or need_db
        one = torch.ones(1, device=hidden.device, dtype=torch.float32)
        if reduction == "mean":
            scale = 1.0 / (target != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)
        else:
            scale = one
        if reduction == "none" or not any_grad:
            rows, _, _, _, _ = _flce_call(
                hidden, weight, bias, target, one, False, ignore_index, smoothing, z_loss, softcap,
                False, False, False, chunk, backend, dw_fp32,
            )
            if any_grad:
                ctx.save_for_backward(hidden, weight, bias, target)
            return rows if reduction == "none" else (rows.sum() * scale).reshape(())
        rows, _, dh, dw, db = _flce_call(
            hidden, weight, bias, target, scale, False, ignore_index, smoothing, z_loss, softcap,
            need_dh, need_dw, need_db, chunk, backend, dw_fp32,
        )
        # Kept as attributes, not saved tensors: the backward scales them in place, once.
        ctx.grads = (dh, dw, db)
        return (rows.sum() * scale).reshape(())

    @staticmethod
    @torch.autograd.function.once_differentiable
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
            g = grad.float().reshape(1)
            if need_dh:
                dh = dh.mul_(g.to(dh.dtype))
            if need_dw:
                dw = dw.mul_(g.to(dw.dtype))
            if need_db:
                db = db.mul_(g)
        dh = dh if need_dh else None
        dw = dw if need_dw else None
        db = db.to(ctx.bias_dtype) if need_db else None
        return dh, dw, db, None, None, None, None, None, None, None, None, None
