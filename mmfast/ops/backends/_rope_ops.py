"""The rotary backends' custom ops, one pair per kernel: ``mmfast::<name>`` (new outputs; ``backward=True``
runs the transposed rotation) and ``mmfast::<name>_`` (q and k rotated in place). Each is one opaque node
under torch.compile and, in eager mode, its Python body called directly (:func:`mmfast.ops._host.eager_fast`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmfast.ops._host import eager_fast


def rope_ops(name: str, launch: Callable[..., None]):
    """``(forward, backward)`` of the rotary backend contract (:mod:`mmfast.ops.llama`) over
    ``launch(q, k, qo, ko, cos, sin, backward)``, which writes the rotation of q into qo and of k into ko
    (qo/ko may be q/k)."""

    @torch.library.custom_op(f"mmfast::{name}", mutates_args=())
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        launch(q, k, qo, ko, cos, sin, backward)
        return qo, ko

    @rope.register_fake
    def _(q, k, cos, sin, backward):
        return torch.empty_like(q), torch.empty_like(k)

    @torch.library.custom_op(f"mmfast::{name}_", mutates_args=("q", "k"))
    def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        launch(q, k, q, k, cos, sin, False)

    @rope_.register_fake
    def _(q, k, cos, sin):
        return None

    call, call_inplace = eager_fast(rope), eager_fast(rope_)

    def forward(q, k, cos, sin, inplace):
        if inplace:
            call_inplace(q, k, cos, sin)
            return q, k
        return call(q, k, cos, sin, False)

    def backward(dqo, dko, cos, sin):
        return call(dqo, dko, cos, sin, True)

    return forward, backward
