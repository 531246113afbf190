"""Decoding and training speed of this checkout against another checkout of kvlab (a baseline commit).

    git worktree add /tmp/kvlab_base <commit>
    python benchmarks/before_after.py /tmp/kvlab_base [--presets gqa,mla,cla,yoco_swa,lckv] [--rounds 3]

Two versions of one package cannot share a process, so each measurement runs
in a fresh subprocess per checkout, the two alternating round by round (so
that a noisy moment hits both; which goes first alternates too, so a steady
drift does not favour one), and the best round of each is reported. Each
ratio is the best rounds' ratio, and in parentheses the median over rounds
of each round's pair (measured back to back): on a VM whose speed drifts
between processes, a best round can be one lucky process, and the paired
median is the steadier estimate.
Decoding: ``model.generate`` greedy, batch 1, 64-token prompt, 64 new
tokens, best of 5; training: ``model(ids, labels=...)``, backward and an
AdamW step on 4 x 256 tokens, best of 5 steps; prefill: a cached forward
that asks for the last logits only, as ``generate``'s (``last_only=True``),
of 8 x 128 and of 1 x 2,048 tokens, best of 5, and of 1 x 2,048 tokens
in 256-token pieces, each on the cache the ones before filled (a chunked
prefill), best of 4. Same seed, same weights in both checkouts. Every
column is tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from kvlab import ModelConfig, build_model
torch.manual_seed(0)
cfg = ModelConfig.from_yaml(sys.argv[1] + "/configs/model/" + sys.argv[2] + ".yaml")
model = build_model(cfg)
ids = torch.randint(0, cfg.vocab_size, (1, 64))
model.eval()
model.generate(ids, max_new_tokens=8)
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter(); model.generate(ids, max_new_tokens=64); best = min(best, time.perf_counter() - t0)
decode = 64 / best
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.randint(0, cfg.vocab_size, (4, 257))
def step():
    loss = model(batch[:, :-1], labels=batch[:, 1:]); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step()
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter(); step(); best = min(best, time.perf_counter() - t0)
train = 4 * 256 / best
model.eval()
prefill = {}
for key, (rows, length) in {"prefill 8x128": (8, 128), "prefill 1x2048": (1, 2048)}.items():
    prompt = torch.randint(0, cfg.vocab_size, (rows, length))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(6):  # the first warms the allocator
            cache = model.new_cache(rows, length)
            t0 = time.perf_counter()
            model(prompt, cache=cache, last_only=True)
            best = min(best, time.perf_counter() - t0)
    prefill[key] = rows * length / best
prompt, best = torch.randint(0, cfg.vocab_size, (1, 2048)), float("inf")
with torch.inference_mode():  # a long prompt in pieces, each on the cache the ones before filled
    for _ in range(4):
        cache = model.new_cache(1, 2048)
        t0 = time.perf_counter()
        for start in range(0, 2048, 256):
            model(prompt[:, start : start + 256], cache=cache, last_only=True)
        best = min(best, time.perf_counter() - t0)
prefill["prefill 1x2048 by 256"] = 2048 / best
print(json.dumps({"decode": decode, "train": train, **prefill}))
"""


def measure(checkout: str, preset: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, checkout, preset], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", help="a checkout of the commit to compare against")
    p.add_argument("--presets", default="gqa,mla,cla,yoco_swa")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    checkouts = {"baseline": args.baseline, "this": str(REPO)}
    keys = ["decode", "train", "prefill 8x128", "prefill 1x2048", "prefill 1x2048 by 256"]
    print("| preset | " + " | ".join(f"baseline {k} | this {k} | ratio" for k in keys) + " |")
    print("| --- " * (1 + 3 * len(keys)) + "|")
    for preset in args.presets.split(","):
        rounds = []  # per round: {checkout: {key: tokens/s}}
        for r in range(args.rounds):
            order = list(checkouts.items()) if r % 2 == 0 else list(checkouts.items())[::-1]
            rounds.append({name: measure(checkout, preset) for name, checkout in order})
        b, t = ({k: max(run[name][k] for run in rounds) for k in keys} for name in ("baseline", "this"))
        paired = {k: statistics.median(run["this"][k] / run["baseline"][k] for run in rounds) for k in keys}
        cells = (f"{b[k]:,.0f} | {t[k]:,.0f} | {t[k] / b[k]:.2f} ({paired[k]:.2f})" for k in keys)
        print(f"| {preset} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
