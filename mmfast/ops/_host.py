"""Host-side helpers for the op modules: integer arithmetic for kernel launches, autocast of the
inputs, and a cheap eager path for custom ops.

The integer helpers are plain Python on purpose: recent Triton makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
functions whose every host call unwraps its arguments (several µs each), and a norm or a small
epilogue launch is only a few µs of GPU time.
"""
from __future__ import annotations

import functools
import sys

import torch


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, n - 1).bit_length()


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` cast the float tensors (None passes through) to the autocast dtype, as a
    matmul such as ``F.linear`` would (differentiably); the kernels then run with autocast off.
    Outside autocast: unchanged."""
    t0 = next(t for t in tensors if t is not None)
    dev = t0.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing Dynamo when mmfast is imported (~1.2 s of a
    process's start, for every process that never compiles). Dynamo's decorator only marks the function
    (``fn._dynamo_marked_constant = True``; tests/ops/test_host_overhead.py checks that the two agree); when
    Dynamo is already loaded its own decorator runs."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def eager_fast(op):
    """``op`` (a ``torch.library.custom_op``) as torch.compile needs it, cheaper in eager mode.

    Under ``torch.compile`` the call goes through the custom op, which Dynamo traces as one opaque
    node. In eager mode it runs the op's Python body directly: the same function on the same
    arguments, without the dispatcher's round trip (schema checks and the Autograd-key redispatch),
    which cost about 50 µs a call here, more than a small norm kernel takes on a GPU. The ops wrapped
    this way are called inside an ``autograd.Function``, so autograd never sees them either way.
    """
    body = getattr(op, "_init_fn", None) or op

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return body(*args, **kwargs)

    call.op = op
    call.__name__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    return call



def once_differentiable(fn):
    """``torch.autograd.function.once_differentiable`` without its ``no_grad`` context when grad mode is
    already off (the engine runs a backward with grad mode off unless ``create_graph=True``): the same
    behaviour, including the error on a double backward, for 1-2 µs less per call."""
    guarded = torch.autograd.function.once_differentiable(fn)

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        if torch.is_grad_enabled():
            return guarded(ctx, *args)
        return fn(ctx, *args)

    return wrapper
