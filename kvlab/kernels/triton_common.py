"""What every Triton kernel module shares: interpreter detection and block sizes.

Under ``TRITON_INTERPRET=1`` (CPU, tests) kernels upcast to float32 right
after loading, since the interpreter mis-handles bf16 arithmetic, and use
small blocks; on GPUs they keep the inputs' dtype for tensor-core dots.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most ``cap`` (and at least 16, tl.dot's minimum)."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton.jit
def load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_V: tl.constexpr):  # fmt: skip
    """A program's [BLOCK_K, BLOCK_V] slice of a recurrent state [B*H, DK, DV] in float32 (zeros without one)."""
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_STATE:
        state += tl.load(S0 + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_k[:, None] & in_v[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
    return state
