"""One registry of kernel backends, and the dispatch every layer's math goes through.

Each op (``attention``, ``linear_attention``, ``rms_norm``, ...) has a
``reference`` backend (plain PyTorch, obviously correct, what the tests
compare against) and a ``torch`` backend (the CPU/GPU fast path: SDPA,
chunked recurrences); some also have ``triton`` kernels and ``external``
ones (flash-attn, mamba-ssm). A backend declares what it can run: packages
that must import, and a ``supports(*args, **kwargs)`` predicate over the
actual call (device, dtype, shapes, options) that returns None when it can,
or the reason it cannot.

The mode says which backend to use:

- ``auto`` (default): the first that can run of external, triton, torch,
  reference; Triton only on CUDA tensors (under ``TRITON_INTERPRET=1`` on
  CPU it is a test vehicle, orders of magnitude slower, so never automatic).
- ``reference`` | ``torch`` | ``triton`` | ``external``: that backend where
  the op has it and it can run this call; otherwise the op falls back as in
  ``auto`` (an op without a Triton kernel still runs), and the fallback and
  its reason are logged once.
- Per op: ``"triton,attention=reference"`` (a default, then op=backend).

The mode comes from the ``KVLAB_KERNELS`` environment variable if set, else
from the model config's ``kernels`` (``CausalLM`` enters ``use_kernels`` in
forward and generation), else ``auto``. The backend chosen for each op and
mode is logged once.

Backends are referenced by ``"module:function"`` strings and imported on
first use, so a Triton kernel module is only imported where it is wanted,
and an export's remote code (which carries this module, not the kernel
modules) runs with reference and torch backends alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BACKENDS = ("reference", "torch", "triton", "external")
MODES = ("auto",) + BACKENDS
AUTO_ORDER = ("external", "triton", "torch", "reference")
ENV = "KVLAB_KERNELS"
OPS = (
    "attention",
    "absorbed_attention",
    "linear_attention",
    "delta_rule",
    "ssd",
    "selective_scan",
    "causal_conv1d",
    "rms_norm",
    "apply_rope",
    "linear_cross_entropy",
)  # fmt: skip  (registered in kvlab.kernels.ops)


@dataclass
class Backend:
    name: str  # one of BACKENDS
    target: str | Callable  # "module:function" (imported on first use) or the function itself
    packages: tuple[str, ...] = ()  # must be importable
    supports: Callable[..., str | None] | None = None  # (*args, **kwargs) -> None if it can run, else why not
    _fn: Callable | None = field(default=None, repr=False)

    def function(self) -> Callable:
        if self._fn is None:
            if callable(self.target):
                self._fn = self.target
            else:
                module, name = self.target.split(":")
                self._fn = getattr(importlib.import_module(module), name)
        return self._fn

    def unavailable(self, args, kwargs) -> str | None:
        """None if this backend can run the call, else the reason."""
        for package in self.packages:
            if not _importable(package):
                return f"{package} is not installed"
        # An exported checkpoint's remote code carries the registry but not the Triton/external modules
        if isinstance(self.target, str) and not _importable(self.target.split(":")[0]):
            return f"{self.target.split(':')[0]} is not importable"
        if self.name == "triton" and not _triton_device_ok(args):
            return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU, when forced)"
        return self.supports(*args, **kwargs) if self.supports is not None else None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_mode: contextvars.ContextVar[str] = contextvars.ContextVar("kvlab_kernels", default="auto")
_logged: set[tuple] = set()
_importable_cache: dict[str, bool] = {}


def _importable(package: str) -> bool:
    if package not in _importable_cache:
        try:
            _importable_cache[package] = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            _importable_cache[package] = False
    return _importable_cache[package]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _first_tensor(args):
    return next((a for a in args if hasattr(a, "device") and hasattr(a, "dtype")), None)


def _triton_device_ok(args) -> bool:
    t = _first_tensor(args)
    return t is not None and (t.device.type == "cuda" or _interpreting())


def register(op: str, backend: str, target: str | Callable, *, packages=(), supports=None) -> None:
    if op not in OPS:
        raise ValueError(f"kernel op {op!r} is not one of {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} for op {op!r}: valid backends are {', '.join(BACKENDS)}")
    _REGISTRY.setdefault(op, {})[backend] = Backend(backend, target, tuple(packages), supports)


def ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and its backends."""
    return {op: tuple(b for b in BACKENDS if b in backends) for op, backends in _REGISTRY.items()}


@functools.lru_cache(maxsize=64)
def parse_mode(mode: str | None, *, source: str = "kernels") -> tuple[str, dict[str, str]]:
    """``"triton,attention=reference"`` -> ("triton", {"attention": "reference"}); errors name the field."""
    default, per_op = "auto", {}
    for part in (p.strip() for p in (mode or "auto").split(",") if p.strip()):
        if "=" in part:
            op, backend = (s.strip() for s in part.split("=", 1))
            if op not in OPS:
                raise ValueError(f"{source}={mode!r}: unknown op {op!r}; ops are {', '.join(OPS)}")
            if backend not in MODES:
                raise ValueError(f"{source}={mode!r}: {op}={backend!r} is not one of {', '.join(MODES)}")
            per_op[op] = backend
        elif part in MODES:
            default = part
        else:
            raise ValueError(f"{source}={mode!r}: {part!r} is not one of {', '.join(MODES)} (or op=backend)")
    return default, per_op


def current_mode() -> str:
    """The mode in force: ``KVLAB_KERNELS`` if set, else the innermost ``use_kernels``, else auto."""
    return os.environ.get(ENV) or _mode.get()


@contextlib.contextmanager
def use_kernels(mode: str | None):
    """Run the enclosed calls with ``mode`` (``KVLAB_KERNELS`` still wins)."""
    parse_mode(mode)  # fail here, with the value, rather than inside a layer
    token = _mode.set(mode or "auto")
    try:
        yield
    finally:
        _mode.reset(token)


def choose(op: str, args=(), kwargs=None) -> Backend:
    """The backend that runs ``op`` on these arguments under the current mode."""
    kwargs = kwargs or {}
    backends = _REGISTRY[op]
    mode = current_mode()
    default, per_op = parse_mode(mode, source=ENV if os.environ.get(ENV) else "kernels")
    wanted = per_op.get(op, default)
    order = AUTO_ORDER if wanted == "auto" else (wanted,) + tuple(b for b in AUTO_ORDER if b != wanted)
    reasons = []
    if wanted != "auto" and wanted not in backends:
        reasons.append(f"{op} has no {wanted} backend")
    for name in order:
        backend = backends.get(name)
        if backend is None:
            continue
        if name == "triton" and wanted != "triton" and not _first_tensor(args).is_cuda:
            continue  # interpreted Triton only when asked for by name
        why = backend.unavailable(args, kwargs)
        if why is None:
            _log_once(op, mode, name, wanted, reasons)
            return backend
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no kernel backend can run {op} here ({'; '.join(reasons)})")


def _log_once(op, mode, name, wanted, reasons) -> None:
    key = (op, mode, name)
    if key in _logged:
        return
    _logged.add(key)
    if wanted not in ("auto", name):
        log.warning("kernel %s: %s cannot run it (%s); using %s", op, wanted, "; ".join(reasons) or "none", name)
    else:
        log.info("kernel %s: %s backend (mode %s)", op, name, mode)


def dispatch(op: str, *args, **kwargs):
    return choose(op, args, kwargs).function()(*args, **kwargs)
