"""Long context, where the architectures differ: decoding speed and memory per preset as the context grows.

    python benchmarks/long_context.py [--presets mha,gqa,mqa,mla,cla,yoco_swa,samba,samba_m2,mamba2,rwkv7,recurformer]
        [--contexts 1024,4096,16384,32768] [--new 32] [--budget-gib 4] [--max-batch 128]
        [--plot benchmarks/long_context.png] [--timeout 1800] [--prefill-chunk N]

For each preset (random weights: speed and memory do not depend on them) and
context length, in a fresh process so that its peak memory is its own:

- batch 1: a prompt of ``context`` tokens is prefilled (``model.prefill``,
  as ``generate`` does) and decoded from;
  time to first token (the prefill and the first decode step), then decode
  speed over ``new`` tokens through ``generate``'s compiled step (its
  compilation, done before on the same shapes, is reported apart);
- the largest batch whose cache (as allocated) fits ``--budget-gib``
  (at most ``--max-batch``): decode speed over ``new`` steps at that context
  (the cache holds ``context`` positions of zeros: a step's work does not
  depend on what they hold, and prefilling a large batch of long prompts on a
  CPU would take hours);
- memory: the analytic footprint per sequence at the context
  (``model.kv_footprint``), the cache actually allocated, and the process's
  peak resident memory (``ru_maxrss``) after the batch-1 run and after the
  large batch, beside its resident memory once the model is built.

A configuration that fails or runs past ``--timeout`` is reported as such.
Prints a markdown table; ``--plot`` draws tokens/s and memory against the
context, one line per preset (matplotlib, ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = "mha,gqa,mqa,mla,cla,yoco_swa,samba,samba_m2,mamba2,rwkv7,recurformer"  # the README's figure
MIB = 1 << 20


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(preset: str, context: int, new: int, budget: int, max_batch: int, prefill_chunk: int | None) -> dict:
    """One preset at one context, in this process (see the module's docstring)."""
    import torch

    from kvlab import ModelConfig, build_model
    from kvlab.archs.decode import cache_length, decode_step_for

    spec = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{preset}.yaml").to_dict()
    spec["max_seq_len"] = max(spec["max_seq_len"], context + new)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    step = decode_step_for(model, True)
    length = cache_length(context + new, model.config.max_seq_len)
    out = {"preset": preset, "context": context, "rss_model_mib": _rss_mib()}
    out["footprint_mib"] = model.kv_footprint(torch.float32).total_bytes(context) / MIB
    with torch.no_grad():
        # batch 1: compile on these shapes first (a cache of zeros at the context), then prefill and decode
        cache = model.new_cache(1, length)
        out["allocated_mib"] = cache.allocated_bytes() / MIB
        token = torch.zeros(1, 1, dtype=torch.long)
        cache.seen = context
        t0 = time.perf_counter()
        step(token, cache)
        out["compile_s"] = time.perf_counter() - t0
        model(token.repeat(1, 16), cache=model.new_cache(1, 16))  # the eager path's first-call costs, not timed
        cache.reset()
        ids = torch.randint(0, model.config.vocab_size, (1, context))
        t0 = time.perf_counter()
        logits = model.prefill(ids, cache, chunk=prefill_chunk)  # as generate prefills (None: PREFILL_CHUNK pieces)
        logits = step(logits.argmax(-1)[:, None], cache)
        out["ttft_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(new - 1):
            logits = step(logits.argmax(-1)[:, None], cache)
        out["tokens_per_s_b1"] = (new - 1) / (time.perf_counter() - t0)
        out["peak_rss_b1_mib"] = _peak_rss_mib()
        del cache, logits
        # the largest batch whose allocated cache fits the budget
        per_sequence = model.new_cache(1, length).allocated_bytes()
        batch = min(max_batch, budget // per_sequence) if per_sequence else max_batch
        out["batch"] = int(batch)
        if batch >= 1:
            cache = model.new_cache(batch, length)
            tokens = torch.zeros(batch, 1, dtype=torch.long)
            cache.seen = context
            step(tokens, cache)  # compiles for this batch
            cache.seen = context
            t0 = time.perf_counter()
            for _ in range(new):
                step(tokens, cache)
            out["tokens_per_s_batch"] = batch * new / (time.perf_counter() - t0)
            out["peak_rss_batch_mib"] = _peak_rss_mib()
    return out


def run_one(args, preset: str, context: int) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{preset}:{context}", "--new", str(args.new),
           "--budget-gib", str(args.budget_gib), "--max-batch", str(args.max_batch)]  # fmt: skip
    if args.prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "context": context, "error": f"over {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"preset": preset, "context": context, "error": f"exit {done.returncode}: {why[:120]}"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = ("| preset | context | footprint MiB/seq | cache allocated MiB | peak RSS MiB, batch 1 (model built) "
            "| time to first token s | tokens/s, batch 1 | batch in budget | tokens/s at that batch "
            "| peak RSS MiB at that batch |")  # fmt: skip
    lines = [head, "| --- " * (head.count("|") - 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['context']:,} | {r['error']} |" + " |" * 7)
            continue
        batched = (f"{r['tokens_per_s_batch']:,.0f} | {r['peak_rss_batch_mib']:,.0f}"
                   if r["batch"] >= 1 else "- | -")  # fmt: skip
        lines.append(
            f"| {r['preset']} | {r['context']:,} | {r['footprint_mib']:,.1f} | {r['allocated_mib']:,.1f} "
            f"| {r['peak_rss_b1_mib']:,.0f} ({r['rss_model_mib']:,.0f}) | {r['ttft_s']:.2f} "
            f"| {r['tokens_per_s_b1']:,.0f} | {r['batch']} | {batched} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, budget_gib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    panels = [
        ("tokens_per_s_b1", "decode tokens/s, batch 1"),
        ("tokens_per_s_batch", f"decode tokens/s, largest batch in {budget_gib:g} GiB"),
        ("batch", f"largest batch whose cache fits {budget_gib:g} GiB"),
        ("footprint_mib", "cache per sequence, MiB (fp32, analytic)"),
    ]
    for i, preset in enumerate(dict.fromkeys(r["preset"] for r in rows)):
        ok = [r for r in rows if r["preset"] == preset and "error" not in r]
        style = ("-", "--", ":")[i // 10 % 3]  # past the colour cycle's 10 colours, the line tells them apart
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(r["context"], r[key]) for r in ok if key in r and r[key] > 0]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=preset)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per preset and context")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens per prefill call (default: generate's PREFILL_CHUNK; 0: the prompt in one call)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # preset:context, in a child process
    args = p.parse_args()
    budget = int(args.budget_gib * (1 << 30))
    if args.one:
        preset, context = args.one.split(":")
        print(json.dumps(measure(preset, int(context), args.new, budget, args.max_batch, args.prefill_chunk)))
        return
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, {args.new} new tokens, "
          f"budget {args.budget_gib:g} GiB of cache, batch at most {args.max_batch}")  # fmt: skip
    rows = []
    for preset in args.presets.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            rows.append(run_one(args, preset, context))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print()
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot, args.budget_gib)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
