"""Multi-query associative recall: attention vs fixed-state mixers at equal training (Zoology's MQAR).

    python benchmarks/mqar.py [--models attention,retention,mamba2] [--pairs 8] [--seq 64] [--vocab 128]
                              [--d-model 64] [--layers 2] [--steps 1500] [--batch 64] [--lr 3e-3] [--seed 0]
                              [--states 4,8,16,32 [--plot mqar_states.png]]

Every model is a 2-layer kvlab decoder of the same width trained on the same
generated MQAR examples (``kvlab.recipes.mqar``) with the same optimiser and
steps; the loss and the accuracy count the queried values only. Prints a
markdown row per model: parameters, recurrent state or KV cache per
sequence, recall accuracy on held-out examples.

``--states`` sweeps the recurrent mixers' state (Zoology's figure 2: recall
against state size): each fixed-state model is trained once per key width
(retention's head_dim and v_head_dim, Mamba-2's state_dim, RWKV's
head_dim), attention once (its cache grows with the sequence instead);
``--plot`` draws accuracy against the bytes each holds per sequence, one
line per family.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvlab import build_model
from kvlab.recipes.mqar import mqar_examples


def mixer_for(kind: str, d_model: int, heads: int, state: int | None = None) -> dict:
    """One mixer per family at ``heads`` heads over ``d_model``; ``state``: the recurrent mixers' key width
    (retention's head_dim and v_head_dim, Mamba-2's state_dim), d_model / heads unless given."""
    hd = d_model // heads
    s = state or hd
    return {
        "attention": {"kind": "attention", "n_heads": heads, "n_kv_heads": heads, "head_dim": hd},
        "retention": {"kind": "retention", "n_heads": heads, "head_dim": s, "v_head_dim": s, "decay": "fixed"},
        "gated_retention": {"kind": "retention", "n_heads": heads, "head_dim": s, "v_head_dim": s, "decay": "gated"},
        "mamba2": {"kind": "mamba2", "head_dim": hd, "state_dim": s, "expand": 1, "chunk_size": 32},
        "rwkv7": {"kind": "rwkv7", "head_dim": s, "value_residual": False},
    }[kind]


def model_spec(kind: str, args) -> dict:
    return {
        "vocab_size": args.vocab,
        "d_model": args.d_model,
        "n_layers": args.layers,
        "max_seq_len": args.seq,
        "mlp": {"kind": "swiglu", "hidden": 2 * args.d_model},
        "mixer": mixer_for(kind, args.d_model, args.heads, args.state),
    }


def train_and_evaluate(kind: str, args, log_every: int = 0) -> dict:
    """Train one model on MQAR; its recall accuracy on held-out examples, and sizes."""
    torch.manual_seed(args.seed)
    ids, labels = mqar_examples(args.examples, args.seq, args.vocab, args.pairs, seed=0)
    val_ids, val_labels = mqar_examples(500, args.seq, args.vocab, args.pairs, seed=1)
    model = build_model(model_spec(kind, args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 10)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, len(ids), (args.batch,), generator=g)
        loss = model(ids[rows], labels=labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  {kind} step {step + 1}: loss {loss.item():.3f}, accuracy {accuracy(model, val_ids, val_labels):.3f}"
            )
    fp = model.kv_footprint(torch.float32)
    return {
        "model": kind,
        "params": model.num_parameters(),
        "state_bytes": fp.total_bytes(args.seq),
        "accuracy": accuracy(model, val_ids, val_labels),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def accuracy(model, ids, labels) -> float:
    model.eval()
    asked = labels != -100
    correct = 0
    for start in range(0, len(ids), 100):
        logits = model(ids[start : start + 100])
        correct += ((logits.argmax(-1) == labels[start : start + 100]) & asked[start : start + 100]).sum().item()
    model.train()
    return correct / asked.sum().item()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="attention,retention,mamba2")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--state", type=int, default=None, help="recurrent mixers' key width (default d_model / heads)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--states", default=None, help="comma-separated state widths to sweep the recurrent mixers over")
    p.add_argument("--plot", default=None, help="with --states: accuracy against state bytes, into this PNG")
    return p


def main() -> None:
    args = parser().parse_args()
    task = f"MQAR: {args.pairs} pairs, {args.seq} tokens, vocab {args.vocab}"
    models = f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, state {args.state or 'd_model/heads'}"
    print(f"{task}; {models}; {args.steps} steps of {args.batch}, lr {args.lr}, seed {args.seed}")
    print("| model | state width | params | cache/state per sequence (fp32) | recall accuracy | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    widths = [int(w) for w in args.states.split(",")] if args.states else [args.state]
    results = []
    for kind in args.models.split(","):
        for width in [None] if kind == "attention" else widths:  # attention's cache is its sequence's, not a state
            args.state = width
            r = train_and_evaluate(kind, args, args.log_every) | {"width": width}
            results.append(r)
            shown = "-" if width is None else str(width)
            print(f"| {kind} | {shown} | {r['params']:,} | {r['state_bytes']:,} B | {r['accuracy']:.3f} | "
                  f"{r['seconds']:.0f} |", flush=True)  # fmt: skip
    if args.plot:
        plot(results, args.plot, task)


def plot(results: list[dict], path: str, title: str) -> None:
    """Recall accuracy against the bytes held per sequence, one line per family (attention: one point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["model"] for r in results):
        rs = sorted((r for r in results if r["model"] == kind), key=lambda r: r["state_bytes"])
        ax.plot([r["state_bytes"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("cache or state per sequence (bytes, fp32)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
