"""Facts about the machine that backends depend on, probed once: CUDA and its card family, Triton (compiled
or interpreted), the C++ extension. Tests replace them with :func:`fake_env`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch

NEEDS = ("triton", "triton_interpret", "cpp", "cuda")

# Read once, at import: this is what Triton itself does when it decorates our kernels.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Env:
    """Facts about the machine that backends depend on. ``arch``: the CUDA device family (``sm90``...),
    None without CUDA. ``triton_error``/``cpp_error``: why Triton / mmfast._C cannot load (None: they do)."""

    cuda_available: bool
    arch: str | None
    interpret: bool
    triton_error: str | None
    cpp_error: str | None
    torch_version: str = torch.__version__


def _triton_import_error() -> str | None:
    # Any failure (ImportError, a missing driver library's OSError, ...) becomes a refusal reason.
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def cpp_extension():
    """Return ``mmfast._C`` or raise ImportError with the reason."""
    from mmfast import _C  # built from csrc/ by `pip install` / `make`

    return _C


def cpp_missing(name: str, what: str) -> str | None:
    """The reason a backend gives when ``mmfast._C`` loads but has no ``name`` (it was built from an older
    csrc/); None when it has it, or when it does not load at all (that is the ``cpp`` need's own reason)."""
    try:
        ext = cpp_extension()
    except Exception:  # noqa: BLE001 - reported by the "cpp" need
        return None
    if hasattr(ext, name):
        return None
    return f"mmfast._C was built without {what}; rebuild it: python setup.py build_ext --inplace"


def _cpp_import_error() -> str | None:
    try:
        cpp_extension()
    except Exception as e:  # noqa: BLE001 - a stale or broken build must become a reason, not a crash
        return f"the C++ extension mmfast._C is not built or failed to load ({type(e).__name__}: {e})"
    return None


def _probe_env() -> Env:
    cuda = torch.cuda.is_available()
    arch = None
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"sm{major}{minor}"
    return Env(cuda, arch, _INTERPRET_AT_IMPORT, _triton_import_error(), _cpp_import_error())


_ENV: list[Env] = []  # probed on first use; fake_env pushes replacements


_ENV: list[Env] = []  # probed on first use; fake_env pushes replacements
_GENERATION = [0]  # bumped by every fake_env entry and exit: caches keyed on it never see a stale machine


def env() -> Env:
    if not _ENV:
        _ENV.append(_probe_env())
    return _ENV[-1]


def env_token() -> int:
    """Changes whenever :func:`fake_env` changes what :func:`env` returns (a cache key part)."""
    return _GENERATION[0]


@contextlib.contextmanager
def fake_env(**changes):
    """Pretend the machine differs (``cuda_available=True, arch="sm90"``, ``cpp_error="..."``...)."""
    _ENV.append(replace(env(), **changes))
    _GENERATION[0] += 1
    try:
        yield _ENV[-1]
    finally:
        _ENV.pop()
        _GENERATION[0] += 1


def device_family(device: str, e: Env | None = None) -> str:
    """The preference table's key for a device: ``cpu``, or the CUDA card's ``smXY``."""
    e = e or env()
    if device == "cuda":
        return e.arch or "cuda"
    return device


def need_reasons(need: str, e: Env | None = None) -> list[str]:
    """Reasons, independent of the op, why the machine lacks ``need`` (one of :data:`NEEDS`)."""
    e = e or env()
    reasons = []
    if need == "triton":
        if e.triton_error:
            reasons.append(e.triton_error)
        if not e.cuda_available:
            reasons.append("torch.cuda is not available")
        if e.interpret:
            reasons.append("TRITON_INTERPRET=1 is set: kernels were decorated for the interpreter")
    elif need == "triton_interpret":
        if e.triton_error:
            reasons.append(e.triton_error)
        if not e.interpret:
            reasons.append("TRITON_INTERPRET=1 was not set when mmfast was imported")
    elif need == "cpp":
        if e.cpp_error:
            reasons.append(e.cpp_error)
    elif need == "cuda":
        if not e.cuda_available:
            reasons.append("torch.cuda is not available")
    else:
        raise ValueError(f"unknown need {need!r}; expected one of {NEEDS}")
    return reasons

