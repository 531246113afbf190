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
  CPU it is a test vehicle, orders of magnitude slower, so never automatic),
  and not for calls its ``auto_skip`` leaves to a faster later backend
  (plain attention, which PyTorch's SDPA runs on FlashAttention-2 or cuDNN).
- ``reference`` | ``torch`` | ``triton`` | ``external``: that backend where
  the op has it and it can run this call; otherwise the op falls back as in
  ``auto`` (an op without a Triton kernel still runs), and the fallback and
  its reason are logged once.
- Per op: ``"triton,attention=reference"`` (a default, then op=backend).

Under ``torch.compile`` (the compiled decode step, compiled training) every
op is traced as its ``torch`` backend whatever the mode: Inductor generates
its own fused kernels from it.

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
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# What kvlab compiles on its own (``generate``'s decode step, the Mamba-1 scan's training chunks): the
# environment variable that turns it off, and torch.compile's keywords newer than the torch kvlab declares
# (>= 2.4), used where present (each compiled function then keeps its own recompilation budget).
COMPILE_ENV = "KVLAB_COMPILE"
_NEWER = inspect.signature(torch.compile).parameters
ISOLATED_COMPILE = {"isolate_recompiles": True} if "isolate_recompiles" in _NEWER else {}


def compile_wanted(compile: bool | None) -> bool:
    """``compile`` if given, else ``KVLAB_COMPILE`` (0/1), else True."""
    if compile is not None:
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r}: expected True, False or None (None: ${COMPILE_ENV}, default on)")
        return compile
    value = os.environ.get(COMPILE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"{COMPILE_ENV}={value!r}: expected 0 or 1")
    return value in ("1", "true")


BACKENDS = ("reference", "torch", "triton", "external")
MODES = ("auto",) + BACKENDS
AUTO_ORDER = ("external", "triton", "torch", "reference")
ENV = "KVLAB_KERNELS"
OPS = (
    "attention",
    "attention_weights",
    "absorbed_attention",
    "linear_attention",
    "delta_rule",
    "gated_delta_rule",
    "ssd",
    "selective_scan",
    "diagonal_scan",
    "causal_conv1d",
    "rms_norm",
    "apply_rope",
    "linear_cross_entropy",
    "dequantize",
)  # fmt: skip  (registered in kvlab.kernels.ops)


@dataclass
class Backend:
    name: str  # one of BACKENDS
    target: str | Callable  # "module:function" (imported on first use) or the function itself
    packages: tuple[str, ...] = ()  # must be importable
    supports: Callable[..., str | None] | None = None  # (*args, **kwargs) -> None if it can run, else why not
    # (*args, **kwargs) -> None, or why ``auto`` should leave this call to a later backend that runs it faster
    # (measured: kvlab's Triton attention is slower than SDPA's fused kernels where those apply)
    auto_skip: Callable[..., str | None] | None = None
    _fn: Callable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # A function needs no import: resolved now, not on the first call, which could be inside torch.compile's
        # trace, where it would be a change Dynamo guards on (the next call would retrace once eager code had
        # resolved it: MLA's absorbed attention, which only the decode step calls, cost each second generation 1 s)
        if callable(self.target):
            self._fn = self.target

    def function(self) -> Callable:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn

    def unavailable_on(self, device_type: str | None, interpreting: bool) -> str | None:
        """Why this backend cannot run anything on this device (None if it may): what no call changes."""
        for package in self.packages:
            if not _importable(package):
                return f"{package} is not installed"
        # An exported checkpoint's remote code carries the registry but not the Triton/external modules
        if isinstance(self.target, str) and not _importable(self.target.split(":")[0]):
            return f"{self.target.split(':')[0]} is not importable"
        if self.name == "triton" and not (device_type == "cuda" or (device_type is not None and interpreting)):
            return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU, when forced)"
        return None


_REGISTRY: dict[str, dict[str, Backend]] = {}
# (op, (mode, interpreting), device type) -> the backends dict it was made from, the mode's wish, the backends left
# to try in order and why the others cannot run: everything in a choice that does not depend on the call.
_plans: dict[tuple, tuple[dict, str, tuple[Backend, ...], tuple[str, ...]]] = {}
# (mode, TRITON_INTERPRET set) as read when ``use_kernels`` was entered: a model's forward reads the
# environment once, not at each of its op calls. None outside any ``use_kernels``.
_settings: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("kvlab_kernels", default=None)
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


def register(op: str, backend: str, target: str | Callable, *, packages=(), supports=None, auto_skip=None) -> None:
    if op not in OPS:
        raise ValueError(f"kernel op {op!r} is not one of {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} for op {op!r}: valid backends are {', '.join(BACKENDS)}")
    _REGISTRY.setdefault(op, {})[backend] = Backend(backend, target, tuple(packages), supports, auto_skip)
    _plans.clear()


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


def _read_settings(mode: str | None) -> tuple[str, bool]:
    return os.environ.get(ENV) or mode or "auto", _interpreting()


def current_mode() -> str:
    """The mode in force: ``KVLAB_KERNELS`` if set, else the innermost ``use_kernels``, else auto."""
    return (_settings.get() or _read_settings(None))[0]


@contextlib.contextmanager
def use_kernels(mode: str | None):
    """Run the enclosed calls with ``mode`` (``KVLAB_KERNELS`` still wins; the environment is read here, once).

    Inside, each op call costs a dictionary lookup and its candidates' ``supports``; outside, choices also
    read the environment (about 1.5 us more per call)."""
    parse_mode(mode)  # fail here, with the value, rather than inside a layer
    token = _settings.set(_read_settings(mode))
    try:
        yield
    finally:
        _settings.reset(token)


def _plan(op: str, mode: str, device_type: str | None, interpreting: bool):
    backends = _REGISTRY[op]
    default, per_op = parse_mode(mode, source=ENV if os.environ.get(ENV) else "kernels")
    wanted = per_op.get(op, default)
    order = AUTO_ORDER if wanted == "auto" else (wanted,) + tuple(b for b in AUTO_ORDER if b != wanted)
    reasons = [f"{op} has no {wanted} backend"] if wanted != "auto" and wanted not in backends else []
    candidates = []
    for name in order:
        backend = backends.get(name)
        if backend is None or (name == "triton" and wanted != "triton" and device_type != "cuda"):
            continue  # interpreted Triton only when asked for by name
        why = backend.unavailable_on(device_type, interpreting)
        if why is None:
            candidates.append(backend)
        else:
            reasons.append(f"{name}: {why}")
    return backends, wanted, tuple(candidates), tuple(reasons)


def choose(op: str, args=(), kwargs=None) -> Backend:
    """The backend that runs ``op`` on these arguments under the current mode.

    What does not depend on the call (packages, modules, the device's type) is worked out once per op, mode
    and device type; per call only the candidates' ``supports`` run (decoding calls every op every token).
    """
    kwargs = kwargs or {}
    settings = _settings.get() or _read_settings(None)
    mode = settings[0]
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else _first_tensor(args)
    key = (op, settings, tensor.device.type if tensor is not None else None)
    plan = _plans.get(key)
    if plan is None or plan[0] is not _REGISTRY[op]:  # registered anew, or the dict swapped (tests)
        plan = _plans[key] = _plan(op, mode, key[2], settings[1])
    _, wanted, candidates, reasons = plan
    refused, passed_over = [], None
    for backend in candidates:
        why = backend.supports(*args, **kwargs) if backend.supports is not None else None
        if why is None and wanted == "auto" and backend.auto_skip is not None:
            if (why := backend.auto_skip(*args, **kwargs)) is not None:
                passed_over = passed_over or backend  # still the one to run if no later backend can
        if why is None:
            _log_once(op, mode, backend.name, wanted, reasons, refused)
            return backend
        refused.append(f"{backend.name}: {why}")
    if passed_over is not None:
        _log_once(op, mode, passed_over.name, wanted, reasons, refused)
        return passed_over
    raise RuntimeError(f"no kernel backend can run {op} here ({'; '.join(reasons + tuple(refused))})")


def _log_once(op, mode, name, wanted, reasons, refused) -> None:
    key = (op, mode, name)
    if key in _logged:
        return
    _logged.add(key)
    if wanted not in ("auto", name):
        why = "; ".join((*reasons, *refused)) or "none"
        log.warning("kernel %s: %s cannot run it (%s); using %s", op, wanted, why, name)
    else:
        log.debug("kernel %s: %s backend (mode %s)", op, name, mode)  # a default run's log stays quiet


def dispatch(op: str, *args, **kwargs):
    if torch.compiler.is_compiling():
        # Inside torch.compile the op is traced as its torch backend (reference where it has none): Inductor
        # fuses plain PyTorch into its own kernels, and the mode's context variable cannot be traced.
        backends = _REGISTRY[op]
        return (backends.get("torch") or backends["reference"]).function()(*args, **kwargs)
    return choose(op, args, kwargs).function()(*args, **kwargs)
