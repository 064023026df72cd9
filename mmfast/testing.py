"""Helpers for error-bound tests (used by tests/ and the GPU suite).

The rule: a kernel's error against a high-precision reference may be at most ``factor`` times
PyTorch's own error when it computes the same function in the kernel's dtype, plus a small ``atol``
for values that PyTorch happens to compute exactly.
"""
from __future__ import annotations

import weakref

import torch

from mmfast.utils.debug import poison_  # noqa: F401  (tests import it from here)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_error_bound(
    out: torch.Tensor,
    ref: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """Require ``max|out - ref| <= factor * max|torch_lowp - ref| + atol``.

    ``ref`` is computed in fp64 (or fp32), ``torch_lowp`` by PyTorch in the kernel's dtype.
    ``atol`` defaults to a few ulps of the reference's magnitude in the output dtype.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output or overflow)"
    if atol is None:
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        atol = 4 * eps * max(scale, 1e-3)
    err = max_err(out, ref)
    bound = factor * max_err(torch_lowp, ref) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (torch lowp error x{factor} + {atol:.1e})"


class LiveBytes:
    """Peak bytes of tensor storage allocated *inside* the ``with`` block and alive at once, on any
    device, counted from the tensors torch's dispatcher hands out (a ``TorchDispatchMode``): what the
    code path keeps alive, independent of a caching allocator. An op's output that shares storage
    with one of its inputs (a view, an in-place or ``out=`` op) is not new memory; it keeps a tracked
    storage alive as long as it lives.

        with LiveBytes() as lb:
            loss = fn(x); loss.backward()
        lb.peak  # bytes
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                flat_in = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
                for t in (*args, *kwargs.values()):
                    if isinstance(t, (tuple, list)):
                        flat_in += [u for u in t if isinstance(u, torch.Tensor)]
                inputs = {t.untyped_storage().data_ptr() for t in flat_in}
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t, inputs)
                return out

        self._mode = _Mode()
        self._refs: dict[int, int] = {}
        self._size: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key in inputs and key not in self._refs:
            return  # an alias of memory allocated before the block
        if key not in self._refs:
            self._refs[key] = 0
            self._size[key] = storage.nbytes()
            self.current += self._size[key]
            self.peak = max(self.peak, self.current)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._size.pop(key)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def sm90_usage(kernel, ptr_types, consts: dict, num_warps: int, num_stages: int = 1,
               floats: tuple[str, ...] = ()) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of ``kernel`` compiled by Triton for sm_90, no GPU needed.

    ``ptr_types``: each ``*_ptr`` argument's Triton type (``"*bf16"``, ...), a dict or a function of the name;
    ``consts``: the constexpr arguments; other arguments are ``fp32`` when named in ``floats``, else ``i32``.
    A stack above 0 means register spills. Run it in a process without ``TRITON_INTERPRET=1``."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = ptr_types.get if isinstance(ptr_types, dict) else ptr_types
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr(name)
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


class favoured_token:
    """``with favoured_token(llm, token):`` greedy decoding of ``llm`` (a causal LM with ``lm_head``) picks
    ``token`` wherever it is allowed: the head is swapped for a copy with a bias of 1e4 on that logit, and put
    back on exit. ``.head`` is the copy (move the bias to another token with :meth:`favour`)."""

    def __init__(self, llm, token: int):
        self.llm, self.token = llm, token

    def favour(self, token: int) -> None:
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[token] = 1e4

    def __enter__(self):
        self.old = self.llm.lm_head
        self.head = torch.nn.Linear(self.old.in_features, self.old.out_features, bias=True)
        with torch.no_grad():
            self.head.weight.copy_(self.old.weight)
        self.favour(self.token)
        self.llm.lm_head = self.head
        return self

    def __exit__(self, *exc):
        self.llm.lm_head = self.old
        return False


# --------------------------------------------------------------------------- multi-process test harness
def _rank_worker(rank, world, port, outdir, run_case, cases):
    """One rank: joins a gloo group, runs ``run_case(*case, rank)`` for each case and saves
    ``{case: result or traceback text}`` to ``outdir/rank<rank>.pt``; stops at the first failure (a failed
    collective may leave the ranks out of step)."""
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for case in cases:
        try:
            results[case] = run_case(*case, rank)
        except Exception:  # noqa: BLE001  (reported to the parent as a traceback)
            results[case] = traceback.format_exc()
            break
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(run_case, cases, world: int, outdir: str, timeout_s: float = 300.0) -> list[dict]:
    """Spawn ``world`` gloo ranks on this machine, each running every case of ``cases`` through
    ``run_case(*case, rank)`` (a module-level function: the ranks import it); one ``{case: result}`` dict
    per rank, a failed case's value being its traceback text. Fails the test when the ranks have not
    finished within ``timeout_s`` (a deadlock), killing them."""
    import os
    import time

    import pytest
    import torch.multiprocessing as mp

    from mmfast.utils.ports import free_port  # below the ephemeral range: no outgoing connection takes it

    ctx = mp.spawn(_rank_worker, args=(world, free_port(), outdir, run_case, list(cases)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s:.0f} s (deadlock?)")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def rank_result(results: list[dict], rank: int, case):
    """``run_ranks``' result of ``case`` on ``rank``; fails the test, with the rank's traceback, when the
    case raised or was not reached."""
    import pytest

    got = results[rank].get(case)
    if got is None:
        pytest.fail(f"rank {rank} did not reach case {case} (an earlier case failed)")
    if isinstance(got, str):
        pytest.fail(f"rank {rank} raised in case {case}:\n{got}")
    return got


def has_cpp_kernel(name: str) -> bool:
    """Whether ``mmfast._C`` loads and has ``name`` (tests of a C++ kernel skip without it)."""
    from mmfast.ops._env import cpp_extension

    try:
        return hasattr(cpp_extension(), name)
    except Exception:  # noqa: BLE001 - no extension at all
        return False


# --------------------------------------------------------------------------- recipe (CLI) tests
def synthetic_world(tmp_path_factory, name: str, *args, **kwargs):
    """A fresh folder ``tmp_path_factory.mktemp(name)`` filled by
    ``mmfast.data.synthetic.make_world(folder, *args, **kwargs)``; returns the folder."""
    from mmfast.data.synthetic import make_world

    out = tmp_path_factory.mktemp(name)
    make_world(out, *args, **kwargs)
    return out


def run_cli(root, args, *, env: dict, timeout: float, ok: bool = True, err_tail: int = 3000):
    """``python -m mmfast.cli ARGS`` (each one through ``str``) in ``root`` with ``env``, output captured;
    returns the ``CompletedProcess``. With ``ok``, asserts exit status 0, the message being the last 3000
    characters of stdout and the last ``err_tail`` of stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmfast.cli", *map(str, args)], check=False, cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-err_tail:]
    return proc
