"""Hymba as its paper builds it beside the looser parallel-heads layout and GQA, one process.

    python benchmarks/hymba.py [--presets hymba,parallel_heads,gqa] [--batch 8] [--seq 256]
                               [--prompt 64] [--new 64] [--context 2048] [--repeats 3]

For each preset (fp32, its own random weights): the training step (forward with the fused loss,
backward, AdamW) at batch x seq tokens; greedy decoding at batch 1, eager and with the compiled
decode step (its compilation apart); and the cache after a ``--context``-token prefill, measured
(``cache.nbytes()``, bf16) against the footprint's analytic bytes, which must be equal (meta tokens,
windows with their sinks and shared K/V included). Best of ``--repeats`` after a warm-up. There is no
`transformers` peer: Hymba ships as remote code on the Hub, which cannot be fetched here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import timed  # benchmarks/common.py, beside this script

from kvlab import ModelConfig, build_model

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="hymba,parallel_heads,gqa")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32\n")
    print("| preset | params | train step (s) | tokens/s | decode eager (tok/s) | decode compiled (tok/s) "
          f"| compile (s) | cache at {args.context:,} tokens, bf16 (measured = analytic) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_yaml(PRESETS / f"{name}.yaml"))
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model(ids, labels=ids.roll(-1, 1)).backward()  # noqa: B023
            optimizer.step()  # noqa: B023
            optimizer.zero_grad(set_to_none=True)  # noqa: B023

        model.train()
        train = timed(step, args.repeats)
        model.eval()
        prompt = ids[:1, : args.prompt]
        with torch.no_grad():
            eager = timed(lambda: model.generate(prompt, args.new, compile=False), args.repeats)  # noqa: B023
            t0 = time.perf_counter()
            compiled_tokens = model.generate(prompt, args.new, compile=True)
            compile_s = time.perf_counter() - t0
            assert torch.equal(compiled_tokens, model.generate(prompt, args.new, compile=False)), name
            compiled = timed(lambda: model.generate(prompt, args.new, compile=True), args.repeats)  # noqa: B023
            cache = model.new_cache(1, args.context, dtype=torch.bfloat16)
            model(torch.randint(0, model.config.vocab_size, (1, args.context)), cache=cache, last_only=True)
        measured, analytic = cache.nbytes(), model.kv_footprint(torch.bfloat16).total_bytes(args.context)
        print(f"| {name} | {model.num_parameters():,} | {train:.2f} | {ids.numel() / train:,.0f} | "
              f"{args.new / eager:.1f} | {args.new / compiled:.1f} | {compile_s - compiled:.0f} | "
              f"{measured:,} ({'=' if measured == analytic else '!='} {analytic:,}) |")  # fmt: skip


if __name__ == "__main__":
    main()
