"""``mmfast bench host``: the host (CPU-side) time of every op's forward + backward, next to PyTorch's
native op of the same kind, in one process. No GPU needed.

How. The process runs with ``TRITON_INTERPRET=1`` (set before mmfast is imported; the command re-executes
itself when it was not), so every kernel path runs on CPU tensors through the ``triton_interpret``
backend, and every Triton launch is replaced by a no-op (``InterpretedFunction.run`` stubbed): what is
left is exactly our host work — argument checks, backend selection, the autograd Function, the custom-op
shims, allocations, reshapes and the torch ops around the kernels — plus one ``kernel[grid](...)``
call per launch. The native op (``F.layer_norm``, ``F.rms_norm``, ``F.scaled_dot_product_attention``,
``F.cross_entropy``, ...) runs its real CPU kernels on the same tiny shapes — (batch, sequence, width)
activations as a model passes them, 16 rows — where their compute is a few µs: its time is its dispatcher + autograd host cost plus that small compute, so the ratio slightly
flatters nobody but us when shapes grow (keep them tiny).

Not included: Triton's own launcher (argument binding, cache lookup, ``cuLaunchKernel``) per launch —
the ``launches`` column counts them (multiply by the launcher's µs on the target GPU), and the native
side's CUDA launches (one per native kernel).

Measurement: ``--reps`` timed fwd + bwd calls per provider, interleaved in blocks (ours, native, ours, ...)
so drift hits both; the median per call in µs. Gradients via ``torch.autograd.grad`` (no ``.grad``
accumulation on either side). Target: ours ≤ 1.5× native per op (``ok`` column).

    mmfast bench host [--ops layer_norm,rms_norm,...] [--reps 300] [--out CSV]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TARGET = 1.5


def _interpret_ready() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    d = sys.modules.get("mmfast.ops._env")
    return d is None or getattr(d, "_INTERPRET_AT_IMPORT", False)


# --------------------------------------------------------------------------- the cases
def cases(be: str = "triton_interpret", device: str = "cpu"):
    """name -> (ours(*inputs) -> outputs, native(*inputs) -> outputs, make() -> inputs, what native is), ours
    on backend ``be``; inputs on ``device`` (tests reuse these for torch.compile and CUDA-graph capture)."""
    import torch
    import torch.nn.functional as F

    import mmfast.ops as O
    from mmfast.ops import llama as L

    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    M, N = 16, 256

    def add_then_norm(s, w):
        return F.rms_norm(s, (N,), w, 1e-6), s

    def symmetric_ce(z):
        t = torch.arange(z.shape[0], device=z.device)
        return (F.cross_entropy(z, t) + F.cross_entropy(z.t(), t)) / 2
    B, S, H, HK, D = 1, 16, 4, 2, 64
    T, HID, V = 16, 64, 128
    I = 128

    def qk():
        q = r(B, S, H * D).view(B, S, H, D).transpose(1, 2)
        k = r(B, S, HK * D).view(B, S, HK, D).transpose(1, 2)
        ang = torch.rand(B, S, D // 2, generator=g)
        ang = torch.cat((ang, ang), -1).to(device)
        return q, k, ang.cos(), ang.sin()

    table: dict[str, tuple[Callable, Callable, Callable, str]] = {
        "layer_norm": (
            lambda x, w, b: O.layer_norm(x, w, b, 1e-5, backend=be),
            lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5),
            lambda: (r(2, M // 2, N), r(N), r(N)), "F.layer_norm"),
        "rms_norm": (
            lambda x, w: O.rms_norm(x, w, 1e-6, backend=be),
            lambda x, w: F.rms_norm(x, (N,), w, 1e-6),
            lambda: (r(2, M // 2, N), r(N)), "F.rms_norm"),
        "add_rms_norm": (
            lambda x, res, w: O.rms_norm(x, w, 1e-6, res, backend=be),
            lambda x, res, w: add_then_norm(x + res, w),
            lambda: (r(2, M // 2, N), r(2, M // 2, N), r(N)), "x + r, F.rms_norm"),
        "rotary_embedding": (
            lambda q, k, c, s: L.rotary_embedding(q, k, c, s, backend=be),
            lambda q, k, c, s: (q * c[:, None] + rotate_half(q) * s[:, None], k * c[:, None] + rotate_half(k) * s[:, None]),
            qk, "HF apply_rotary_pos_emb (eager composition)"),
        "swiglu": (
            lambda a, b: L.swiglu(a, b, backend=be),
            lambda a, b: F.silu(a) * b,
            lambda: (r(2, T // 2, I), r(2, T // 2, I)), "F.silu(g) * u"),
        "swiglu_down": (
            lambda a, b, w: L.swiglu_down(a, b, w, backend=be),
            lambda a, b, w: F.linear(F.silu(a) * b, w),
            lambda: (r(2, T // 2, I), r(2, T // 2, I), r(HID, I)), "F.linear(F.silu(g) * u, W)"),
        "flash_attention": (
            lambda q, k, v: O.flash_attn_func(q, k, v, causal=True, backend=be),
            lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2),
            lambda: (r(B, S, H, D), r(B, S, H, D), r(B, S, H, D)), "F.scaled_dot_product_attention"),
        "fused_linear_cross_entropy": (
            lambda h, w, t: O.fused_linear_cross_entropy(h, w, t, backend=be),
            lambda h, w, t: F.cross_entropy(F.linear(h, w), t),
            lambda: (r(T, HID), r(V, HID), torch.randint(0, V, (T,), generator=g).to(device)),
            "F.cross_entropy(F.linear(h, W), t)"),
        "clip_loss": (
            lambda a, b: O.clip_loss(a, b, 10.0, backend=be),
            lambda a, b: symmetric_ce(10.0 * a @ b.t()),
            lambda: (r(T, HID), r(T, HID)), "2 x F.cross_entropy over s·A Bᵀ"),
        "mlp_projector": (
            lambda x, w1, b1, w2, b2: O.mlp_projector(x, [(w1, b1), (w2, b2)], "gelu", backend=be),
            lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
            lambda: (r(T, HID), r(I, HID), r(I), r(HID, I), r(HID)), "F.linear, F.gelu, F.linear"),
        "linear_l2_normalize": (
            lambda x, w: O.linear_l2_normalize(x, w, backend=be),
            lambda x, w: F.normalize(F.linear(x, w), dim=-1, eps=1e-6),
            lambda: (r(T, HID), r(HID, HID)), "F.normalize(F.linear(x, W))"),
    }
    return table


# --------------------------------------------------------------------------- measurement
class _Stub:
    """Every Triton launch becomes a no-op (counted)."""

    def __init__(self):
        self.launches = 0

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._cls, self._orig = InterpretedFunction, InterpretedFunction.run
        stub = self

        def run(fn_self, *args, grid=None, warmup=False, **kwargs):
            stub.launches += 1

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig
        return False


def fwd_bwd_step(fn, make):
    import torch

    inputs = make()
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out0 = fn(*inputs)
    outs0 = out0 if isinstance(out0, tuple) else (out0,)
    grads = [torch.ones_like(o) for o in outs0 if isinstance(o, torch.Tensor) and o.requires_grad]

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.grad(outs, diff, grads)

    return step


def _time(step, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        step()
        ts.append((time.perf_counter_ns() - t0) / 1e3)
    return ts


def measure(names=None, reps: int = 300, block: int = 25, log=print) -> list[dict]:
    """One dict per op: ours/native median µs of a fwd + bwd call, ratio, launches per call."""
    import torch

    table = cases()
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {list(table)}")
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is single-threaded; keeps the native ops' tiny kernels comparable
    try:
        return _measure(table, names, reps, block, log, rows)
    finally:
        torch.set_num_threads(threads)


def _measure(table, names, reps, block, log, rows):
    with _Stub() as stub:
        for name in names:
            ours_fn, native_fn, make, native_what = table[name]
            ours, native = fwd_bwd_step(ours_fn, make), fwd_bwd_step(native_fn, make)
            for _ in range(10):  # warm-up (first-call imports, caches)
                ours()
                native()
            before = stub.launches
            ours()
            launches = stub.launches - before
            t_ours, t_native = [], []
            for _ in range(max(1, reps // block)):
                t_ours += _time(ours, block)
                t_native += _time(native, block)
            mo, mn = statistics.median(t_ours), statistics.median(t_native)
            row = {"op": name, "ours_us": mo, "native_us": mn, "ratio": mo / mn if mn else math.nan,
                   "launches": launches, "native": native_what}
            row["ok"] = row["ratio"] <= TARGET
            rows.append(row)
            log(f"{name:<28} ours {mo:8.1f} us  native {mn:8.1f} us  ratio {row['ratio']:5.2f}  "
                f"{'ok  ' if row['ok'] else 'MISS'}  launches {launches}  (native: {native_what})")
    return rows


def _write_csv(rows, path: Path) -> Path:
    import datetime as _dt

    import torch

    from mmfast.bench import harness

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"device": harness.device_name("cpu"), "torch": torch.__version__, "triton": harness._triton_version()}
    out = []
    for r in rows:
        for prov, us in (("mmfast", r["ours_us"]), ("native", r["native_us"])):
            out.append(harness.Row(
                date=stamp, bench="host", provider=prov if prov == "mmfast" else f"native:{r['native']}",
                mode=f"host fwd+bwd {r['op']}", x_name="launches", x=int(r["launches"]) if prov == "mmfast" else 0,
                params=f"op={r['op']};ratio={r['ratio']:.3f};target={TARGET}", median_ms=us / 1e3,
                peak_mem_mib=math.nan, tflops=math.nan, gbps=math.nan, error="", mem_method="", **env))
    return harness.append_csv(path, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmfast bench host", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", help="comma-separated subset (default: all)")
    p.add_argument("--reps", type=int, default=300, help="timed calls per provider and op")
    p.add_argument("--out", help="CSV path (default benchmarks/results/host_<cpu>.csv); 'none' for no file")
    a = p.parse_args(argv)
    if not _interpret_ready():
        # Triton decides at decoration time whether a kernel is interpreted: start over with the variable set.
        env = {**os.environ, "TRITON_INTERPRET": "1", "MMFAST_ATTN_AUTOTUNE": os.environ.get("MMFAST_ATTN_AUTOTUNE", "0")}
        return subprocess.call([sys.executable, "-m", "mmfast.bench.host",
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    names = [n.strip() for n in a.ops.split(",") if n.strip()] if a.ops else None
    try:
        rows = measure(names, a.reps)
    except ValueError as e:
        print(f"mmfast bench host: {e}", file=sys.stderr)
        return 2
    misses = [r["op"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(misses)}/{len(rows)} ops within {TARGET}x of the native op's host time"
          + (f"; over: {', '.join(misses)}" if misses else ""))
    if (a.out or "").lower() != "none":
        from mmfast.bench import harness

        path = harness.results_csv(a, "host", "cpu")
        print(f"wrote {_write_csv(rows, path)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MMFAST_ATTN_AUTOTUNE", "0")
    sys.exit(main())
