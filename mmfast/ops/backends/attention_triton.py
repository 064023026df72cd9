"""Attention through mmfast's Triton kernels (:mod:`mmfast.ops._attention_triton`, ``..._bwd``): every mask
and feature of :mod:`mmfast.ops.attention` (prefix-LM, windows, softcap, ALiBi, seeded dropout, varlen,
GQA, kv cache with per-row lengths, left padding, batch index, paged k/v).

The kernels sit behind ``mmfast::flash_attn_fwd`` / ``mmfast::flash_attn_bwd`` custom ops, so torch.compile
traces calls to them (it sees the ops and their fake shapes, never the Triton launches).

Contract (explicit backward)::

    forward(q, k, v, p: AttnParams) -> (out like q, lse fp32, saved = (m_row, il_row))
    backward(dout, q, k, v, out, saved, p) -> (dq, dk, dv)
"""
from __future__ import annotations

import importlib

import torch

from mmfast.ops._dispatch import Backend, Facts
from mmfast.ops._host import eager_fast

MAX_HEAD_DIM = 256
_FWD = "mmfast.ops._attention_triton"

_P_SCHEMA = ("Tensor? cu_q, Tensor? cu_k, Tensor? seqused_k, Tensor? prefix, int max_q, int max_k, float scale, "
             "bool band, int wl, int wr, float softcap, float dropout_p, int seed, Tensor? alibi, "
             "Tensor? kv_batch_idx, Tensor? leftpad, Tensor? block_table, int page_size")


def p_args(p) -> tuple:
    return (p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, p.prefix, p.max_seqlen_q, p.max_seqlen_k, p.scale,
            p.band, p.window_left, p.window_right, p.softcap, p.dropout_p, p.seed, p.alibi, p.kv_batch_idx,
            p.leftpad, p.block_table, p.page_size)


def _p_from(cu_q, cu_k, seqused_k, prefix, max_q, max_k, scale, band, wl, wr, softcap, dropout_p, seed, alibi,
            kv_batch_idx, leftpad, block_table, page_size):
    from mmfast.ops._attention_reference import AttnParams

    return AttnParams(scale, band, wl, wr, softcap, dropout_p, seed, max_q, max_k, prefix=prefix,
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused_k, alibi=alibi,
                      kv_batch_idx=kv_batch_idx, leftpad=leftpad, block_table=block_table, page_size=page_size)


@torch.library.custom_op("mmfast::flash_attn_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_P_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)")
def _fwd_op(q, k, v, *p):
    out, lse, (m_row, il_row) = importlib.import_module(_FWD).attn_fwd(q, k, v, _p_from(*p))
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
    return importlib.import_module(_FWD + "_bwd").attn_bwd(dout, q, k, v, out, (m_row, il_row), _p_from(*p))


@_bwd_op.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


fwd_call = eager_fast(_fwd_op)
bwd_call = eager_fast(_bwd_op)


_MODS: dict = {}


def _kernels(name: str):
    """The kernel module ``name`` (imported on the first call, then a dictionary read)."""
    mod = _MODS.get(name)
    if mod is None:
        mod = _MODS[name] = importlib.import_module(name)
    return mod


def forward(q, k, v, p):
    if torch.compiler.is_compiling():  # the custom op: one opaque node, p flattened into its schema
        out, lse, m_row, il_row = fwd_call(q, k, v, *p_args(p))
        return out, lse, (m_row, il_row)
    # eager: the op's body on the same arguments, without flattening p and rebuilding it
    return _kernels(_FWD).attn_fwd(q, k, v, p)


def backward(dout, q, k, v, out, saved, p):
    if torch.compiler.is_compiling():
        m_row, il_row = saved
        return bwd_call(dout, q, k, v, out, m_row, il_row, *p_args(p))
    return _kernels(_FWD + "_bwd").attn_bwd(dout, q, k, v, out, saved, p)


class TritonAttention(Backend):
    doc = "mmfast's Triton flash attention (every mask and feature)"
    forward = staticmethod(forward)
    backward = staticmethod(backward)

    def supports(self, facts: Facts):
        d = facts.get("head_dim")
        if d is not None and not 1 <= d <= MAX_HEAD_DIM:
            return [f"head dim {d} is outside 1..{MAX_HEAD_DIM}"]
        return []


TRITON = TritonAttention(devices=("cuda",), needs=("triton",))
INTERPRET = TritonAttention(devices=("cpu",), needs=("triton_interpret",))
