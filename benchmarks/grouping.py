"""Grouping an MHA parent's heads into GQA, every way kvlab knows, at one KV budget: one markdown table.

    python benchmarks/grouping.py [--methods mean,qcqa_ac,...] [--out DIR] [override ...]

Each method is ``train.py recipe=gqa_uptrain`` with its ``init.convert`` (the
parent is the uptraining recipes' cached MHA one, trained once), so every row
starts from the same weights, keeps the same cache (n_heads / 4 K/V heads per
layer on average: bf16 bytes per token in the table) and uptrains on the same
tokens. The table gives each method's val loss before training (converted)
and after uptraining, and the weight-sharing error (QCQA's proxy) of the
grouping it chose, computed on the parent's weights. The ``dha_*`` methods
are ``recipe=dha_uptrain`` (decoupled key and value heads); their training
tokens count those DHA's fusion trained on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = {  # label -> init.convert overrides
    "mean": ["init.convert.method=mean"],
    "first": ["init.convert.method=first"],
    "similarity": ["init.convert.method=similarity"],
    "similarity_uneven": ["init.convert.method=similarity", "+init.convert.uneven=true"],
    "weighted": ["init.convert.method=weighted"],
    "qcqa_ac": ["init.convert.method=qcqa", "+init.convert.uneven=true"],
    "qcqa_ec": ["init.convert.method=qcqa"],
    "asymgqa": ["init.convert.method=asymgqa", "+init.convert.uneven=true"],
    "kdgqa": ["init.convert.method=mean", "+init.convert.query_allocation=kdgqa"],
    "dgqa": ["init.convert.method=mean", "+init.convert.query_allocation=dgqa"],
    # GQA mean-pooled, uptrained on as many more tokens as DHA's fusion trains on (51,000: 25 more steps of 2,048)
    "mean_plus_fusion_tokens": ["init.convert.method=mean", "uptrain.steps=40"],
    # DHA (recipe dha_uptrain): key and value heads clustered apart, n_heads / 4 of each per layer on average
    "dha_mean": ["recipe=dha_uptrain", "init.convert.method=similarity", "init.convert.adaptive=false"],
    "dha_mean_adaptive": ["recipe=dha_uptrain", "init.convert.method=similarity"],
    "dha_fusion": ["recipe=dha_uptrain", "init.convert.adaptive=false"],
    "dha_fusion_adaptive": ["recipe=dha_uptrain"],
    "dha_fusion_k3v1": [
        "recipe=dha_uptrain",
        "init.convert.adaptive=false",
        "init.convert.n_k_heads=3",
        "init.convert.n_v_heads=1",
    ],  # fmt: skip
}


def grouping_wse(parent_ckpt: Path, model: dict) -> float | None:
    """The weight-sharing error of the converted model's grouping, on the parent's K/V weights (key heads
    and value heads each by their own grouping where they differ, as in DHA)."""
    from kvlab.archs.grouping import projection_gram, weight_sharing_error
    from kvlab.recipes.checkpoint import read_checkpoint

    _, state = read_checkpoint(parent_ckpt)
    mixers = [model["mixer"]] * model["n_layers"] if model.get("mixer") else [
        model["mixers"][name] for name in (model["pattern"] * model["n_layers"])[: model["n_layers"]]]  # fmt: skip
    total = 0.0
    for i, m in enumerate(mixers):
        for proj, reads, n in (("k", "kv_groups", "n_kv_heads"), ("v", "v_groups", "n_v_heads")):
            w = state[f"model.layers.{i}.mixer.{proj}_proj.weight"]
            heads = w.shape[0] // m["head_dim"]
            query_map = m.get(reads) or m.get("kv_groups")  # per query head, the head it reads
            if query_map:  # one query head per parent K/V head (MHA)
                labels = query_map[:: len(query_map) // heads]
            else:
                labels = [h * (m.get(n) or m["n_kv_heads"]) // heads for h in range(heads)]
            groups: dict[int, list[int]] = {}
            for h, g in enumerate(labels):
                groups.setdefault(g, []).append(h)
            total += weight_sharing_error(projection_gram(w, heads), list(groups.values()))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_grouping"))
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. uptrain.lr=3e-4 seed=1")
    args = parser.parse_args()
    rows = []
    for label in args.methods.split(","):
        run_dir = Path(args.out) / label
        if not (run_dir / "metrics.json").is_file():
            overrides = METHODS[label] if METHODS[label][0].startswith("recipe=") else ["recipe=gqa_uptrain",
                                                                                         *METHODS[label]]  # fmt: skip
            cmd = [sys.executable, str(REPO / "train.py"), *overrides,
                   f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *args.overrides]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=REPO)
        m = json.loads((run_dir / "metrics.json").read_text())
        parent = Path(m["parent"]["init"]["path"])
        # weighted: learned merge weights, not a pooling; similarity: its heads were permuted before pooling
        wse = None if label in ("weighted", "similarity") else grouping_wse(parent, m["model"])
        if "dha" in label:  # the tokens DHA's fusion trained on, beside the uptraining's
            report = json.loads((run_dir / "uptrained" / "convert_report.json").read_text())
            m["uptrained"]["tokens_seen"] += report["dha"]["fusion_tokens"]
        rows.append((label, m, wse))
    parent = rows[0][1]["parent"]
    print(f"\noverrides: {' '.join(args.overrides) or '(none)'}; parent MHA val loss {parent['val_loss']:.3f}, "
          f"{parent['kv_bytes_per_token']:,} bytes/token (bf16)\n")  # fmt: skip
    print("| method | KV bytes/token (bf16) | WSE of the grouping | training tokens | converted, no training "
          "| uptrained |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, m, wse in rows:
        print(f"| {label} | {m['kv_bytes_per_token']:,} | {'' if wse is None else f'{wse:.1f}'} | "
              f"{m['uptrained']['tokens_seen']:,} | {m['converted']['val_loss']:.3f} | "
              f"{m['uptrained']['val_loss']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
