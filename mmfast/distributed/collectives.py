"""Collectives with autograd, for losses computed over a batch sharded across ranks.

Three building blocks, each an ``autograd.Function``:

* :func:`all_gather` — concatenate every rank's shard along dim 0. Backward is the adjoint: the
  gradient of the gathered tensor is summed over ranks and each rank keeps its own rows
  (a reduce-scatter). Shards may have different lengths (padded on the wire).
* :func:`grad_all_reduce` — identity forward; backward sums the gradient over ranks. For
  parameters replicated on every rank (logit scale, bias) that each rank uses in only its
  partial of a global sum.
* :func:`all_reduce_local_grad` — forward sums a value over ranks; backward passes the gradient
  to the local summand unchanged. Correct when every rank back-propagates the same upstream
  gradient (the result is the same global value everywhere): d(Σ_k p_k)/d p_r = 1.

Together: a rank computes its partial ``p_r`` from local and gathered tensors, and
``all_reduce_local_grad(p_r)`` is the global loss, whose gradients on every rank equal the ones
of a single process holding the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Renamed in recent PyTorch (the old names warn); same positional signature.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; a clear error when not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group() "
            "before using a distributed loss (or pass group=None for a single process)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(n: int, group, device: torch.device) -> list[int]:
    """Every rank's local length ``n`` (one tiny all-gather; the device must suit the backend)."""
    _, w = world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(w, dtype=torch.int64, device=device)
    _all_gather_into(out, mine, group)
    return [int(v) for v in out.tolist()]


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    w, m = len(sizes), max(sizes)
    if x.shape[0] < m:  # uneven shards travel padded to the longest one
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((w * m, *x.shape[1:]))
    _all_gather_into(out, x.contiguous(), group)
    if all(s == m for s in sizes):
        return out
    return torch.cat([out[i * m : i * m + s] for i, s in enumerate(sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        sizes, group = ctx.sizes, ctx.group
        rank, _ = world(group)
        m = max(sizes)
        if not all(s == m for s in sizes):
            pieces = g.split(sizes)
            g = torch.cat([torch.cat([p, p.new_zeros((m - p.shape[0], *p.shape[1:]))]) for p in pieces])
        out = g.new_empty((m, *g.shape[1:]))
        _reduce_scatter_into(out, g.contiguous(), dist.ReduceOp.SUM, group)
        return out[: sizes[rank]], None, None


def all_gather(x: torch.Tensor, group=None, sizes: list[int] | None = None, *, grad: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0: (n_r, ...) -> (Σ n_k, ...).

    ``sizes`` (every rank's length, from :func:`gather_sizes`) saves one collective when known.
    ``grad=False`` returns a detached result (no gradient reaches any shard).
    """
    if sizes is None:
        sizes = gather_sizes(x.shape[0], group, x.device)
    if not grad:
        with torch.no_grad():
            return _gather_padded(x.detach(), sizes, group)
    return _AllGather.apply(x, sizes, group)


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, dist.ReduceOp.SUM, ctx.group)
        return g, None


def grad_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity whose backward sums the gradient over ranks (for replicated parameters)."""
    return _GradAllReduce.apply(x, group)


class _AllReduceLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, dist.ReduceOp.SUM, group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def all_reduce_local_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over ranks of ``x``; the gradient flows to the local ``x`` unchanged (see module doc)."""
    return _AllReduceLocalGrad.apply(x, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity whose backward multiplies the gradient by ``factor``."""
    return _ScaleGrad.apply(x, float(factor))


__all__ = ["all_gather", "all_reduce_local_grad", "gather_sizes", "grad_all_reduce", "scale_grad", "world"]
