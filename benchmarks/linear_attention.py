"""Chunked recurrent-mixer kernels vs their token-by-token recurrences, forward + backward.

    python benchmarks/linear_attention.py [--kernel linear|vector|delta] [--seq 2048] [--batch 1] [--heads 4]
                                          [--dim 64] [--chunks 32,64,128]

``linear``: linear attention with a data-dependent scalar decay (gated
retention, Mamba-2's SSD), ``linear_attention_chunked`` vs
``linear_attention_reference``. ``vector``: the same kernels with a decay
per key channel (RWKV-6, with RWKV-6's initial decay range). ``delta``: RWKV-7's generalised delta rule
(per-channel decay, rank-one correction), ``delta_rule_chunked`` vs
``delta_rule_reference``. Same inputs, one process; checks that the forms
agree and prints a markdown row per form.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from common import timed  # benchmarks/common.py, beside this script

from kvlab.kernels.delta_rule import delta_rule_chunked, delta_rule_reference
from kvlab.kernels.linear_attention import linear_attention_chunked, linear_attention_reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=["linear", "vector", "delta"], default="linear")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunks", default="32,64,128")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.dim
    if args.kernel == "linear":
        leaves = [torch.randn(B, H, T, D) for _ in range(3)] + [F.logsigmoid(torch.randn(B, H, T)) / 16]
        chunked, recurrence = linear_attention_chunked, linear_attention_reference
    elif args.kernel == "vector":  # log w = -exp(d), d between -6 and -1
        leaves = [torch.randn(B, H, T, D) for _ in range(3)] + [-torch.empty(B, H, T, D).uniform_(-6, -1).exp()]
        chunked, recurrence = linear_attention_chunked, linear_attention_reference
    else:  # RWKV-7's shapes: unit kappa, learning rates in (0, 1), decays in (exp(-0.61), 1)
        kappa = F.normalize(torch.randn(B, H, T, D), dim=-1)
        log_decay = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, H, T, D) - 2)
        leaves = [torch.randn(B, H, T, D) for _ in range(3)] + [log_decay, kappa * torch.rand(B, H, T, D), -kappa]
        chunked, recurrence = delta_rule_chunked, delta_rule_reference
    leaves = [t.requires_grad_() for t in leaves]

    def run(kernel, **kwargs):
        out, state = kernel(*leaves, **kwargs)
        (out.square().mean() + state.square().mean()).backward()
        return out.detach()

    want = run(recurrence)
    rows = []
    for C in (int(c) for c in args.chunks.split(",")):
        got = run(chunked, chunk_size=C)
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), "chunked form disagrees with the recurrence"
        seconds = timed(lambda C=C: run(chunked, chunk_size=C), args.repeats)
        rows.append((f"chunked, chunk {C}", seconds))
    loop = timed(lambda: run(recurrence), args.repeats)
    print(f"{args.kernel}: B={B} H={H} T={T} Dk=Dv={D}, fp32, forward + backward, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| form | s | speed-up vs the recurrence |\n| --- | --- | --- |")
    print(f"| token-by-token recurrence | {loop:.3f} | 1.0x |")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {loop / s:.1f}x |")


if __name__ == "__main__":
    main()
