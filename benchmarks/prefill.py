"""Prefill of one long prompt: at once, or in pieces each on the cache the ones before filled (chunked prefill).

    python benchmarks/prefill.py [--presets gqa,mla,mamba2,rwkv7] [--length 16384]
                                 [--chunks 16384,4096,2048,512] [--repeats 2]
                                 [--baselines mamba1-token-loop,sinks-whole-mask]

For each preset (random weights, batch 1, the presets' widths with
``max_seq_len`` raised to ``length``) a prompt of ``length`` tokens is
prefilled as ``generate`` does (``last_only=True``), in pieces of each
``chunks`` size (the whole length: one call), each on the cache the pieces
before it filled. Prints seconds (best of ``repeats``, the sizes interleaved
so that drift hits all alike), tokens/s and the last logits' largest
difference from the one-call prefill. A chunk is what bounds a long
prompt's activations; what it costs or saves in time depends on the mixer:
recurrent scans and the MLPs pass over cache-sized pieces, attention over
the cached positions and the piece's own is causal with the queries at the
end. ``model.prefill`` (what ``generate`` calls) takes pieces of
``PREFILL_CHUNK`` = 4,096 tokens on a CPU, set from this script's numbers.

``--baselines`` adds, for each size, the prefill with one of kvlab's own
paths as it was before a change, interleaved with the others (their last
column: the difference from the one-call prefill as it is now):
``mamba1-token-loop``, Mamba-1's scan token by token as before its
no-gradient form (``_scan_without_grad`` in ``kvlab/kernels/ssm.py``);
``sinks-whole-mask``, a window with sinks (Hymba's) over one mask of every
key, as before it went block by block (``windowed_attention_with_sinks``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch

from kvlab import ModelConfig, build_model
from kvlab.kernels import ssm
from kvlab.layers.attention import Attention

REPO = Path(__file__).resolve().parents[1]


# kvlab's paths as they were before a change: (owner, attribute, the earlier value)
BASELINES = {
    "mamba1-token-loop": (ssm, "_scan_without_grad", ssm._SelectiveScan.apply),
    "sinks-whole-mask": (Attention, "_sinks_block_by_block", lambda self, q, view, state: False),
}


def prefill(model, ids: torch.Tensor, chunk: int, baseline: str | None = None) -> tuple[float, torch.Tensor]:
    cache = model.new_cache(1, ids.shape[1])
    with mock.patch.object(*BASELINES[baseline]) if baseline else contextlib.nullcontext():
        start = time.perf_counter()
        logits = model.prefill(ids, cache, chunk=chunk)  # the whole length: one call
        return time.perf_counter() - start, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="gqa,mla,mamba2,rwkv7")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--chunks", default="16384,4096,2048,512")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baselines", default="", help=f"also each size with kvlab's earlier path: {', '.join(BASELINES)}")
    args = p.parse_args()
    baselines = [None] + [b for b in args.baselines.split(",") if b]
    for b in baselines[1:]:
        if b not in BASELINES:
            p.error(f"--baselines: {b!r} is not one of {', '.join(BASELINES)}")
    chunks = [(int(c), b) for c in args.chunks.split(",") for b in baselines]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 1, {args.length:,} tokens, fp32\n")
    print("| preset | chunk | prefill s | tokens/s | max abs diff vs one call |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        spec = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{preset}.yaml").to_dict()
        spec["max_seq_len"] = max(spec["max_seq_len"], args.length)
        model = build_model(spec).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, args.length))
        best, last = {}, {}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for run in chunks:
                    seconds, last[run] = prefill(model, ids, *run)
                    best[run] = min(best.get(run, float("inf")), seconds)
        whole = last[max(c for c, _ in chunks), None]
        for run in chunks:
            diff = (last[run] - whole).abs().max().item()
            name = f"{run[0]:,}" + (f", {run[1]}" if run[1] else "")
            print(f"| {preset} | {name} | {best[run]:.2f} | {args.length / best[run]:,.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
