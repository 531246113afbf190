"""Uptraining runs over seeds: each conversion's stages as a mean with a 95% interval, paired by seed.

    python benchmarks/uptrain_seeds.py DIR [DIR ...] [--alike NAME=SWEEP_DIR ...]

Each DIR is an uptraining multirun (``python train.py -m recipe=gqa_uptrain
seed=0,1,2 ...``) or a single run's directory. Runs group by what they
converted to and how (``convert.to``, ``convert.method``). For each group:
the parent's validation loss, the converted model's before any training,
the uptrained one's, each as mean ± 95% interval over the seeds, and the
uptrained model's loss minus its parent's, paired by seed. ``--alike
NAME=SWEEP_DIR`` adds, for comparison, the ``NAME`` runs of an ablation
sweep (the converted architecture trained from scratch alike: same data,
steps and seeds), paired with the parents by seed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from common import interval_cell  # benchmarks/common.py, beside this script


def _runs(directory: Path) -> list[dict]:
    single = directory / "metrics.json"
    found = [single] if single.is_file() else sorted(directory.glob("*/metrics.json"))
    runs = [json.loads(path.read_text()) for path in found]
    return [m for m in runs if "uptrained" in m and "parent" in m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--alike", action="append", default=[], help="NAME=SWEEP_DIR: NAME's runs trained from scratch")
    args = p.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in args.dirs:
        for m in _runs(d):
            c = m.get("convert") or {}
            name = c.get("to", "?") + (f" ({c['method']})" if c.get("method") else "")
            groups[name].append(m)
    if not groups:
        raise SystemExit(f"no uptraining runs (metrics.json with parent and uptrained stages) under {args.dirs}")
    parents = {m["seed"]: m["parent"]["val_loss"] for ms in groups.values() for m in ms}
    print("| model | seeds | KV bytes/token | parent | converted | uptrained | uptrained - parent, paired |")
    print("| --- | --- | ---: | --- | --- | --- | --- |")
    for name, ms in groups.items():
        ms = sorted(ms, key=lambda m: m["seed"])
        diffs = [m["uptrained"]["val_loss"] - m["parent"]["val_loss"] for m in ms]
        stages = " | ".join(interval_cell([m[s]["val_loss"] for m in ms]) for s in ("parent", "converted", "uptrained"))
        print(f"| {name} | {' '.join(str(m['seed']) for m in ms)} | {ms[0]['uptrained']['kv_bytes_per_token']:,} | "
              f"{stages} | {interval_cell(diffs)} |")  # fmt: skip
    for spec in args.alike:
        name, _, sweep = spec.partition("=")
        runs = [json.loads(f.read_text()) for f in sorted(Path(sweep).glob(f"*-{name}/metrics.json"))]
        runs = [m for m in runs if m["seed"] in parents]
        if not runs:
            raise SystemExit(f"--alike {spec}: no {name} run at the parents' seeds {sorted(parents)} in {sweep}")
        runs.sort(key=lambda m: m["seed"])
        diffs = [m["val_loss"] - parents[m["seed"]] for m in runs]
        seeds, losses = " ".join(str(m["seed"]) for m in runs), [m["val_loss"] for m in runs]
        print(f"| {name}, trained alike from scratch | {seeds} | {runs[0]['kv_bytes_per_token']:,} | | | "
              f"{interval_cell(losses)} | {interval_cell(diffs)} |")  # fmt: skip


if __name__ == "__main__":
    main()
