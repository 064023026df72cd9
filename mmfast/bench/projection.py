"""``mmfast bench projection``: the fused projection ops against PyTorch (eager and compiled) and Liger.

Two sweeps (``--op``); the LayerNorm sweep is ``mmfast bench norm`` (:mod:`mmfast.bench.norm`), and
``--op layernorm`` here still runs it, forwarded there:

* ``flce``       LM head + cross-entropy: hidden (T, H), weight (V, H), targets (T,) with 10% ignored.
                 x = T. FLOPs: forward 2·T·H·V, forward + backward 6·T·H·V (logits, dhidden, dweight).
* ``projector``  LLaVA's mlp2x_gelu: x (M, K) → Linear(K, N) → GELU → Linear(N, N). x = M tokens.
                 FLOPs: forward 2·M·(K·N + N·N), forward + backward three times that.

Modes: ``fwd`` runs the forward with autograd recording (what a training step's forward holds);
``fwd+bwd`` adds ``torch.autograd.grad`` w.r.t. every input and parameter, with a random output
gradient made before the step (so no reduction kernel is timed). Memory is the harness's
"peak extra over what was allocated before the step": inputs are allocated before, so it counts the
step's temporaries *and* the gradients it returns (for ``flce`` fwd+bwd, the dweight and dhidden
buffers alone are ``(V·H + T·H)·elt`` bytes; the log prints the peak net of them).

Providers: ``mmfast-<backend>`` (``triton`` on CUDA, ``reference`` — the chunked plain-PyTorch path
— on CPU), ``torch-eager``, ``torch-compile`` and ``liger`` (Liger-Kernel's fused linear
cross-entropy, when installed). For ``flce`` two more mmfast rows show its knobs:
``mmfast-<backend>-c64`` (64 MiB logits chunks instead of CUDA's default 256: less memory, four
times the passes over the fp32 dW sum) and ``mmfast-<backend>-bf16dw`` (``dweight_fp32=False``: no fp32 (V, H)
buffer, one rounding of dW per chunk); for ``projector``, ``mmfast-<backend>-recompute`` recomputes
the GELU in backward instead of storing it.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from mmfast.bench import harness

DTYPES = harness.DTYPES
# name -> (x_key, GPU cases, GPU quick, CPU cases, CPU quick); each case is a dict of sizes.
SWEEPS = {
    "flce": ("T", [{"T": t, "H": 4096, "V": 32064} for t in (2048, 4096, 8192, 16384)],
             [{"T": 8192, "H": 4096, "V": 32064}],
             [{"T": t, "H": 512, "V": 32000} for t in (1024, 4096)], [{"T": 512, "H": 256, "V": 8000}]),
    "projector": ("M", [{"M": m, "K": 1024, "N": 4096} for m in (9216, 36864, 73728)],
                  [{"M": 36864, "K": 1024, "N": 4096}],
                  [{"M": m, "K": 256, "N": 1024} for m in (576, 2304)], [{"M": 576, "K": 128, "N": 512}]),
}


# --------------------------------------------------------------------------- inputs
def _flce_inputs(case):
    g = harness.seeded(case)
    T, H, V = case["T"], case["H"], case["V"]
    h = harness.param((T, H), case, g)
    w = harness.param((V, H), case, g, H ** -0.5)
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.rand(T, generator=g) < 0.1] = -100
    return [h, w], t.to(case["device"])


def _projector_inputs(case):
    g = harness.seeded(case)
    M, K, N = case["M"], case["K"], case["N"]
    p = harness.param
    return [p((M, K), case, g), p((N, K), case, g, K ** -0.5), p((N,), case, g),
            p((N, N), case, g, N ** -0.5), p((N,), case, g)], None


INPUTS = {"flce": _flce_inputs, "projector": _projector_inputs}


# --------------------------------------------------------------------------- the functions compared
def eager_flce(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def eager_projector(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


EAGER = {"flce": eager_flce, "projector": eager_projector}


def _mmfast_fn(op, backend, chunk_mib=None, **kw):
    if op == "flce":
        from mmfast.ops._flce import chunk_rows
        from mmfast.ops.projection import fused_linear_cross_entropy

        def rows(h, w):  # None: the library's default budget for the device
            return chunk_rows(h.shape[0], w.shape[0], h.element_size(), chunk_mib << 20) if chunk_mib else None

        return lambda h, w, t: fused_linear_cross_entropy(h, w, t, backend=backend, chunk_size=rows(h, w), **kw)
    from mmfast.ops.projection import mlp_projector

    return lambda x, w1, b1, w2, b2: mlp_projector(x, [(w1, b1), (w2, b2)], "gelu", backend=backend, **kw)


def _liger_fn(op):
    if op == "flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, t: loss(w, h, t)
    raise RuntimeError(f"Liger-Kernel has no fused {op}")


def _setup(op, make_fn):
    return harness.grad_setup(INPUTS[op], make_fn)


def _table(op: str, device: str) -> dict:
    fused = "triton" if device == "cuda" else "reference"
    table = {
        f"mmfast-{fused}": _setup(op, lambda: _mmfast_fn(op, fused)),
        "torch-eager": _setup(op, lambda: EAGER[op]),
        "torch-compile": _setup(op, lambda: torch.compile(EAGER[op], dynamic=False)),
    }
    if op == "flce":  # the memory/time knobs: smaller chunks (more fp32 dW passes), dW summed in bf16
        table[f"mmfast-{fused}-c64"] = _setup(op, lambda: _mmfast_fn(op, fused, chunk_mib=64))
        table[f"mmfast-{fused}-bf16dw"] = _setup(op, lambda: _mmfast_fn(op, fused, dweight_fp32=False))
    if op == "projector":  # the GELU output recomputed in backward instead of stored
        table[f"mmfast-{fused}-recompute"] = _setup(op, lambda: _mmfast_fn(op, fused, recompute=True))
    if op == "flce":
        table["liger"] = _setup(op, lambda: _liger_fn(op))
    return table


def providers(op: str, device: str, names: list[str] | None = None) -> dict:
    table = _table(op, device)
    if names:
        known = set().union(*(_table(o, device) for o in SWEEPS))  # a name of any sweep is valid
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; choose from {sorted(known)}")
        table = {n: table[n] for n in names if n in table}  # flce-only / liger-less sweeps skip theirs
    return table


def flops(op: str):
    def f(case, mode):
        if op == "flce":
            fwd = 2.0 * case["T"] * case["H"] * case["V"]
        elif op == "projector":
            fwd = 2.0 * case["M"] * (case["K"] * case["N"] + case["N"] * case["N"])
        else:
            return math.nan
        return fwd if mode == "fwd" else 3 * fwd

    return f


def bytes_moved(op: str):
    return lambda case, mode: math.nan


def grads_mib(op: str, case: dict) -> float:
    """MiB of the gradients the fwd+bwd step returns (part of the measured peak)."""
    elt = DTYPES[case["dtype"]].itemsize
    if op == "flce":
        n = case["V"] * case["H"] + case["T"] * case["H"]
    else:
        n = case["M"] * case["K"] + case["N"] * case["K"] + case["N"] * case["N"] + 2 * case["N"]
    return n * elt / 2**20


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    return harness.sweeps_parser("projection", SWEEPS, __doc__.split("\n\n")[0], extra_ops=("layernorm",))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.op == "layernorm":  # the sweep moved to its family's module
        from mmfast.bench import norm

        return norm.main(argv)
    return harness.run_sweeps("projection", SWEEPS, args, providers=providers, flops=flops,
                              bytes_moved=bytes_moved, grads_mib=grads_mib)


if __name__ == "__main__":
    sys.exit(main())
