"""One dispatcher for every op: which backend runs a call, and why the others were refused.

Backends, in order of preference:

* ``triton``            Triton kernels on CUDA tensors.
* ``triton_interpret``  the same Triton kernels run by Triton's interpreter on CPU tensors; only when
                        ``TRITON_INTERPRET=1`` was set before mmfast was imported (Triton decides at
                        decoration time whether a kernel is compiled or interpreted).
* ``cpp``               the C++ extension ``mmfast._C`` (CPU tensors, OpenMP).
* ``reference``         plain PyTorch, any device. The CPU fallback and the test oracle.

Each op registers the backends it implements plus an op-specific ``supports`` function returning
the reasons a backend cannot take a given call (dtype, head dim, ...). ``select`` picks the first
backend with no reasons; a forced backend with reasons raises :class:`BackendUnavailableError`
naming them. Nothing falls back silently.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

BACKENDS = ("triton", "triton_interpret", "cpp", "reference")

# Read once, at import: this is what Triton itself does when it decorates our kernels.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=...``) but cannot run this call."""


@dataclass(frozen=True)
class Facts:
    """What a backend needs to know about a call: the device, dtype and op-specific extras."""

    device: str  # "cpu" | "cuda" | ...
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @staticmethod
    def of(tensors: Sequence[torch.Tensor], **extra) -> Facts:
        t = [x for x in tensors if isinstance(x, torch.Tensor)]
        if not t:
            raise ValueError("dispatch needs at least one tensor argument")
        return Facts(device=t[0].device.type, dtype=t[0].dtype, extra=extra)


# --------------------------------------------------------------------------- environment probes
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


def _cpp_import_error() -> str | None:
    try:
        cpp_extension()
    except Exception as e:  # noqa: BLE001 - a stale or broken build must become a reason, not a crash
        return f"the C++ extension mmfast._C is not built or failed to load ({type(e).__name__}: {e})"
    return None


def environment_reasons(backend: str, facts: Facts) -> list[str]:
    """Reasons, independent of the op, why ``backend`` cannot run on ``facts``."""
    reasons: list[str] = []
    if backend == "triton":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        if facts.device != "cuda":
            reasons.append(f"needs CUDA tensors, got device '{facts.device}'")
        elif not torch.cuda.is_available():
            reasons.append("torch.cuda is not available")
        if _INTERPRET_AT_IMPORT:
            reasons.append("TRITON_INTERPRET=1 is set: kernels were decorated for the interpreter")
    elif backend == "triton_interpret":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        if not _INTERPRET_AT_IMPORT:
            reasons.append("TRITON_INTERPRET=1 was not set when mmfast was imported")
        if facts.device != "cpu":
            reasons.append(f"the interpreter runs on CPU tensors, got device '{facts.device}'")
    elif backend == "cpp":
        err = _cpp_import_error()
        if err:
            reasons.append(err)
        if facts.device != "cpu":
            reasons.append(f"the C++ kernels run on CPU tensors, got device '{facts.device}'")
    elif backend == "reference":
        pass
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return reasons


# --------------------------------------------------------------------------- op registry
SupportsFn = Callable[[str, Facts], Iterable[str]]


@dataclass
class Op:
    """An op with its backends. ``impls`` maps backend name → its implementation (a callable or a
    module path: the op module decides how to call it); a backend absent from ``impls`` is refused."""

    name: str
    impls: dict[str, object] = field(default_factory=dict)
    supports: SupportsFn | None = None
    # Facts used by `mmfast info` when no call is at hand (per device).
    example: Callable[[str], Facts] | None = None

    def reasons(self, backend: str, facts: Facts) -> list[str]:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        reasons = environment_reasons(backend, facts)
        if self.supports is not None:
            reasons.extend(self.supports(backend, facts))
        return reasons

    def refusals(self, facts: Facts) -> dict[str, list[str]]:
        return {b: self.reasons(b, facts) for b in BACKENDS}

    def select(self, facts: Facts, backend: str | None = None) -> str:
        if backend is None:
            backend = _forced_from_env()
        if backend is not None:
            reasons = self.reasons(backend, facts)
            if reasons:
                raise BackendUnavailableError(
                    f"backend '{backend}' cannot run {self.name} "
                    f"(device={facts.device}, dtype={facts.dtype}): " + "; ".join(reasons)
                )
            return backend
        refused = {}
        for b in BACKENDS:
            r = self.reasons(b, facts)
            if not r:
                return b
            refused[b] = r
        raise BackendUnavailableError(  # only when even `reference` refuses (unsupported input)
            f"no backend can run {self.name}: "
            + "; ".join(f"{b}: {', '.join(r)}" for b, r in refused.items())
        )

    def impl(self, backend: str) -> object:
        return self.impls[backend]


def _forced_from_env() -> str | None:
    """``MMFAST_BACKEND=name`` forces a backend for every op (tests, debugging)."""
    b = os.environ.get("MMFAST_BACKEND") or None
    if b is not None and b not in BACKENDS:
        raise ValueError(f"MMFAST_BACKEND={b!r}; expected one of {BACKENDS}")
    return b


_REGISTRY: dict[str, Op] = {}

# Modules that register ops on import; `mmfast info` imports them all.
OP_MODULES = (
    "mmfast.ops.contrastive",
    "mmfast.ops.attention",
    "mmfast.ops.projection",
    "mmfast.ops.norm",
)


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


def register(op: Op) -> Op:
    _REGISTRY[op.name] = op
    return op


def get_op(name: str) -> Op:
    return _REGISTRY[name]


def registered_ops() -> dict[str, Op]:
    import importlib

    for m in OP_MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:  # a real import error inside an existing module
                raise
    return dict(_REGISTRY)


def check_backend_name(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected None or one of {BACKENDS}")


# --------------------------------------------------------------------------- `mmfast info`
def info_lines() -> list[str]:
    lines = [f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - `mmfast info` reports whatever failed
        lines.append(f"triton: not importable ({type(e).__name__})")
    lines.append(f"TRITON_INTERPRET at import: {'1' if _INTERPRET_AT_IMPORT else 'unset'}")
    err = _cpp_import_error()
    lines.append("mmfast._C: " + ("loaded" if err is None else err))
    cuda = torch.cuda.is_available()
    lines.append("cuda: " + (torch.cuda.get_device_name(0) if cuda else "not available"))
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for name, op in sorted(registered_ops().items()):
        for dev in devices:
            facts = op.example(dev) if op.example else Facts(dev, torch.float32)
            lines.append(f"\n{name} [{dev}, {str(facts.dtype).replace('torch.', '')}]")
            chosen = None
            for b in BACKENDS:
                r = op.reasons(b, facts)
                if not r and chosen is None:
                    chosen = b
                    lines.append(f"  * {b:<17} chosen")
                elif not r:
                    lines.append(f"    {b:<17} available (lower priority)")
                else:
                    lines.append(f"    {b:<17} refused: {'; '.join(r)}")
    return lines


def info_main(argv: list[str] | None = None) -> int:
    print("\n".join(info_lines()))
    return 0
