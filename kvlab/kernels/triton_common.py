"""What every Triton kernel module shares: interpreter detection, block sizes, autotune configs.

Under ``TRITON_INTERPRET=1`` (CPU, tests) kernels upcast to float32 right
after loading, since the interpreter mis-handles bf16 arithmetic, and use
small blocks and one autotune config (so nothing is benchmarked); on GPUs
they keep the inputs' dtype for tensor-core dots and autotune their tiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for a kernel called on ``dtype`` tensors. Float32 inputs get float32
    products where torch's own float32 matmuls do (``torch.get_float32_matmul_precision()`` "highest", its
    default), not Triton's GPU default, TF32 (about 1e-3 relative error); "high" or "medium" let them use
    TF32, as they let torch. Half inputs keep TF32 for the float32 tiles their kernels multiply."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def block(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most ``cap`` (and at least 16, tl.dot's minimum)."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def tune_configs(gpu: list[tuple[dict, int, int]], interpreted: dict) -> list[triton.Config]:
    """Autotune configs: ``gpu`` as (constexprs, num_warps, num_stages) on a GPU, ``interpreted`` alone under
    the interpreter. Configs a GPU cannot fit (shared memory at large head dims) are timed as infinite by
    Triton's autotuner and never chosen. ``KVLAB_TRITON_AUTOTUNE=0`` keeps the first GPU config alone: nothing
    timed, one compilation per shape (the test suite on a GPU, where tuning every case's shape would cost more
    than checking it)."""
    if interpreting():
        return [triton.Config(interpreted, num_warps=1, num_stages=1)]
    if os.environ.get("KVLAB_TRITON_AUTOTUNE", "1") == "0":
        gpu = gpu[:1]
    return [triton.Config(blocks, num_warps=warps, num_stages=stages) for blocks, warps, stages in gpu]


def length_bucket(n: int) -> int:
    """An autotune key for a sequence length: its power of two, so decoding (one more key each step)
    re-tunes once per doubling, not once per step."""
    return triton.next_power_of_2(n)


@triton.jit
def state_slice(DK, DV, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """A recurrent kernel's program on grid (value blocks, B*H): its batch*head, key and value channels, and
    which of those are in range."""
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.program_id(1), ik, iv, ik < DK, iv < DV


@triton.jit
def load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_V: tl.constexpr):  # fmt: skip
    """A program's [BLOCK_K, BLOCK_V] slice of a recurrent state [B*H, DK, DV] in float32 (zeros without one)."""
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_STATE:
        state += tl.load(S0 + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_k[:, None] & in_v[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
    return state
