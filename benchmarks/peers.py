"""kvlab's Triton kernels beside what a GPU user would call instead, forward + backward, one process (CUDA only).

    python benchmarks/peers.py [--cases attention,gqa,retention,simple_gla,gla] [--batch 4] [--heads 16]
        [--length 4096] [--dim 64]

- ``attention`` (causal, bf16, every head its own K/V) and ``gqa`` (4 query
  heads per K/V head): kvlab's kernel (``kvlab.kernels.triton_attention``)
  vs PyTorch's ``scaled_dot_product_attention`` pinned to its
  FlashAttention-2 backend and to cuDNN's, and flash-attn's
  ``flash_attn_func`` where that package is installed.
- ``retention`` (a fixed decay per head, RetNet's), ``simple_gla`` (a decay
  per head and token) and ``gla`` (per key channel): kvlab's linear-attention
  kernels vs fla's chunked ones (``chunk_simple_gla``, ``chunk_gla``) where
  fla is installed; bf16 inputs, no 1/sqrt(d) scale (kvlab's contract).

Each contender gets its own layout ([B, H, T, D] for kvlab and SDPA, [B, T,
H, D] for flash-attn and fla), made contiguous before timing. A row gives
the median milliseconds of forward + backward (``triton.testing.do_bench``),
TFLOP/s for attention (causal: half the square; backward 2.5x the forward),
and the largest error of the output and of every input's gradient against
a float32 computation of the same function on the same inputs, relative to
that tensor's largest value.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import rel_error  # benchmarks/common.py, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvlab.kernels import ops
from kvlab.kernels.registry import choose, use_kernels


def _fwd_bwd(fn, inputs: list[torch.Tensor], cotangent: torch.Tensor):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, cotangent)]


def _time(fn, inputs, cotangent) -> tuple[float, float]:
    """Median ms of forward + backward, and of the forward alone (no graph kept)."""
    import triton.testing

    def forward():
        with torch.no_grad():
            fn(*inputs)

    both = triton.testing.do_bench(lambda: _fwd_bwd(fn, inputs, cotangent), warmup=25, rep=100)
    return both, triton.testing.do_bench(forward, warmup=25, rep=100)


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).contiguous().requires_grad_() for t in tensors]


def _row(name, fn, inputs, cotangent, reference, layout, flops=None) -> tuple[str, float, float, float | None, float]:
    """(contender, ms, forward ms, TFLOP/s or None, max rel. error) of ``fn`` on ``inputs`` in its own layout;
    ``layout`` maps a tensor between it and the reference's (a transpose, its own inverse). A contender that does
    not take these inputs gives a row that says why."""
    try:
        got = [layout(t) for t in _fwd_bwd(fn, inputs, cotangent)]
        err = max(rel_error(g, r) for g, r in zip(got, reference, strict=True))
        ms, forward_ms = _time(fn, inputs, cotangent)
    except Exception as e:
        return f"{name}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})", math.nan, math.nan, None, math.nan
    return name, ms, forward_ms, None if flops is None else flops / ms / 1e9, err


def attention_case(B: int, H: int, Hkv: int, T: int, D: int) -> list[tuple[str, float, float, float | None, float]]:
    """Rows (contender, ms, forward ms, TFLOP/s, max rel. error) for causal attention over [B, H, T, D] queries."""
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    cot = torch.randn(B, H, T, D)
    group = H // Hkv
    ref_in = _leaves((q, k, v), torch.float32)
    # the float32 reference: SDPA's math over K/V repeated to every query head (gradients summed back)
    with sdpa_kernel(SDPBackend.MATH):
        reference = _fwd_bwd(
            lambda a, b, c: F.scaled_dot_product_attention(
                a, b.repeat_interleave(group, 1), c.repeat_interleave(group, 1), is_causal=True
            ),
            ref_in,
            cot,
        )  # fmt: skip
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal forward (QK^T and PV over half the square) + 2.5x backward
    rows = []

    def add(name, fn, layout):
        inputs = _leaves([layout(t) for t in (q, k, v)], torch.bfloat16)
        rows.append(_row(name, fn, inputs, layout(cot).to(torch.bfloat16).contiguous(), reference, layout, flops))

    bhtd = lambda t: t  # noqa: E731
    bthd = lambda t: t.transpose(1, 2)  # noqa: E731

    def kvlab_attention(a, b, c):
        assert choose("attention", (a, b, c), {"causal": True}).name == "triton"
        return ops.attention(a, b, c, causal=True)

    with use_kernels("triton"):
        add("kvlab Triton", kvlab_attention, bhtd)
    for backend, label in ((SDPBackend.FLASH_ATTENTION, "SDPA, FlashAttention-2"), (SDPBackend.CUDNN_ATTENTION,
                                                                                      "SDPA, cuDNN")):  # fmt: skip

        def sdpa(a, b, c, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=group > 1)

        add(label, sdpa, bhtd)
    try:
        from flash_attn import flash_attn_func

        add("flash-attn", lambda a, b, c: flash_attn_func(a, b, c, causal=True), bthd)
    except ImportError:
        rows.append(("flash-attn: not installed", math.nan, math.nan, None, math.nan))
    return rows


def linear_case(kind: str, B: int, H: int, T: int, D: int) -> list[tuple[str, float, float, float | None, float]]:
    """Rows for linear attention with ``kind``'s decay: kvlab's kernel vs fla's chunked one."""
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, D) * 0.3, torch.randn(B, H, T, D) * 0.3, torch.randn(B, H, T, D)
    gamma = None
    if kind == "retention":  # RetNet's decays, 1 - 2^(-5 - h), fixed per head: a constant, not an input
        gamma = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))
        g = gamma[None, :, None].expand(B, H, T).contiguous()
    elif kind == "simple_gla":
        g = F.logsigmoid(torch.randn(B, H, T)) / 16
    else:  # gla: a gate per key channel
        g = F.logsigmoid(torch.randn(B, H, T, D)) / 16
    cot = torch.randn(B, H, T, D)
    learned = [q, k, v] + ([] if gamma is not None else [g])  # the inputs whose gradients are compared

    def kvlab_fn(a, b, c, d=None):
        return ops.linear_attention(a, b, c, g if d is None else d)[0]

    with use_kernels("torch"):  # the float32 reference: the chunked torch form (checked against the recurrence)
        reference = _fwd_bwd(kvlab_fn, _leaves(learned, torch.float32), cot)
    rows = []

    def add(name, fn, native, layout):
        inputs = [t.detach().contiguous().requires_grad_() for t in native]
        rows.append(_row(name, fn, inputs, layout(cot).to(torch.bfloat16).contiguous(), reference, layout))

    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    decay = [] if gamma is not None else [g.float()]
    with use_kernels("triton"):
        add("kvlab Triton", kvlab_fn, [*half, *decay], lambda t: t)
    to_fla = lambda t: t.transpose(1, 2)  # [B, H, T, ...] <-> [B, T, H, ...]
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        rows.append(("fla: not installed", math.nan, math.nan, None, math.nan))
        return rows
    fla_in = [to_fla(t) for t in half]
    if kind == "retention":
        add("fla chunk_simple_gla (g_gamma)",
            lambda a, b, c: chunk_simple_gla(a, b, c, g_gamma=gamma, scale=1.0)[0], fla_in, to_fla)  # fmt: skip
    elif kind == "simple_gla":
        add("fla chunk_simple_gla", lambda a, b, c, d: chunk_simple_gla(a, b, c, d, scale=1.0)[0],
            [*fla_in, to_fla(g)], to_fla)  # fmt: skip
    else:
        add("fla chunk_gla", lambda a, b, c, d: chunk_gla(a, b, c, d, scale=1.0)[0], [*fla_in, to_fla(g)], to_fla)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="attention,gqa,retention,simple_gla,gla")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/peers.py compares GPU kernels: no CUDA device here")
    torch.set_default_device("cuda")
    B, H, T, D = args.batch, args.heads, args.length, args.dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={B}, H={H}, T={T}, D={D}, bf16")
    print("| case | contender | fwd+bwd ms | fwd ms | TFLOP/s (fwd+bwd) | max rel. error vs float32 |")
    print("|---|---|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        if case in ("attention", "gqa"):
            rows = attention_case(B, H, H if case == "attention" else H // 4, T, D)
        else:
            rows = linear_case(case, B, H, T, D)
        for name, ms, forward_ms, tflops, err in rows:
            rate = "" if tflops is None else f"{tflops:.0f}"
            print(f"| {case} | {name} | {ms:.2f} | {forward_ms:.2f} | {rate} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
