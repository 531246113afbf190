"""Chunked linear attention (retention, gated retention, SSD) vs its token-by-token recurrence.

    python benchmarks/linear_attention.py [--seq 2048] [--batch 1] [--heads 4] [--dim 64] [--chunks 32,64,128]

Forward + backward of the same inputs (data-dependent decay, as gated
retention) through ``linear_attention_chunked`` at each chunk size and
through ``linear_attention_reference`` (the recurrence a naive
implementation loops over), in one process. Checks that they agree, prints
a markdown row per form.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvlab.kernels.linear_attention import linear_attention_chunked, linear_attention_reference  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", default="32,64,128")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.dim
    leaves = [torch.randn(B, H, T, D) for _ in range(3)] + [torch.nn.functional.logsigmoid(torch.randn(B, H, T)) / 16]
    leaves = [t.requires_grad_() for t in leaves]

    def run(kernel, **kwargs):
        out, state = kernel(*leaves, **kwargs)
        (out.square().mean() + state.square().mean()).backward()
        return out.detach()

    want = run(linear_attention_reference)
    rows = []
    for C in (int(c) for c in args.chunks.split(",")):
        got = run(linear_attention_chunked, chunk_size=C)
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), "chunked form disagrees with the recurrence"
        seconds = timed(lambda C=C: run(linear_attention_chunked, chunk_size=C), args.repeats)
        rows.append((f"chunked, chunk {C}", seconds))
    loop = timed(lambda: run(linear_attention_reference), args.repeats)
    print(f"B={B} H={H} T={T} Dk=Dv={D}, fp32, forward + backward, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| form | s | speed-up vs the recurrence |\n| --- | --- | --- |")
    print(f"| token-by-token recurrence | {loop:.3f} | 1.0x |")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {loop / s:.1f}x |")


if __name__ == "__main__":
    main()
