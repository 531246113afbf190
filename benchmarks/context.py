"""Context encoders (CEPE, XC-Cache) against their parent given the same context in its prompt, one process.

    python train.py recipe=cepe_uptrain && python train.py recipe=xc_cache_uptrain
    python benchmarks/context.py outputs/cepe_uptrain/<run> outputs/xc_cache_uptrain/<run>
                                 [--long-context 1536] [--new 32] [--batches 1,8] [--repeats 3]

Quality, on every validation row of the recipes' data (each row: a context, then a continuation): the mean
loss over the continuation's predictions for the parent without the context, the parent with the context in
its prompt (the in-context reference: what the papers compare against), and each uptrained model with its
context (encoded beside the input) and without it.

Cache and speed at ``--long-context`` tokens of context: the bytes a sequence holds for the context (the
encoder's states against the parent's K/V of the same tokens in its prompt), the time to take the context in
(encode it, or prefill it) and greedy decoding after it, ``--new`` tokens at each batch size (eager, the
best of ``--repeats``). The parent's decoding attends to its cached K/V of the context; the context models'
cross layers project the cached states to keys and values at every step, which is the price of caching
states instead of K/V (both papers' choice).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import timed  # benchmarks/common.py, beside this script
from omegaconf import OmegaConf

from kvlab import ModelConfig, build_model
from kvlab.recipes.checkpoint import read_checkpoint
from kvlab.recipes.data import DataConfig, LMDataModule


def load(path: Path):
    model_dict, state = read_checkpoint(path)
    model = build_model(ModelConfig.from_dict(model_dict))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def continuation_loss(model, rows, context: int, how: str, batch: int = 8) -> float:
    """Mean loss over the continuations' predictions: ``how`` is ``alone`` (no context), ``prompt`` (the context
    in front, scored on the continuation only) or ``encoded`` (the context through the model's encoder)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        ctx, cont = ids[:, :context], ids[:, context:]
        if how == "prompt":
            logits = model(ids[:, :-1])[:, context:]
        else:
            logits = model(cont[:, :-1], context=ctx if how == "encoded" else None)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), cont[:, 1:].flatten(), reduction="sum"))
        count += cont[:, 1:].numel()
    return total / count


@torch.no_grad()
def speed(model, length: int, new: int, batch: int, repeats: int, encoded: bool) -> tuple[float, float]:
    """(seconds to take a ``length``-token context in, new tokens/s decoding after it) at ``batch``."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    start = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)

    def take_in():
        if encoded:
            cache = model.new_cache(batch, new + 1, context_len=length)
            return cache, model(start, cache=cache, context=ctx, last_only=True)
        cache = model.new_cache(batch, length + new + 1)
        return cache, model(torch.cat([ctx, start], 1), cache=cache, last_only=True)

    first = timed(take_in, repeats)
    times = []
    for _ in range(repeats + 1):  # each after a fresh take-in, the decoding alone timed
        cache, logits = take_in()
        t0 = time.perf_counter()
        for _step in range(new):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
        times.append(time.perf_counter() - t0)
    return first, batch * new / min(times[1:])  # the first: a warm-up


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path, help="run directories of cepe_uptrain / xc_cache_uptrain")
    p.add_argument("--long-context", type=int, default=1536)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    models, parent_path, data = {}, None, None
    for run in args.runs:
        metrics = json.loads((run / "metrics.json").read_text())
        models[run.parent.name] = load(run / "uptrained" / "checkpoints" / "last.ckpt")  # outputs/<recipe>/<run>
        parent_path = Path(metrics["parent"]["init"]["path"])
        cfg = OmegaConf.load(run / "uptrained" / "checkpoints" / "config.yaml")
        data = OmegaConf.to_container(cfg.data, resolve=True)
    parent = load(parent_path)
    dm = LMDataModule(DataConfig(**data))
    dm.prepare_data()
    dm.setup("fit")
    rows = torch.as_tensor(dm.splits["val"][:]["input_ids"]).long()
    context = data["context"]
    print(f"quality: {len(rows)} validation rows of {context} context + {data['seq_len']} continuation tokens "
          f"(loss over the continuation's {data['seq_len']} predictions)\n")  # fmt: skip
    print("| model | context | val loss | val ppl |\n| --- | --- | ---: | ---: |")
    for name, model, how, label in [("parent (MHA)", parent, "alone", "none"),
                                    ("parent (MHA)", parent, "prompt", "in the prompt")]:  # fmt: skip
        loss = continuation_loss(model, rows, context, how)
        print(f"| {name} | {label} | {loss:.4f} | {torch.tensor(loss).exp():.2f} |")
    for name, model in models.items():
        for how, label in (("encoded", "encoded (cross-attention)"), ("alone", "none")):
            loss = continuation_loss(model, rows, context, how)
            print(f"| {name} | {label} | {loss:.4f} | {torch.tensor(loss).exp():.2f} |")

    n = args.long_context
    print(f"\ncache and speed with a {n}-token context, {args.new} new tokens (eager, best of {args.repeats})\n")
    print("| model | context held | bytes/context token (bf16) | batch | take the context in (s) | decode tok/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    entries = [("parent (MHA)", parent, False)] + [(name, m, True) for name, m in models.items()]
    for name, model, encoded in entries:
        fp = model.kv_footprint(torch.bfloat16)
        per_token = fp.context_bytes_per_token if encoded else fp.bytes_per_token
        held = "encoder states" if encoded else "K/V in the prompt"
        for batch in (int(b) for b in args.batches.split(",")):
            first, rate = speed(model, n, args.new, batch, args.repeats, encoded)
            print(f"| {name} | {held} | {per_token:,} | {batch} | {first:.3f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
