"""Every model preset after the same short training on the default data: one markdown table.

    python benchmarks/presets.py [--steps 300] [--presets mha,gqa,...] [--out DIR] [override ...]

Runs ``train.py -m model=<presets>`` (one Hydra multirun, identical data,
optimizer, seed and steps; the presets share d_model, depth and widths)
and tabulates each run's metrics.json: parameters, KV-cache bytes per token
and fixed bytes per sequence (bf16), and validation perplexity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    presets = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--presets", default=",".join(presets))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_presets"))
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. seed=1")
    args = parser.parse_args()
    cmd = [sys.executable, str(REPO / "train.py"), "-m", f"model={args.presets}", f"trainer.max_steps={args.steps}",
           f"output_root={args.out}", "run_name=presets", "trainer.progress_bar=false", *args.overrides]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO)
    sweep = sorted((Path(args.out) / "presets").glob("multirun-*"))[-1]
    rows = []
    for run in sorted(sweep.iterdir(), key=lambda p: int(p.name.split("-")[0]) if p.name[0].isdigit() else -1):
        if not (run / "metrics.json").is_file():
            continue
        m = json.loads((run / "metrics.json").read_text())
        rows.append((run.name.split("-", 1)[1], m))
    print(f"\n{args.steps} steps each {' '.join(args.overrides)}; footprint in bf16, one sequence\n")
    print("| preset | params | KV bytes/token | fixed bytes | bytes at 2,048 tokens | val ppl |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in rows:
        at_2k = m["kv_bytes_per_token"] * 2048 + m["kv_fixed_bytes"]
        print(f"| {name} | {m['params']:,} | {m['kv_bytes_per_token']:,} | {m['kv_fixed_bytes']:,} | {at_2k:,} "
              f"| {m['val_ppl']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
