"""``mmfast bench norm``: the fused norms against PyTorch (eager and compiled) and Liger.

One sweep (``--op``):

* ``layernorm``  LayerNorm over (M, N) rows with weight and bias. x = M. Bytes: forward reads x and
                 writes y (2·M·N·elt), the backward reads x, dy and writes dx (3·M·N·elt).

Modes, memory and the CLI as in :mod:`mmfast.bench.projection` (the shared driver is
:func:`mmfast.bench.harness.run_sweeps`): ``fwd`` runs the forward with autograd recording, ``fwd+bwd`` adds
``torch.autograd.grad`` w.r.t. x, weight and bias with a random output gradient made before the step; the
peak counts the step's temporaries and the gradients it returns. CSV: bench ``norm-layernorm``,
``benchmarks/results/norm_layernorm_<device>.csv`` unless ``--out`` (``mmfast bench projection --op
layernorm`` forwards here).

Providers: ``mmfast-<backend>`` (``triton`` on CUDA, ``reference`` on CPU), ``torch-eager``,
``torch-compile`` and ``liger`` (Liger-Kernel's LayerNorm, when installed).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from mmfast.bench import harness

# name -> (x_key, GPU cases, GPU quick, CPU cases, CPU quick); each case is a dict of sizes.
SWEEPS = {
    "layernorm": ("M", [{"M": m, "N": 1024} for m in (9232, 36928, 147712)], [{"M": 36928, "N": 1024}],
                  [{"M": m, "N": 1024} for m in (4616, 18464)], [{"M": 2308, "N": 1024}]),
}


def _layernorm_inputs(case):
    g = harness.seeded(case)
    M, N = case["M"], case["N"]
    return [harness.param((M, N), case, g), harness.param((N,), case, g), harness.param((N,), case, g)], None


def eager_layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _mmfast_fn(backend):
    from mmfast.ops.norm import layer_norm

    return lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=backend)


def _liger_fn():
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)


def providers(op: str, device: str, names: list[str] | None = None) -> dict:
    fused = "triton" if device == "cuda" else "reference"
    table = {
        f"mmfast-{fused}": harness.grad_setup(_layernorm_inputs, lambda: _mmfast_fn(fused)),
        "torch-eager": harness.grad_setup(_layernorm_inputs, lambda: eager_layernorm),
        "torch-compile": harness.grad_setup(_layernorm_inputs, lambda: torch.compile(eager_layernorm, dynamic=False)),
        "liger": harness.grad_setup(_layernorm_inputs, _liger_fn),
    }
    return harness.select_providers(table, names)


def flops(op: str):
    return lambda case, mode: math.nan


def bytes_moved(op: str):
    def b(case, mode):
        elt = harness.DTYPES[case["dtype"]].itemsize
        return (2 if mode == "fwd" else 5) * case["M"] * case["N"] * elt

    return b


def grads_mib(op: str, case: dict) -> float:
    """MiB of the gradients the fwd+bwd step returns (part of the measured peak)."""
    return (case["M"] * case["N"] + 2 * case["N"]) * harness.DTYPES[case["dtype"]].itemsize / 2**20


def _parser() -> argparse.ArgumentParser:
    return harness.sweeps_parser("norm", SWEEPS, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return harness.run_sweeps("norm", SWEEPS, args, providers=providers, flops=flops, bytes_moved=bytes_moved,
                              grads_mib=grads_mib)


if __name__ == "__main__":
    sys.exit(main())
