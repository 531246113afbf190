"""Cache policies: what each holds and what decoding through it costs, beside the full-precision cache, one process.

    python benchmarks/cache_policy.py [--preset gqa] [--ckpt PATH] [--context 1024] [--new 32] [--batches 1,8]
        [--policies none,int8,int4,fp8,kivi-4,kivi-2,sinks-256,h2o-256,snapkv-256] [--repeats 3] [--eager-only]

For each policy (``kvlab.layers.cache_policy``) and batch size: the bf16
footprint per token and one sequence's exact bytes after ``context +
new`` tokens (``model.kv_footprint(policy=...)``, equal to ``cache.nbytes()``:
checked), and the decoding speed: a prompt of ``context`` random tokens is
prefilled (not timed), then ``new`` greedy steps are timed, eagerly
(``model(token, cache=...)``: what is held is dequantized every step) and,
for the policies whose steps have static shapes, through ``generate``'s
compiled decode step. Best of ``repeats`` after a warm-up; the policies
interleaved per repeat so drift hits all alike. Weights are random unless
``--ckpt`` (a kvlab checkpoint) is given: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from kvlab import ModelConfig, build_model
from kvlab.archs.decode import decode_step_for
from kvlab.layers.cache_policy import CachePolicy

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
POLICIES = {
    "none": None,
    "int8": "int8",
    "int4": "int4",
    "fp8": "fp8",
    "kivi-4": {"kind": "kivi", "bits": 4},
    "kivi-2": {"kind": "kivi", "bits": 2},
    "sinks-256": {"kind": "sinks", "sinks": 4, "window": 252},  # StreamingLLM: a quarter of a 1K context
    "sinks-256-int4": {"kind": "sinks", "sinks": 4, "window": 252, "codec": "int4"},  # and the kept ones coded
    "h2o-256": {"kind": "h2o", "budget": 256},  # 128 heavy hitters and 128 recent tokens
    "snapkv-256": {"kind": "snapkv", "budget": 256, "window": 32},  # the prompt kept as 256, then every new token
    "minicache": "minicache",  # MiniCache: layers merged in pairs from the middle one
    "minicache-all": {"kind": "minicache", "start_layer": 0},  # every layer merged with its neighbour
}


def _model(preset: str, ckpt: str | None):
    if ckpt:
        from kvlab.recipes.checkpoint import load_checkpoint_model

        return load_checkpoint_model(ckpt).eval()
    spec = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    return build_model(ModelConfig.from_dict(spec)).eval()


@torch.inference_mode()
def decode_seconds(model, policy, batch: int, context: int, new: int, compiled: bool) -> float:
    """Seconds of ``new`` greedy decode steps after a prefilled ``context``-token prompt."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    cache = model.new_cache(batch, context + new, policy=policy)
    logits = model(ids, cache=cache, last_only=True)[:, -1]
    step = decode_step_for(model, True) if compiled else None
    t0 = time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        logits = step(token, cache) if compiled else model(token, cache=cache)[:, -1]
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gqa")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-only", action="store_true", help="skip the compiled step (and its compilations)")
    args = p.parse_args()
    model = _model(args.preset, args.ckpt)
    names = args.policies.split(",")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise SystemExit(f"--policies: {unknown[0]!r} is not one of {', '.join(POLICIES)}")
    batches = [int(b) for b in args.batches.split(",")]
    end = args.context + args.new
    rows = {}
    for name in names:
        policy = CachePolicy.from_spec(POLICIES[name])
        fp = model.kv_footprint(torch.bfloat16, policy=policy)
        held = fp.total_bytes(end)
        if policy is not None and policy.kind == "snapkv":  # the prompt compressed, then every new token kept
            held = fp.total_bytes(args.context) + args.new * sum(
                r.bytes_per_token for r in fp.per_layer if r.max_tokens == policy.budget
            )
        else:
            check = model.new_cache(1, end, dtype=torch.bfloat16, policy=policy)
            check.seen = end  # the bytes held once that many tokens are in (the footprint's count, checked)
            assert check.nbytes() == held, (name, check.nbytes(), held)
        rows[name] = {"per_token": fp.bytes_per_token, "held": held, "static": policy is None or policy.static_steps}
    compiled = () if args.eager_only else (True,)
    runners = [(n, b, c) for n in names for b in batches for c in (False, *compiled) if not c or rows[n]["static"]]
    best = dict.fromkeys(runners, float("inf"))
    compile_s = {}
    for n, b, c in runners:  # warm-up: the compilation of each shape, reported apart
        t0 = time.perf_counter()
        decode_seconds(model, POLICIES[n], b, args.context, 2, c)
        if c:
            compile_s[(n, b)] = time.perf_counter() - t0
    for _ in range(args.repeats):
        for key in runners:
            best[key] = min(best[key], decode_seconds(model, POLICIES[key[0]], key[1], args.context, args.new, key[2]))
    cfg = model.config
    print(f"model: {args.ckpt or args.preset} (d_model {cfg.d_model}, {cfg.n_layers} layers), prompt {args.context} "
          f"tokens, {args.new} new, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    head = " | ".join(f"tok/s b{b} eager | tok/s b{b} compiled" for b in batches)
    print(f"\n| policy | bf16 bytes/token | bytes at {end} tokens | {head} |")
    print("| --- | ---: | ---: |" + " ---: | ---: |" * len(batches))
    for n in names:
        cells = []
        for b in batches:
            eager = b * args.new / best[(n, b, False)]
            fast = f"{b * args.new / best[(n, b, True)]:,.0f}" if (n, b, True) in best else "-"
            cells += [f"{eager:,.0f}", fast]
        r = rows[n]
        per_token = f"{r['per_token']:,.1f}" if isinstance(r["per_token"], float) else f"{r['per_token']:,}"
        print(f"| {n} | {per_token} | {r['held']:,} | " + " | ".join(cells) + " |")
    if compile_s:
        print("\ncompilation (first call per shape, s): " + ", ".join(f"{n} b{b} {s:.1f}" for (n, b), s in
                                                                   compile_s.items()))  # fmt: skip


if __name__ == "__main__":
    main()
