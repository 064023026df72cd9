"""The backend side of the contract (see :mod:`mmfast.ops._dispatch`): :class:`Facts` about a call, and
:class:`Backend` objects saying what they run and why they refuse a call."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmfast.ops._env import Env, cpp_missing, need_reasons

# Every backend name an op may register (``backend=`` accepts these; ops refuse the ones they lack).
BACKENDS = (
    "triton", "triton_interpret", "gemm", "gemm_interpret", "cpp",
    "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "flash_attn",
    "torch", "reference",
)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=...``) but cannot run this call."""


class _Autograd:
    """``Backend.backward = AUTOGRAD``: the forward is differentiable PyTorch; autograd runs its backward."""

    def __repr__(self):
        return "AUTOGRAD"

    def __bool__(self):
        return False


AUTOGRAD = _Autograd()


@dataclass(frozen=True)
class Facts:
    """What the backends need to know about a call: device, dtype, and op-specific ``extra`` (head dim,
    masks, sequence lengths, whether gradients are needed, ...; each family documents its keys)."""

    device: str  # "cpu" | "cuda" | ...
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @staticmethod
    def of(tensors: Sequence[torch.Tensor], **extra) -> Facts:
        t = [x for x in tensors if isinstance(x, torch.Tensor)]
        if not t:
            raise ValueError("dispatch needs at least one tensor argument")
        return Facts(device=t[0].device.type, dtype=t[0].dtype, extra=extra)

    def get(self, key, default=None):
        return self.extra.get(key, default)

    def key(self) -> tuple:
        """A hashable form (torch.compile passes it to a constant-folded selection)."""
        return (self.device, self.dtype, tuple(sorted(self.extra.items())))

    @staticmethod
    def from_key(key: tuple) -> Facts:
        return Facts(key[0], key[1], dict(key[2]))


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def _device_phrase(devices: tuple[str, ...]) -> str:
    if devices == ("cuda",):
        return "needs CUDA tensors"
    if devices == ("cpu",):
        return "runs on CPU tensors only"
    return "runs on " + "/".join(devices) + " tensors"


# --------------------------------------------------------------------------- backends
class Backend:
    """A backend of one op; see the module docstring for the contract. Subclass it (or instantiate it
    with keyword arguments) and override :meth:`supports`, ``forward`` and ``backward``."""

    name: str = ""  # set by Op.add
    devices: tuple[str, ...] | None = ("cpu", "cuda")  # None: any device
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    needs: tuple[str, ...] = ()
    # (attribute of mmfast._C, what it is): refused, naming the rebuild, when the extension loads without it
    cpp_kernel: tuple[str, str] | None = None
    doc: str = ""
    forward: Callable | None = None
    backward: Callable | _Autograd | None = AUTOGRAD

    def __init__(self, **attrs):
        for k, v in attrs.items():
            if not hasattr(type(self), k) and k not in ("check",):
                raise TypeError(f"Backend has no attribute {k!r}")
            setattr(self, k, v)

    def supports(self, facts: Facts) -> Iterable[str]:
        check = getattr(self, "check", None)
        return check(facts) if check is not None else ()

    def reasons(self, facts: Facts, e: Env | None = None) -> list[str]:
        reasons = []
        if self.devices is not None and facts.device not in self.devices:
            reasons.append(f"{_device_phrase(self.devices)}, got device '{facts.device}'")
        if facts.dtype not in self.dtypes:
            reasons.append(f"dtype {_dtype_name(facts.dtype)} is not one of "
                           + "/".join(_dtype_name(d) for d in self.dtypes))
        for need in self.needs:
            reasons.extend(need_reasons(need, e))
        if self.cpp_kernel is not None:
            stale = cpp_missing(*self.cpp_kernel)
            if stale:
                reasons.append(stale)
        reasons.extend(self.supports(facts))
        return reasons

    def __repr__(self):
        return f"<backend {self.name or type(self).__name__}>"


class KernelBackend(Backend):
    """A backend whose functions live in a module (imported on first use): ``forward``/``backward`` name
    module attributes, and ``functions`` any others the family's contract asks for (``module`` is also
    returned by :meth:`impl`, for families whose contract is a set of module functions)."""

    module: str = ""
    fwd_name: str = ""
    bwd_name: str = ""

    def __init__(self, module: str, forward: str | None = None, backward: str | None = None, **attrs):
        super().__init__(**attrs)
        self.module = module
        self.fwd_name, self.bwd_name = forward or "", backward or ""

    _mod = None

    def impl(self):
        # cached: after the first call (selection makes it) this is an attribute read, which
        # torch.compile traces (it cannot trace importlib)
        if self._mod is None:
            self._mod = importlib.import_module(self.module)
        return self._mod

    def supports(self, facts: Facts) -> Iterable[str]:
        reasons = list(super().supports(facts))
        err = _module_error(self.module)
        if err:
            reasons.append(err)
        else:
            self.impl()
        return reasons

    @property
    def forward(self):
        return getattr(self.impl(), self.fwd_name) if self.fwd_name else None

    @property
    def backward(self):
        return getattr(self.impl(), self.bwd_name) if self.bwd_name else AUTOGRAD


_MODULE_ERRORS: dict[str, str | None] = {}


def _module_error(module: str) -> str | None:
    if module not in _MODULE_ERRORS:
        try:
            importlib.import_module(module)
            _MODULE_ERRORS[module] = None
        except Exception as e:  # noqa: BLE001 - a broken module (ImportError, a driver's OSError) is a reason
            _MODULE_ERRORS[module] = f"module {module} failed to import ({type(e).__name__}: {e})"
    return _MODULE_ERRORS[module]


class _Unloadable(Backend):
    """Stands for a registered backend whose module failed to import: it refuses every call."""

    def __init__(self, why: str):
        super().__init__()
        self.why = why

    def reasons(self, facts, e=None):
        return [self.why]


class LegacyBackend(Backend):
    """A backend registered the old way (``Op(name, impls={backend: target})``): the environment the name
    implies (``triton``: CUDA + compiled Triton; ``triton_interpret``: CPU + interpreter; ``cpp``: CPU +
    mmfast._C; anything else: any device), no dtype or feature check of its own (the op's ``supports``
    does that); the op module dispatches on the name itself."""

    _ENVS: ClassVar[dict] = {"triton": (("cuda",), ("triton",)),
                             "triton_interpret": (("cpu",), ("triton_interpret",)), "cpp": (("cpu",), ("cpp",))}

    def __init__(self, name: str, target: object):
        devices, needs = self._ENVS.get(name, (None, ()))
        super().__init__(devices=devices, needs=needs, doc=str(target))
        self.dtypes = (*FLOAT_DTYPES, torch.float64)
        self.target = target

    def reasons(self, facts, e=None):
        reasons = super().reasons(facts, e)
        if self.devices == ("cpu",) and facts.device != "cpu":
            # keep the old wording for the CPU-only environments
            reasons[0] = (f"the interpreter runs on CPU tensors, got device '{facts.device}'"
                          if "triton_interpret" in self.needs
                          else f"the C++ kernels run on CPU tensors, got device '{facts.device}'")
        return reasons

