"""One benchmark harness for every ``mmfast bench ...`` command.

A benchmark supplies *providers* (name -> ``setup(case, mode) -> step``) and *cases* (dicts of
sizes). ``setup`` allocates inputs (not timed) and returns a zero-argument ``step`` that runs one
forward (mode ``"fwd"``) or forward + backward (``"fwd+bwd"``); what a mode means exactly is the
benchmark's to document. :func:`run` measures every (case, mode, provider) side by side in this
process and returns :class:`Row` s, appends them to a CSV and draws a PNG.

Measurements
* time: CUDA — median of ``triton.testing.do_bench(step, return_mode="median")`` (CUDA-event
  timing with L2 flush); CPU — median wall-clock of ``reps`` calls after ``warmup`` calls.
* memory, "peak extra" over what was allocated before the step: CUDA —
  ``torch.cuda.max_memory_allocated()`` delta (method ``cuda_max_allocated``); CPU — resident-set
  high-water delta (method ``rss_hwm``): freed heap is returned with ``malloc_trim``, the kernel's
  peak-RSS counter is reset through ``/proc/self/clear_refs`` and ``VmHWM`` is read after one step.
  It counts every allocator (torch, BLAS, the C++ extension), with page granularity; NaN where
  ``/proc`` is not writable.
* throughput: ``TFLOP/s = flops(case, mode) / time`` and ``GB/s = bytes(case, mode) / time`` from
  the benchmark's explicit formulas (blank when it gives none).

A provider that fails (missing package, OOM, unsupported shape) becomes a row with ``error`` set;
after an OOM the same provider and mode skip the later cases (list cases smallest first).
Providers run one after the other, each over every case and mode; ``budget_s`` caps the whole
sweep, shared fairly: each provider may use an equal part of what is left, and the rows past its
part are recorded as skipped.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import gc
import io
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mmfast.utils.io import atomic_open

Step = Callable[[], object]
Setup = Callable[[dict, str], Step]
Formula = Callable[[dict, str], float]


@dataclass
class Row:
    date: str
    bench: str
    provider: str
    mode: str
    x_name: str
    x: int
    params: str
    median_ms: float
    peak_mem_mib: float
    tflops: float
    gbps: float
    error: str
    device: str
    torch: str
    triton: str
    mem_method: str


COLUMNS = [f.name for f in fields(Row)]


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{_cpu_model() or 'cpu'} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """File-name form of the device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu {_cpu_model()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001  (any import failure just means "not available")
        return "n/a"


# --------------------------------------------------------------------------- measurement
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _cpu_peak_mib(step: Step) -> float:
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)  # give freed heap back, so reused pages are not invisible to the RSS count
    try:
        base = _vm_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        return math.nan
    step()
    return max(0, _vm_kib("VmHWM") - base) / 1024


def _cuda_peak_mib(step: Step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(step: Step, device: str, *, warmup: int = 2, reps: int = 5, max_s: float = 10.0) -> tuple[float, float]:
    """(median ms, peak extra MiB) of ``step`` on ``device`` (see the module docstring).

    CPU: at most ``reps`` timed calls, fewer when they would exceed ``max_s`` (at least 1).
    """
    step()  # first call: compilation, autotuning, lazy init
    _sync(device)
    if device == "cuda":
        peak = _cuda_peak_mib(step)
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(step, return_mode="median")), peak
        times = []
        for _ in range(max(reps, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), peak
    peak = _cpu_peak_mib(step)
    for _ in range(max(0, warmup - 2)):
        step()
    times, t_end = [], time.perf_counter() + max_s
    while len(times) < reps and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------- CLI pieces
MODES = ("fwd", "fwd+bwd")


def add_common_args(p: argparse.ArgumentParser, bench: str, out_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments every ``mmfast bench <bench>`` takes: --gpu/--cpu, --providers, --modes,
    --budget-s, --out (``out_help`` when the default CSV path is not ``{bench}_<device>.csv``) and
    --no-plot. Read them back with :func:`pick_device`, :func:`modes_of`, :func:`provider_names`."""
    add_device_args(p)
    p.add_argument("--providers", help="comma-separated subset of providers")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--budget-s", type=float, help="stop measuring after this many seconds (rest: skipped rows)")
    p.add_argument("--out", help=out_help or f"CSV path (default benchmarks/results/{bench}_<device>.csv)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def add_device_args(p: argparse.ArgumentParser, helps: bool = True) -> argparse.ArgumentParser:
    """--gpu / --cpu, mutually exclusive (``helps=False``: without help texts). Read with :func:`pick_device`."""
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true", help="run on CUDA (default when available)" if helps else None)
    dev.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available" if helps else None)
    return p


def add_train_step_args(p: argparse.ArgumentParser, bench: str, providers_default: str | None = None,
                        providers_help: str | None = None) -> argparse.ArgumentParser:
    """The arguments after a train-step benchmark's own (``benchmarks/bench_train_*.py``):
    --grad-checkpointing, --providers, --budget-s, --reps, --out and --no-plot. Read with
    :func:`train_step_sweep`."""
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--providers", default=providers_default, help=providers_help)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help=f"CSV path (default benchmarks/results/{bench}_<device>.csv)")
    p.add_argument("--no-plot", action="store_true")
    return p


def add_rounds_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--threads, --reps and --rounds of a benchmark that runs every provider over several rounds
    (:func:`run_rounds`, :func:`best_of_rounds`)."""
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every provider this many times, the order reversed each round; the summary takes "
                        "each provider's best median (on a shared machine the later runs are often faster)")
    return p


def int_list(text: str | None, default: str, flag: str = "--batch") -> list[int] | None:
    """Comma-separated integers (``default`` when ``text`` is empty). None (after saying why on stderr)
    when one is not an integer: the caller exits with status 2."""
    try:
        return [int(x) for x in (text or default).split(",") if x.strip()]
    except ValueError:
        print(f"{flag} must be comma-separated integers, got {text!r}", file=sys.stderr)
        return None


def unknown_providers(names: list[str], known: Iterable[str], prog: str) -> bool:
    """True (after saying which on stderr) when a name in ``names`` is not in ``known``: the caller
    exits with status 2."""
    known = list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"{prog}: unknown providers {unknown}; known: {', '.join(known)}", file=sys.stderr)
    return bool(unknown)


def select_providers(table: dict, names: list[str] | None) -> dict:
    """``table`` restricted to ``names`` in their order (all of it when ``names`` is empty); ``SystemExit``
    naming the unknown ones and the known ones when a name is not in it."""
    if not names:
        return table
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(table)}")
    return {n: table[n] for n in names}


def pick_device(args: argparse.Namespace, prog: str) -> str | None:
    """"cuda" for --gpu or, without --cpu, when CUDA is available; else "cpu". None (after saying
    why on stderr) when --gpu is given without CUDA: the caller exits with status 2."""
    if args.gpu and not torch.cuda.is_available():
        print(f"{prog}: --gpu given but torch.cuda is not available", file=sys.stderr)
        return None
    return "cuda" if (args.gpu or (torch.cuda.is_available() and not args.cpu)) else "cpu"


def parse_device(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    """``p.parse_args(argv)`` and its :func:`pick_device` (``p.prog`` names the program in the message)."""
    args = p.parse_args(argv)
    return args, pick_device(args, p.prog)


def sweep_cli(p: argparse.ArgumentParser, argv: list[str] | None,
              sweep: Callable[[argparse.Namespace, str, list[str]], int]) -> int:
    """A sweep CLI's main (arguments from :func:`add_common_args`): ``sweep(args, device, modes)`` after
    :func:`parse_device` and :func:`modes_of`, its exit status returned; 2 (after saying why on stderr)
    when --gpu is given without CUDA or --modes is wrong."""
    args, device = parse_device(p, argv)
    modes = None if device is None else modes_of(args)
    return 2 if modes is None else sweep(args, device, modes)


def parse_rounds(p: argparse.ArgumentParser, argv: list[str] | None, known: Iterable[str],
                 cpu_skip: Iterable[str] = ()) -> tuple[argparse.Namespace, str, list[str]] | None:
    """A rounds benchmark's arguments (:func:`add_common_args`, :func:`add_rounds_args`): ``(args, device,
    names)`` from :func:`parse_device`, with --threads applied (``torch.set_num_threads``) and the
    providers of --providers (default: every name in ``known`` but, on CPU, those in ``cpu_skip``).
    None (after saying why on stderr) when --gpu is given without CUDA or a provider is not in
    ``known``: the caller exits with status 2."""
    args, device = parse_device(p, argv)
    if device is None:
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    known, cpu_skip = list(known), set(cpu_skip)
    names = provider_names(args) or [n for n in known if device == "cuda" or n not in cpu_skip]
    if unknown_providers(names, known, p.prog):
        return None
    return args, device, names


def results_csv(args: argparse.Namespace, stem: str, device: str,
                folder: str | os.PathLike = "benchmarks/results") -> Path:
    """The CSV a benchmark appends to: --out when given, else ``<folder>/<stem>_<device>.csv``
    (:func:`device_slug`)."""
    return Path(args.out) if args.out else Path(folder) / f"{stem}_{device_slug(device)}.csv"


def modes_of(args: argparse.Namespace) -> list[str] | None:
    """--modes as a list (empty items dropped). None (after saying why on stderr) when one is not in
    :data:`MODES`: the caller exits with status 2."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        print(f"--modes must be fwd and/or fwd+bwd, got {args.modes!r}", file=sys.stderr)
        return None
    return modes


def provider_names(args: argparse.Namespace) -> list[str] | None:
    """--providers as a list, None when not given (the benchmark's default set)."""
    return [n.strip() for n in args.providers.split(",")] if args.providers else None


# --------------------------------------------------------------------------- sweep
def train_step_sweep(bench: str, table: dict[str, Setup], names: list[str], batches: list[int], case: dict,
                     args: argparse.Namespace, device: str) -> list[Row] | None:
    """A train-step benchmark's sweep: providers ``names`` (from ``table``) over ``batches``, mode
    ``train_step``, each case ``{"batch": b, **case, "dtype", "device", "grad_ckpt"}``, rows appended to
    ``--out`` or ``benchmarks/results/{bench}_<device>.csv``. None (after saying why on stderr) when a
    name is unknown or a batch size not positive: the caller exits with status 2."""
    unknown = [n for n in names if n not in table]
    if unknown or not batches or min(batches) <= 0:
        print(f"bad arguments: providers {unknown or names} (known {list(table)}), batches {batches}", file=sys.stderr)
        return None
    cases = [{"batch": b, **case, "dtype": "bf16" if device == "cuda" else "fp32", "device": device,
              "grad_ckpt": args.grad_checkpointing} for b in batches]
    out = results_csv(args, bench, device)
    return run(bench, {n: table[n] for n in names}, cases, x_key="batch", device=device,
               modes=("train_step",), budget_s=args.budget_s, out_csv=out, plot=not args.no_plot,
               reps=args.reps, warmup=2, max_s=60.0)


def train_step(opt, loss_of: Callable[[], torch.Tensor]) -> Step:
    """A train-step benchmark's ``step``: ``loss_of()``, backward, ``opt.step()``, gradients set to None;
    returns the loss."""
    def step():
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_rounds(bench: str, names: list[str], setup_of: Callable[[str], Setup], case: dict, *, x_key: str,
               device: str, modes: Iterable[str], args: argparse.Namespace,
               out: str | os.PathLike) -> list[Row]:
    """:func:`run` ``args.rounds`` times (at least once) over the one ``case``, the providers' order
    reversed each round, the plot drawn after the last round only (and not with --no-plot)."""
    rows = []
    for k in range(max(1, args.rounds)):
        order = names if k % 2 == 0 else names[::-1]
        rows += run(bench, {n: setup_of(n) for n in order}, [case], x_key=x_key, device=device, modes=modes,
                    budget_s=args.budget_s, out_csv=out, plot=not args.no_plot and k == args.rounds - 1,
                    reps=args.reps, warmup=2)
    return rows


def best_of_rounds(rows: list[Row]) -> dict[tuple[str, str], Row]:
    """(provider, mode) -> that pair's fastest row without error (a row with error where all failed)."""
    by = {}
    for r in rows:
        best = by.get((r.provider, r.mode))
        if best is None or best.error or (not r.error and r.median_ms < best.median_ms):
            by[r.provider, r.mode] = r
    return by


def run(
    bench: str,
    providers: dict[str, Setup],
    cases: Iterable[dict],
    *,
    x_key: str,
    device: str,
    modes: Iterable[str] = ("fwd", "fwd+bwd"),
    flops: Formula | None = None,
    bytes_moved: Formula | None = None,
    budget_s: float | None = None,
    out_csv: str | os.PathLike | None = None,
    plot: bool = True,
    log: Callable[[str], None] = print,
    **measure_kw,
) -> list[Row]:
    """Measure every (case, mode, provider); append the rows to ``out_csv`` and plot them beside it."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"device": device_name(device), "torch": torch.__version__, "triton": _triton_version()}
    mem_method = "cuda_max_allocated" if device == "cuda" else "rss_hwm"
    cases = list(cases)
    t_start, oom_at, rows = time.monotonic(), {}, []
    for k, (name, setup) in enumerate(providers.items()):
        # Fair share: each provider gets an equal part of what is left, so a slow one (say a
        # compiler) cannot starve the others; time it does not use rolls over to the next.
        t_prov = time.monotonic()
        share = None if budget_s is None else (budget_s - (t_prov - t_start)) / (len(providers) - k)
        for case in cases:
            params = ";".join(f"{key}={v}" for key, v in case.items())
            for mode in modes:
                ms = mem = math.nan
                err = ""
                if share is not None and time.monotonic() - t_prov > share:
                    err = f"skipped: time budget ({share:.0f}s of {budget_s:.0f}s) spent"
                elif (name, mode) in oom_at:
                    err = f"skipped: out of memory at {x_key}={oom_at[name, mode]}"
                else:
                    try:
                        step = setup(case, mode)
                        ms, mem = measure(step, device, **measure_kw)
                    except Exception as e:  # noqa: BLE001  (a failing provider is a result, not a crash)
                        err = _short_error(e)
                        if _is_oom(e):
                            oom_at[name, mode] = case[x_key]
                    finally:
                        step = None
                        gc.collect()
                        if device == "cuda":
                            torch.cuda.empty_cache()
                f = flops(case, mode) if flops and not err else math.nan
                b = bytes_moved(case, mode) if bytes_moved and not err else math.nan
                row = Row(
                    date=stamp, bench=bench, provider=name, mode=mode, x_name=x_key, x=int(case[x_key]),
                    params=params, median_ms=ms, peak_mem_mib=mem,
                    tflops=f / (ms * 1e-3) / 1e12 if not math.isnan(f) else math.nan,
                    gbps=b / (ms * 1e-3) / 1e9 if not math.isnan(b) else math.nan,
                    error=err, mem_method=mem_method, **env,
                )
                rows.append(row)
                log(format_row(row))
    if out_csv is not None:
        path = append_csv(out_csv, rows)
        log(f"wrote {len(rows)} rows to {path}")
        if plot:
            png = plot_rows(rows, Path(path).with_suffix(".png"), title=f"{bench} on {env['device']}")
            if png:
                log(f"plot: {png}")
    return rows


# --------------------------------------------------------------------------- output
def _fmt(v: float, spec: str) -> str:
    return "-" if math.isnan(v) else format(v, spec)


def format_row(r: Row) -> str:
    head = f"{r.bench:<12} {r.mode:<8} {r.x_name}={r.x:<8} {r.provider:<18}"
    if r.error:
        return f"{head} {r.error}"
    return (
        f"{head} {_fmt(r.median_ms, '10.3f')} ms  {_fmt(r.peak_mem_mib, '9.1f')} MiB  "
        f"{_fmt(r.tflops, '8.4f')} TFLOP/s"
    )


def format_table(rows: list[Row]) -> str:
    return "\n".join(format_row(r) for r in rows)


def append_csv(path: str | os.PathLike, rows: list[Row]) -> Path:
    """Append rows (rewriting the file atomically). A file with other columns is left alone and the
    rows go to a new file beside it, whose path is returned."""
    path = Path(path)
    old = ""
    if path.exists():
        old = path.read_text()
        header = old.splitlines()[0].split(",") if old else []
        if header and header != COLUMNS:
            path = path.with_name(f"{path.stem}.{_dt.datetime.now():%Y%m%d-%H%M%S}{path.suffix}")
            old = ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if not old:
        w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()})
    with atomic_open(path, "w") as f:
        f.write(old + buf.getvalue())
    return path


def plot_rows(rows: list[Row], png: str | os.PathLike, title: str = "") -> Path | None:
    """Time and peak memory vs size, one line per provider, one row of panels per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = list(dict.fromkeys(r.mode for r in rows))
    if not modes:
        return None
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (key, label) in enumerate((("median_ms", "median time (ms)"), ("peak_mem_mib", "peak extra memory (MiB)"))):
            ax = axes[i][j]
            for prov in dict.fromkeys(r.provider for r in rows):
                pts = [(r.x, getattr(r, key)) for r in rows if r.mode == mode and r.provider == prov and not r.error]
                pts = [(x, y) for x, y in pts if not math.isnan(y) and y > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(rows[0].x_name)
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {label.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return png


__all__ = [
    "COLUMNS", "MODES", "Row", "add_common_args", "add_device_args", "add_rounds_args", "add_train_step_args",
    "append_csv", "best_of_rounds", "device_name", "device_slug", "format_table", "int_list", "measure", "modes_of",
    "parse_device", "parse_rounds", "pick_device", "plot_rows", "provider_names", "results_csv", "run",
    "run_rounds", "sweep_cli", "train_step", "train_step_sweep", "unknown_providers",
]


# --------------------------------------------------------------------------- an op family's sweeps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seeded(case: dict) -> torch.Generator:
    """A CPU generator seeded by the case's integer sizes (the same inputs for every provider)."""
    return torch.Generator(device="cpu").manual_seed(sum(int(v) for v in case.values() if isinstance(v, int)))


def param(shape, case: dict, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A leaf ``randn(*shape) * scale`` in the case's dtype on its device, requiring grad."""
    t = torch.randn(*shape, generator=g) * scale
    return t.to(case["device"], DTYPES[case["dtype"]]).requires_grad_()


def grad_setup(inputs: Callable[[dict], tuple[list, object]], make_fn: Callable[[], Callable]) -> Setup:
    """A :data:`Setup` for ``fn = make_fn()`` on ``inputs(case) -> (params, target or None)``: mode "fwd" runs
    ``fn(*params[, target])``, "fwd+bwd" adds ``torch.autograd.grad`` w.r.t. the params with a random output
    gradient made before the step (not timed or counted)."""
    def setup(case, mode):
        fn = make_fn()
        params, target = inputs(case)
        args = params + ([target] if target is not None else [])
        grad_out = None
        if mode == "fwd+bwd":
            with torch.no_grad():
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


def sweeps_parser(family: str, sweeps: dict, description: str, extra_ops: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The CLI of ``mmfast bench <family>`` over ``sweeps`` (name -> (x_key, GPU cases, GPU quick, CPU cases,
    CPU quick)): the common arguments, --op, --quick, --dtype, --size and --out-dir."""
    p = argparse.ArgumentParser(prog=f"mmfast bench {family}", description=description)
    add_common_args(p, family, out_help="one CSV for every sweep instead of one per sweep under "
                    "--out-dir (its PNG shows the last sweep)")
    p.add_argument("--op", default="all", choices=["all", *sweeps, *extra_ops], help="which sweep (default: all)")
    p.add_argument("--quick", action="store_true", help="one case per sweep (the GPU targets' shapes on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="CPU default fp32, GPU bf16")
    p.add_argument("--size", action="append", default=[],
                   help="override a size of every case, e.g. --size T=4096 --size V=32000")
    p.add_argument("--out-dir", default="benchmarks/results", help="CSV/PNG directory (one CSV per sweep)")
    return p


def run_sweeps(family: str, sweeps: dict, args: argparse.Namespace, *, providers, flops, bytes_moved,
               grads_mib) -> int:
    """``mmfast bench <family>``'s main after parsing (:func:`sweeps_parser`): each chosen sweep through
    :func:`run`, bench ``<family>-<op>``, CSV ``--out`` or ``<out-dir>/<family>_<op>_<device>.csv``; the
    per-op callables take the op name (``providers(op, device, names)``, ``flops(op)``, ``bytes_moved(op)``,
    ``grads_mib(op, case)``). Exit status: 0 when a row was measured, 1 when none, 2 on bad arguments."""
    prog = f"mmfast bench {family}"
    device = pick_device(args, prog)
    if device is None:
        return 2
    gpu = device == "cuda"
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    modes = modes_of(args)
    if modes is None:
        return 2
    overrides = {}
    for s in args.size:
        k, _, v = s.partition("=")
        if not v.isdigit() or int(v) <= 0:
            print(f"--size must look like NAME=positive_int, got {s!r}", file=sys.stderr)
            return 2
        overrides[k.strip()] = int(v)
    names = provider_names(args)
    ok = False
    t0 = time.monotonic()
    ops = list(sweeps) if args.op == "all" else [args.op]
    for i, op in enumerate(ops):
        x_key, g_cases, g_quick, c_cases, c_quick = sweeps[op]
        base = (g_quick if args.quick else g_cases) if gpu else (c_quick if args.quick else c_cases)
        bad = [k for k in overrides if k not in base[0]]
        if bad and args.op != "all":
            print(f"--size {bad} not a size of {op} (sizes: {list(base[0])})", file=sys.stderr)
            return 2
        cases = [{**c, **{k: v for k, v in overrides.items() if k in c}, "dtype": dtype, "device": device}
                 for c in base]
        cases = list({tuple(sorted(c.items())): c for c in cases}.values())
        out = results_csv(args, f"{family}_{op}", device, args.out_dir)
        # Each sweep gets an equal share of what is left, so the first cannot starve the others.
        budget = None if args.budget_s is None else \
            max(0.0, args.budget_s - (time.monotonic() - t0)) / (len(ops) - i)
        table = providers(op, device, names)
        if names is None and not gpu:
            table.pop("torch-compile", None)  # the first compile alone dominates a CPU sweep
        rows = run(
            f"{family}-{op}", table, cases, x_key=x_key, device=device, modes=modes, flops=flops(op),
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
