"""Compile every Triton kernel kvlab launches for a Hopper GPU (sm_90), on a machine without one.

    python -m tests.kernels.compile_for_gpu [--dtype bfloat16|float16|float32]

The interpreter (``TRITON_INTERPRET=1``, the rest of the suite) runs a
kernel's Python, not its compilation: what only Triton's compiler refuses
(a dot's operand types, a shape it cannot lay out) shows up first on a GPU,
where device time is scarce. Here each entry point runs on CPU tensors with
launching replaced by compiling the launch's signature and constexprs
(``triton.compile`` for a CUDA target: Triton's own ptxas, no driver
needed), so every kernel and constexpr combination these calls reach is
built to a cubin; the numbers the kernels would compute are not produced
(outputs stay uninitialised). Autotuning is off (``KVLAB_TRITON_AUTOTUNE=0``:
the first GPU tile), as in the GPU test run. Prints one line per compiled
kernel variant with the registers a thread uses and the bytes of stack it
spills them to (``cuobjdump -res-usage`` on the cubin Triton built, where
Triton ships cuobjdump: what a GPU would run with this Triton and its
ptxas, whose register allocation differs between versions) and, last, the
module-level kernels no call reached; exits 1 if any compilation fails or
any kernel is unreached.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels as JITFunctions, compiled for the GPU
os.environ["KVLAB_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
_POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int8: "*i8",
             torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
compiled: dict[tuple, float] = {}
failures: list[str] = []
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> tuple[int, int] | None:
    """(registers a thread, bytes of stack and local memory a thread: where ptxas spills registers) of a
    compiled kernel, or None without cuobjdump."""
    if not CUOBJDUMP.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return (int(found[1]), int(found[2]) + int(found[3])) if found else None


def _signature(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    bound = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound.get(param.name, param.default)
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTERS[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} of type {type(value).__name__}")
    return signature, constexprs


def _compile_instead_of_launching(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs}
    signature, constexprs = _signature(self, args, {k: v for k, v in kwargs.items() if k in self.arg_names})
    key = (self.fn.__module__, self.fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())),
           tuple(sorted(options.items())))  # fmt: skip
    if key in compiled:
        return
    start = time.perf_counter()
    resources = None
    try:
        kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=TARGET,
                                options=options)  # fmt: skip
        resources = _resources(kernel.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - every failure is reported, then the run fails
        failures.append(f"{self.fn.__name__} {constexprs}: {type(error).__name__}: {str(error)[:2000]}")
    compiled[key] = time.perf_counter() - start
    flags = ", ".join(f"{k}={v}" for k, v in constexprs.items() if isinstance(v, bool) and v)
    usage = f", {resources[0]} registers" if resources else ""
    if resources and resources[1]:
        usage += f", spills to {resources[1]} bytes of stack"
    print(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__} ({flags or 'plain'}): "
          f"{compiled[key]:.1f} s{usage}", flush=True)  # fmt: skip


def _grad(outputs, inputs) -> None:
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    torch.autograd.grad([o.float().sum() for o in outputs], [t for t in inputs if t.requires_grad], allow_unused=True)


def _leaves(dtype, *shapes):
    return [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in shapes]


def run_entry_points(dtype: torch.dtype) -> None:
    """Each Triton entry point, forward and backward, in the combinations of its constexpr flags that matter:
    every flag on in one call and off in another."""
    from kvlab.kernels import (
        triton_attention,
        triton_causal_conv,
        triton_cross_entropy,
        triton_delta_rule,
        triton_diagonal_scan,
        triton_linear_attention,
        triton_norm,
        triton_quant,
        triton_rope,
        triton_selective_scan,
    )
    from kvlab.kernels.quant import quantize
    from kvlab.kernels.rope import rope_tables

    B, H, T = 2, 4, 150  # T: over two chunks of 64, not a multiple of any tile
    docs = torch.tensor([[0] * 40 + [1] * 110, [2] * 150])
    q, k, v = _leaves(dtype, (B, H, T, 64), (B, 2, T, 64), (B, 2, T, 64))
    _grad(triton_attention.attention(q, k, v, causal=True), (q, k, v))
    _grad(triton_attention.attention(q, k, v, causal=True, window=32, doc_ids=docs), (q, k, v))
    _grad(triton_attention.attention(q, k, v), (q, k, v))
    _grad(triton_attention.attention(q, k, v, causal=True, softcap=30.0), (q, k, v))
    q1, latent = _leaves(dtype, (B, H, 1, 80), (B, T, 80))
    _grad(triton_attention.absorbed_attention(q1, latent, 64), (q1, latent))

    q, k, v = _leaves(dtype, (B, H, T, 64), (B, H, T, 64), (B, H, T, 48))
    scalar, vector = -torch.rand(B, H, T, requires_grad=True), -torch.rand(B, H, T, 64, requires_grad=True)
    (state,) = _leaves(torch.float32, (B, H, 64, 48))
    for form, decay in (("chunked", scalar), ("chunked", vector), ("recurrent", vector), ("recurrent", scalar)):
        inputs = (q, k, v, decay, state)
        _grad(triton_linear_attention.linear_attention(q, k, v, decay, form=form), inputs)
        _grad(triton_linear_attention.linear_attention(q, k, v, decay, state=state, doc_ids=docs, exclusive=True,
                                                       form=form), inputs)  # fmt: skip

    inputs = _leaves(dtype, *[(B, H, T, 32)] * 6)  # q, k, v, log decay, a, b
    _grad(triton_delta_rule.delta_rule(*inputs), inputs)
    _grad(triton_delta_rule.delta_rule(*inputs, state=state[..., :32, :32].detach(), doc_ids=docs), inputs)

    u, delta, b, c = _leaves(dtype, (B, 96, T), (B, 96, T), (B, 16, T), (B, 16, T))
    A, s0 = _leaves(torch.float32, (96, 16), (B, 96, 16, 1))
    _grad(triton_selective_scan.selective_scan(u, delta, A, b, c)[0], (u, delta, A, b, c))
    _grad(triton_selective_scan.selective_scan(u, delta, A, b, c, state=s0, doc_ids=docs), (u, delta, A, b, c, s0))
    with torch.no_grad():  # a prefill: no checkpoints
        triton_selective_scan.selective_scan(u, delta, A, b, c, state=s0)

    x, decay, h0 = _leaves(dtype, (B, T, 96), (B, T, 96), (B, 96))
    _grad(triton_diagonal_scan.diagonal_scan(x, decay, state=h0, doc_ids=docs), (x, decay, h0))

    x, weight, bias, prev = _leaves(dtype, (B, T, 96), (96, 4), (96,), (B, 3, 96))
    _grad(triton_causal_conv.causal_conv1d(x, weight), (x, weight))
    _grad(triton_causal_conv.causal_conv1d(x, weight, bias, prev=prev, doc_ids=docs), (x, weight, bias, prev))

    x, residual, w = _leaves(dtype, (B, T, 96), (B, T, 96), (96,))
    _grad(triton_norm.rms_norm(x, w, 1e-6), (x, w))
    _grad(triton_norm.rms_norm(x, w, 1e-6, residual=residual), (x, w, residual))

    cos, sin = rope_tables(T, 64, 10000.0)
    (xr,) = _leaves(dtype, (B, H, T, 64))
    _grad(triton_rope.apply_rope(xr, cos.to(dtype), sin.to(dtype)), (xr,))

    hidden, head = _leaves(dtype, (B, T, 96), (1000, 96))
    labels = torch.randint(0, 1000, (B, T))
    _grad(triton_cross_entropy.linear_cross_entropy(hidden, head, labels), (hidden, head))

    for bits, group in ((2, 32), (4, 64), (8, 16)):
        packed, scale, zero = quantize(torch.randn(B, T, 2, 64), bits, group, dtype)
        triton_quant.dequantize(packed, scale, zero, bits, dtype)


def unreached() -> list[str]:
    """Module-level kernels of kvlab.kernels.triton_* that no call compiled, directly or as a helper inside a
    compiled kernel (found by name in the sources the compiled kernels reach)."""
    import kvlab.kernels as package

    kernels = {}
    for name in sorted(os.listdir(os.path.dirname(package.__file__))):
        module = sys.modules.get(f"kvlab.kernels.{name[:-3]}") if name.startswith("triton_") else None
        for value in vars(module).values() if module else ():
            fn = getattr(value, "fn", value)  # an autotuned kernel wraps its JITFunction
            if isinstance(fn, JITFunction) and fn.fn.__module__ == module.__name__:
                kernels[(fn.fn.__module__, fn.fn.__name__)] = fn
    reached = {key[:2] for key in compiled} & kernels.keys()
    frontier = set(reached)
    while frontier:  # helpers named in a reached kernel's source are reached too
        sources = "".join(kernels[key].src for key in frontier)
        frontier = {key for key in kernels.keys() - reached if f"{key[1]}(" in sources}
        reached |= frontier
    return sorted(f"{module.rsplit('.', 1)[-1]}.{name}" for module, name in kernels.keys() - reached)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    dtype = getattr(torch, parser.parse_args().dtype)
    JITFunction.run = _compile_instead_of_launching
    start = time.perf_counter()
    run_entry_points(dtype)
    missing = unreached()
    print(f"{len(compiled)} kernel variants compiled for sm_90 in {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print("FAILED", failure)
    if missing:
        print("unreached:", ", ".join(missing))
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
