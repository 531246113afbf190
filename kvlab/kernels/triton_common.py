"""What every Triton kernel module shares: interpreter detection and block sizes.

Under ``TRITON_INTERPRET=1`` (CPU, tests) kernels upcast to float32 right
after loading, since the interpreter mis-handles bf16 arithmetic, and use
small blocks; on GPUs they keep the inputs' dtype for tensor-core dots.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most ``cap`` (and at least 16, tl.dot's minimum)."""
    return max(16, min(cap, triton.next_power_of_2(n)))
