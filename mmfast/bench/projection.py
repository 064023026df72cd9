"""``mmfast bench projection``: the fused projection ops against PyTorch (eager and compiled) and Liger.

Three sweeps (``--op``):

* ``flce``       LM head + cross-entropy: hidden (T, H), weight (V, H), targets (T,) with 10% ignored.
                 x = T. FLOPs: forward 2·T·H·V, forward + backward 6·T·H·V (logits, dhidden, dweight).
* ``projector``  LLaVA's mlp2x_gelu: x (M, K) → Linear(K, N) → GELU → Linear(N, N). x = M tokens.
                 FLOPs: forward 2·M·(K·N + N·N), forward + backward three times that.
* ``layernorm``  LayerNorm over (M, N) rows with weight and bias. x = M. Bytes: forward reads x and
                 writes y (2·M·N·elt), the backward reads x, dy and writes dx (3·M·N·elt).

Modes: ``fwd`` runs the forward with autograd recording (what a training step's forward holds);
``fwd+bwd`` adds ``torch.autograd.grad`` w.r.t. every input and parameter, with a random output
gradient made before the step (so no reduction kernel is timed). Memory is the harness's
"peak extra over what was allocated before the step": inputs are allocated before, so it counts the
step's temporaries *and* the gradients it returns (for ``flce`` fwd+bwd, the dweight and dhidden
buffers alone are ``(V·H + T·H)·elt`` bytes; the log prints the peak net of them).

Providers: ``mmfast-<backend>`` (``triton`` on CUDA, ``reference`` — the chunked plain-PyTorch path
— on CPU), ``torch-eager``, ``torch-compile`` and ``liger`` (Liger-Kernel's fused linear
cross-entropy / LayerNorm, when installed). For ``flce`` two more mmfast rows show its knobs:
``mmfast-<backend>-c64`` (64 MiB logits chunks instead of CUDA's default 256: less memory, four
times the passes over the fp32 dW sum) and ``mmfast-<backend>-bf16dw`` (``dweight_fp32=False``: no fp32 (V, H)
buffer, one rounding of dW per chunk); for ``projector``, ``mmfast-<backend>-recompute`` recomputes
the GELU in backward instead of storing it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmfast.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name -> (x_key, GPU cases, GPU quick, CPU cases, CPU quick); each case is a dict of sizes.
SWEEPS = {
    "flce": ("T", [{"T": t, "H": 4096, "V": 32064} for t in (2048, 4096, 8192, 16384)],
             [{"T": 8192, "H": 4096, "V": 32064}],
             [{"T": t, "H": 512, "V": 32000} for t in (1024, 4096)], [{"T": 512, "H": 256, "V": 8000}]),
    "projector": ("M", [{"M": m, "K": 1024, "N": 4096} for m in (9216, 36864, 73728)],
                  [{"M": 36864, "K": 1024, "N": 4096}],
                  [{"M": m, "K": 256, "N": 1024} for m in (576, 2304)], [{"M": 576, "K": 128, "N": 512}]),
    "layernorm": ("M", [{"M": m, "N": 1024} for m in (9232, 36928, 147712)], [{"M": 36928, "N": 1024}],
                  [{"M": m, "N": 1024} for m in (4616, 18464)], [{"M": 2308, "N": 1024}]),
}


# --------------------------------------------------------------------------- inputs
def _gen(case):
    return torch.Generator(device="cpu").manual_seed(sum(int(v) for v in case.values() if isinstance(v, int)))


def _param(shape, case, g, scale=1.0):
    t = torch.randn(*shape, generator=g) * scale
    return t.to(case["device"], DTYPES[case["dtype"]]).requires_grad_()


def _flce_inputs(case):
    g = _gen(case)
    T, H, V = case["T"], case["H"], case["V"]
    h = _param((T, H), case, g)
    w = _param((V, H), case, g, H ** -0.5)
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.rand(T, generator=g) < 0.1] = -100
    return [h, w], t.to(case["device"])


def _projector_inputs(case):
    g = _gen(case)
    M, K, N = case["M"], case["K"], case["N"]
    return [_param((M, K), case, g), _param((N, K), case, g, K ** -0.5), _param((N,), case, g),
            _param((N, N), case, g, N ** -0.5), _param((N,), case, g)], None


def _layernorm_inputs(case):
    g = _gen(case)
    M, N = case["M"], case["N"]
    return [_param((M, N), case, g), _param((N,), case, g), _param((N,), case, g)], None


INPUTS = {"flce": _flce_inputs, "projector": _projector_inputs, "layernorm": _layernorm_inputs}


# --------------------------------------------------------------------------- the functions compared
def eager_flce(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def eager_projector(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def eager_layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


EAGER = {"flce": eager_flce, "projector": eager_projector, "layernorm": eager_layernorm}


def _mmfast_fn(op, backend, chunk_mib=None, **kw):
    if op == "flce":
        from mmfast.ops._flce import chunk_rows
        from mmfast.ops.projection import fused_linear_cross_entropy

        def rows(h, w):  # None: the library's default budget for the device
            return chunk_rows(h.shape[0], w.shape[0], h.element_size(), chunk_mib << 20) if chunk_mib else None

        return lambda h, w, t: fused_linear_cross_entropy(h, w, t, backend=backend, chunk_size=rows(h, w), **kw)
    if op == "projector":
        from mmfast.ops.projection import mlp_projector

        return lambda x, w1, b1, w2, b2: mlp_projector(x, [(w1, b1), (w2, b2)], "gelu", backend=backend, **kw)
    from mmfast.ops.norm import layer_norm

    return lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=backend)


def _liger_fn(op):
    if op == "flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, t: loss(w, h, t)
    if op == "layernorm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    raise RuntimeError(f"Liger-Kernel has no fused {op}")


def _setup(op, make_fn):
    def setup(case, mode):
        fn = make_fn()
        params, target = INPUTS[op](case)
        args = params + ([target] if target is not None else [])
        grad_out = None
        if mode == "fwd+bwd":
            with torch.no_grad():  # the output's gradient, made before the step (not timed or counted)
                probe = fn(*args)
                grad_out = torch.randn_like(probe) if probe.dim() else torch.ones_like(probe)
                del probe

        def step():
            out = fn(*args)
            if mode == "fwd+bwd":
                return torch.autograd.grad(out, params, grad_outputs=grad_out)
            return out

        return step

    return setup


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
    if op != "projector":
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
    def b(case, mode):
        if op != "layernorm":
            return math.nan
        elt = DTYPES[case["dtype"]].itemsize
        return (2 if mode == "fwd" else 5) * case["M"] * case["N"] * elt

    return b


def grads_mib(op: str, case: dict) -> float:
    """MiB of the gradients the fwd+bwd step returns (part of the measured peak)."""
    elt = DTYPES[case["dtype"]].itemsize
    if op == "flce":
        n = case["V"] * case["H"] + case["T"] * case["H"]
    elif op == "projector":
        n = case["M"] * case["K"] + case["N"] * case["K"] + case["N"] * case["N"] + 2 * case["N"]
    else:
        n = case["M"] * case["N"] + 2 * case["N"]
    return n * elt / 2**20


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast bench projection", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "projection", out_help="one CSV for every sweep instead of one per sweep under "
                            "--out-dir (its PNG shows the last sweep)")
    p.add_argument("--op", default="all", choices=["all", *SWEEPS], help="which sweep (default: all)")
    p.add_argument("--quick", action="store_true", help="one case per sweep (the GPU targets' shapes on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="CPU default fp32, GPU bf16")
    p.add_argument("--size", action="append", default=[],
                   help="override a size of every case, e.g. --size T=4096 --size V=32000")
    p.add_argument("--out-dir", default="benchmarks/results", help="CSV/PNG directory (one CSV per sweep)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = harness.pick_device(args, "mmfast bench projection")
    if device is None:
        return 2
    gpu = device == "cuda"
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    modes = harness.modes_of(args)
    if modes is None:
        return 2
    overrides = {}
    for s in args.size:
        k, _, v = s.partition("=")
        if not v.isdigit() or int(v) <= 0:
            print(f"--size must look like NAME=positive_int, got {s!r}", file=sys.stderr)
            return 2
        overrides[k.strip()] = int(v)
    names = harness.provider_names(args)
    ok = False
    t0 = time.monotonic()
    ops = list(SWEEPS) if args.op == "all" else [args.op]
    for i, op in enumerate(ops):
        x_key, g_cases, g_quick, c_cases, c_quick = SWEEPS[op]
        base = (g_quick if args.quick else g_cases) if gpu else (c_quick if args.quick else c_cases)
        bad = [k for k in overrides if k not in base[0]]
        if bad and args.op != "all":
            print(f"--size {bad} not a size of {op} (sizes: {list(base[0])})", file=sys.stderr)
            return 2
        cases = [{**c, **{k: v for k, v in overrides.items() if k in c}, "dtype": dtype, "device": device}
                 for c in base]
        cases = list({tuple(sorted(c.items())): c for c in cases}.values())
        out = Path(args.out) if args.out else Path(args.out_dir) / f"projection_{op}_{harness.device_slug(device)}.csv"
        # Each sweep gets an equal share of what is left, so the first cannot starve the others.
        budget = None if args.budget_s is None else \
            max(0.0, args.budget_s - (time.monotonic() - t0)) / (len(ops) - i)
        table = providers(op, device, names)
        if names is None and not gpu:
            table.pop("torch-compile", None)  # the first compile alone dominates a CPU sweep
        rows = harness.run(
            f"projection-{op}", table, cases, x_key=x_key, device=device, modes=modes, flops=flops(op),
            bytes_moved=bytes_moved(op), budget_s=budget, out_csv=out, plot=not args.no_plot,
            **({"reps": 2, "max_s": 3.0} if not gpu else {}),
        )
        for r in rows:
            if r.mode == "fwd+bwd" and not r.error:
                case = next(c for c in cases if c[x_key] == r.x)
                print(f"  {op} {r.provider} {x_key}={r.x}: peak {r.peak_mem_mib:.0f} MiB, "
                      f"{r.peak_mem_mib - grads_mib(op, case):.0f} MiB beyond the returned gradients")
        ok = ok or any(not r.error for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
