"""Exponentials far below zero on a CPU: ``torch.exp`` against ``flushed_exp``, alone, in the fused loss and
in the chunked scans.

    python benchmarks/flushed_exp.py [--cases mamba2:1:4096,mamba2:8:128,mamba2:8:256:train,...] [--rounds 3]

First the operation alone: ``torch.exp`` of 2M float32 values all at one
exponent (-1, -88, -100, -inf, ...), ``flushed_exp`` of the same, and a
matrix product whose left factor holds subnormal numbers (what plain exp
leaves between -103 and -87) against the same product with normal ones.
Then the fused head + loss with its backward at gqa's training shapes
(2,048 rows, width 256, vocab 4,096) with hidden states and head weights
scaled so the logits spread over a few units, or over about a hundred as a
trained model's can. Then each case (preset:batch:tokens, ``:train`` for a training step's
forward and backward, else an uncached forward with ``last_only``) with
the chunked scans' weights from plain exp and from ``flushed_exp`` (swapped in
the kernels' modules, interleaved over rounds, best of them), twice: at
the presets' initialisation, and with fast-forgetting heads as training
can make them (Mamba-2's dt bias drawn from U(-1, 2): dt A down to about
-34 a token; RWKV-6's decay base raised by 2: log decays down to about -20;
retention's decays are fixed). ``flushed_exp`` serves scalar decays (Mamba-2,
retention) and, with vector decays (RWKV-6), the row-by-row products that
decays too strong to factor take; their other weights keep plain exp.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import timed  # benchmarks/common.py, beside this script

import kvlab.kernels.cross_entropy as cross_entropy
import kvlab.kernels.delta_rule as delta_rule
import kvlab.kernels.flushed_exp as flushed
import kvlab.kernels.linear_attention as linear_attention
from kvlab import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"exp": lambda x: x.exp(), "flushed_exp": flushed.flushed_exp}


def use(exp) -> None:
    linear_attention.flushed_exp = delta_rule.flushed_exp = cross_entropy.flushed_exp = exp


def operation_table() -> None:
    print("| exponent | torch.exp ms | flushed_exp ms |")
    print("| --- | --- | --- |")
    for value in (-1.0, -50.0, -87.0, -88.0, -100.0, -200.0, float("-inf")):
        x = torch.full((8, 64, 64, 64), value)
        flushed = timed(lambda x=x: VARIANTS["flushed_exp"](x), 10)
        print(f"| {value:g} | {timed(x.exp, 10) * 1e3:.2f} | {flushed * 1e3:.2f} |")
    normal, other = torch.rand(8, 64, 64), torch.randn(8, 64, 4096)
    subnormal = normal * 1e-40
    print()
    print(f"[8, 64, 64] @ [8, 64, 4096]: normal left factor {timed(lambda: normal @ other, 5) * 1e3:.2f} ms, "
          f"subnormal {timed(lambda: subnormal @ other, 2) * 1e3:.1f} ms")  # fmt: skip


def loss_table(rounds: int) -> None:
    print("| logits' spread (max - min per row, mean) | exp ms | flushed_exp ms | ratio |")
    print("| --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for scale in (0.05, 1.0):
        hidden = torch.randn(8, 256, 256, generator=generator).requires_grad_()
        weight = (torch.randn(4096, 256, generator=generator) * scale).requires_grad_()
        labels = torch.randint(0, 4096, (8, 256), generator=generator)
        with torch.no_grad():
            logits = hidden[0] @ weight.t()
            spread = float((logits.amax(-1) - logits.amin(-1)).mean())

        def step(hidden=hidden, weight=weight, labels=labels):
            cross_entropy.linear_cross_entropy(hidden, weight, labels).backward()
            hidden.grad = weight.grad = None

        best = dict.fromkeys(VARIANTS, float("inf"))
        for _ in range(rounds):
            for variant, exp in VARIANTS.items():
                use(exp)
                best[variant] = min(best[variant], timed(step, 3))
        use(VARIANTS["flushed_exp"])
        old, new = best["exp"] * 1e3, best["flushed_exp"] * 1e3
        print(f"| {spread:.0f} | {old:.1f} | {new:.1f} | x{old / new:.2f} |")


def build(name: str, strong: bool):
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{name}.yaml")
    config.max_seq_len = max(config.max_seq_len, 16384)
    model = build_model(config)
    if strong:
        for module in model.modules():
            if hasattr(module, "dt_bias"):  # Mamba-2: dt = softplus(dt_bias + ...)
                torch.nn.init.uniform_(module.dt_bias, -1.0, 2.0)
            if hasattr(module, "decay_base") and hasattr(module, "bonus"):  # RWKV-6: log w = -exp(decay_base + ...)
                module.decay_base.data += 2.0
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--cases", default="mamba2:1:4096,mamba2:8:128,mamba2:8:256:train,retnet:1:4096,rwkv6:1:2048,rwkv6:8:256:train"
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    operation_table()
    print()
    loss_table(args.rounds)
    cases = [case.split(":") for case in args.cases.split(",")]
    print()
    print("| case | decays | exp ms | flushed_exp ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for strong in (False, True):
        models = {name: build(name, strong) for name, *_ in cases}
        best: dict[tuple, float] = {}
        for _ in range(args.rounds):
            for name, batch, tokens, *train in cases:
                model = models[name].train(bool(train))
                ids = torch.randint(0, model.config.vocab_size, (int(batch), int(tokens) + 1),
                                    generator=torch.Generator().manual_seed(1))  # fmt: skip

                def run(model=model, ids=ids, train=train):
                    if train:
                        model(ids[:, :-1], labels=ids[:, 1:]).backward()
                        model.zero_grad(set_to_none=True)
                    else:
                        with torch.no_grad():
                            model(ids[:, :-1], last_only=True)

                for variant, exp in VARIANTS.items():
                    use(exp)
                    key = (name, batch, tokens, bool(train), variant)
                    best[key] = min(best.get(key, float("inf")), timed(run, 1))
        use(VARIANTS["flushed_exp"])
        for name, batch, tokens, *train in cases:
            old, new = (best[(name, batch, tokens, bool(train), v)] * 1e3 for v in VARIANTS)
            what = "training step" if train else "forward"
            print(f"| {name} {what}, {batch} x {tokens} | {'fast-forgetting' if strong else 'initial'} "
                  f"| {old:.1f} | {new:.1f} | x{old / new:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
