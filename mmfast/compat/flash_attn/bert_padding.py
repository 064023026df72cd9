"""``flash_attn.bert_padding``: move between padded (batch, seqlen, ...) tensors and the packed
(total_nnz, ...) layout the varlen functions take. Same signatures and returns as flash-attn 2.8;
plain PyTorch indexing (differentiable, any device)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis: (N, ...) -> (len(indices), ...)."""
    if input.dim() < 2:
        raise ValueError(f"input must be at least 2-D (N, ...), got shape {tuple(input.shape)}")
    return input.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero (first_axis_dim, ...) tensor with ``values`` at rows ``indices``."""
    if indices.dim() != 1 or values.shape[0] != indices.numel():
        raise ValueError(f"indices must be 1-D with one entry per row of values ({values.shape[0]}), got "
                         f"shape {tuple(indices.shape)}")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_put((indices,), values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Pack the valid tokens of ``hidden_states`` (batch, seqlen, ...).

    ``attention_mask`` (batch, seqlen), 1/True = valid; ``unused_mask`` marks tokens that are allocated
    but unused (kept in the packed tensor, not counted in ``seqused``). Returns (hidden_states
    (total_nnz, ...), indices (total_nnz,) into the flattened (batch·seqlen) positions, cu_seqlens
    (batch + 1,) int32, max_seqlen_in_batch int, seqused (batch,) int32)."""
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    selected = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens = selected.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = selected.flatten().nonzero().flatten()
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(seqlens.max()), seqused


def unpad_input_for_concatenated_sequences(hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor):
    """Pack several short samples concatenated in each row. ``attention_mask_in_length`` (batch, seqlen)
    lists each row's sample lengths first, then zeros (e.g. [2, 3, 0, 0, 0, 0]: samples of 2 and 3 tokens).
    Returns (hidden_states (total_nnz, ...), indices, cu_seqlens (n_samples + 1,) int32,
    max_seqlen_in_batch int), one varlen sequence per sample."""
    lengths = attention_mask_in_length
    seqlen = lengths.shape[-1]
    row_total = lengths.sum(dim=-1)
    valid = torch.arange(seqlen, device=lengths.device)[None, :] < row_total[:, None]
    flat_lengths = lengths.flatten()
    sample_lens = flat_lengths[flat_lengths.nonzero().flatten()]
    indices = valid.flatten().nonzero().flatten()
    cu_seqlens = F.pad(sample_lens.cumsum(0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(sample_lens.max())


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_nnz, ...) -> (batch, seqlen, ...) with zeros at padding."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]
