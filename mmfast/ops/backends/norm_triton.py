"""LayerNorm / RMSNorm through the Triton kernels (:mod:`mmfast.ops._norm_triton`), behind
``mmfast::norm_fwd`` / ``mmfast::norm_bwd`` custom ops (:mod:`._norm_ops`) so torch.compile keeps one opaque
call per direction.

Contract (explicit backward; see :mod:`mmfast.ops.norm`)::

    forward(x (..., N), residual (..., N) | None, weight | None, bias | None, eps, is_rms)   # contiguous rows
        -> (y, s, stats)        # s: x + residual in residual's dtype (None or empty without one); stats (2, M) fp32
    backward(s, weight, dy, ds | None, stats, is_rms) -> (dx, dwb (2, N) fp32: dw, db)
"""
from __future__ import annotations

from mmfast.ops._dispatch import Backend, Facts
from mmfast.ops.backends._norm_ops import norm_ops

MAX_N = 65536
_K = []  # the kernel module's launchers, imported on the first call (not at this module's import)


def _kernels():
    if not _K:
        from mmfast.ops import _norm_triton

        _K.append(_norm_triton)
    return _K[0]


# the kernel module is looked up at the launch, so importing this module imports no Triton kernel
forward, backward, norm_fwd_call, norm_bwd_call = norm_ops(
    "norm", lambda *a: _kernels().norm_fwd(*a), lambda *a: _kernels().norm_bwd(*a))


class TritonNorm(Backend):
    doc = "Triton kernels, one row per program (fused residual add)"

    def supports(self, facts: Facts):
        n = facts.get("n")
        if n is not None and n > MAX_N:
            return [f"normalised size {n} > {MAX_N} (one row per program)"]
        return []

    forward = staticmethod(forward)
    backward = staticmethod(backward)


TRITON = TritonNorm(devices=("cuda",), needs=("triton",))
INTERPRET = TritonNorm(devices=("cpu",), needs=("triton_interpret",))
