"""Cache policies on a parent against conversions of it, over seeds: validation loss against cache bytes.

    python benchmarks/equal_bytes.py --parent SEED=CKPT [...] --conversion NAME:SEED=CKPT [...]
        [--policies int4,kivi-2,sinks-64] [--batches 8] [--context 2048] [--csv PATH] [--hf-route]

Each ``--parent`` is one seed's parent checkpoint (a kvlab ``.ckpt``), each
``--conversion`` the checkpoint of the model ``NAME`` made from that seed's
parent (uptrained, or trained alike from scratch: any checkpoint whose data
and tokenizer are the parent's). Every model is scored on the same first
``--batches`` validation batches of the parent's data (its run's
``checkpoints/config.yaml``): conversions and the parent by the forward's
loss, the parent through each of ``--policies`` by decoding every row token
by token through a cache held that way (``kvlab.recipes.evals.decoded_logits``,
where each token reads its past back from the cache), over every labelled token and
over the AR hits (tokens completing a bigram seen earlier in the row). Bytes are one
sequence's cache in bf16 at ``--context`` tokens, exactly
(``model.kv_footprint(policy).total_bytes``). The table gives, per row, the
mean over seeds with a 95% interval (Student's t) and the difference from
the parent's own loss paired by seed; ``--csv`` keeps every (row, seed) value.

``--hf-route`` scores each parent a second time the way a user's pretrained
model arrives: exported to a Hugging Face directory (``save_hf``: MHA is a
native Llama there) and imported back (``load_hf``), every policy applied
to the imported model. Its rows must equal the parent's own (the import is
exact); they are printed beside them.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
from collections import defaultdict
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interval_cell  # benchmarks/common.py, beside this script
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from kvlab.archs.hf import load_hf, save_hf
from kvlab.layers.cache_policy import CachePolicy
from kvlab.recipes.checkpoint import load_checkpoint_model
from kvlab.recipes.data import DataConfig, build_datamodule
from kvlab.recipes.evals import decoded_logits
from kvlab.recipes.module import LMModule, associative_recall_hits

POLICIES = {
    "int8": "int8",
    "int4": "int4",
    "fp8": "fp8",
    "kivi-4": {"kind": "kivi", "bits": 4},
    "kivi-2": {"kind": "kivi", "bits": 2},
    "sinks-64": {"kind": "sinks", "sinks": 4, "window": 60},
    "sinks-64-int4": {"kind": "sinks", "sinks": 4, "window": 60, "codec": "int4"},  # both: evicting and coding
    "h2o-64": {"kind": "h2o", "budget": 64, "window": 32},
    "minicache": "minicache",  # MiniCache: layers merged in pairs from the middle one
    "minicache-all": {"kind": "minicache", "start_layer": 0},  # every layer merged with its neighbour
    "minicache-all-retain0": {"kind": "minicache", "start_layer": 0, "retain": 0.0},  # no position kept unmerged
    "minicache-all-retain20": {"kind": "minicache", "start_layer": 0, "retain": 0.2},
    "minicache-all-t05": {"kind": "minicache", "start_layer": 0, "interpolation": 0.5},  # the two directions alike
}


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not Path(path).expanduser().is_file():
            raise SystemExit(f"{flag} {item!r}: give KEY=PATH with an existing checkpoint file")
        out.append((key, str(Path(path).expanduser())))
    return out


def val_batches(ckpt: str, n: int) -> list[dict]:
    """The first ``n`` validation batches of the data ``ckpt``'s run trained on."""
    cfg = OmegaConf.load(Path(ckpt).parent / "config.yaml")
    datamodule = build_datamodule(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)), seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return list(islice(datamodule.val_dataloader(), n))


@torch.inference_mode()
def scores(model, batches: list[dict], policy=None) -> dict[str, float]:
    """The mean cross-entropy over the labelled tokens of ``batches`` and over those completing a bigram seen
    earlier in the row (Zoology's AR hits: what recall predicts, and what evicting the past should hurt first);
    one forward per batch without a ``policy``, token by token through its cache with one."""
    sums = {"loss": [0.0, 0], "ar_hit": [0.0, 0]}
    for batch in tqdm(batches, desc="batches", unit="batch", leave=False, disable=None):
        if policy is None:
            ids, labels, _ = LMModule._inputs(model, batch)
            logits = model(ids)
        else:
            ids, labels, logits = decoded_logits(model, batch, policy)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
        asked = labels != -100
        for name, mask in (("loss", asked), ("ar_hit", associative_recall_hits(ids, labels) & asked)):
            sums[name][0] += float((ce * mask).sum())
            sums[name][1] += int(mask.sum())
    return {name: total / max(count, 1) for name, (total, count) in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", action="append", required=True, help="SEED=CKPT, once per seed")
    p.add_argument("--conversion", action="append", default=[], help="NAME:SEED=CKPT")
    p.add_argument("--policies", default="int4,kivi-2,sinks-64", help=f"of {', '.join(POLICIES)}")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--csv", default=None)
    p.add_argument("--hf-route", action="store_true", help="also score each parent exported to and imported from HF")
    args = p.parse_args()
    policies = [s for s in args.policies.split(",") if s]
    unknown = [s for s in policies if s not in POLICIES]
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown}; valid: {', '.join(POLICIES)}")
    parents = dict(_pairs(args.parent, "--parent"))
    conversions = defaultdict(dict)
    for key, path in _pairs(args.conversion, "--conversion"):
        name, sep, seed = key.rpartition(":")
        if not sep or seed not in parents:
            raise SystemExit(f"--conversion {key!r}: give NAME:SEED with a SEED among --parent's {sorted(parents)}")
        conversions[name][seed] = path

    values: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)  # row -> seed -> {loss, ar_hit}
    nbytes: dict[str, int] = {}
    for seed, ckpt in parents.items():
        batches = val_batches(ckpt, args.batches)
        parent = load_checkpoint_model(ckpt).eval()
        routes = {"parent": parent}
        if args.hf_route:
            with tempfile.TemporaryDirectory() as tmp:
                save_hf(parent, Path(tmp) / "hf")
                routes["parent via HF"] = load_hf(Path(tmp) / "hf").eval()
        for route, model in routes.items():
            values[route][seed] = scores(model, batches)
            nbytes[route] = model.kv_footprint().total_bytes(args.context)
            for name in policies:
                policy = CachePolicy.from_spec(POLICIES[name])
                values[f"{route} + {name}"][seed] = scores(model, batches, policy)
                nbytes[f"{route} + {name}"] = model.kv_footprint(policy=policy).total_bytes(args.context)
        for name, by_seed in conversions.items():
            if seed in by_seed:
                model = load_checkpoint_model(by_seed[seed]).eval()
                values[name][seed] = scores(model, batches)
                nbytes[name] = model.kv_footprint().total_bytes(args.context)
        print(f"seed {seed}: " + ", ".join(f"{row} {v[seed]['loss']:.4f}" for row, v in values.items() if seed in v),
              flush=True)  # fmt: skip

    seeds = sorted(parents)
    for metric, title in (("loss", "validation loss"), ("ar_hit", "loss on AR-hit tokens")):
        print(f"\n{title}\n\n| model | bytes at {args.context:,} tokens | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean (95% CI) | - parent's, paired by seed (95% CI) |")  # fmt: skip
        print("| --- | ---: | " + "---: | " * len(seeds) + "--- | --- |")
        for row, by_seed in values.items():
            diffs = [v[metric] - values["parent"][s][metric] for s, v in by_seed.items()]
            cells = " | ".join(f"{by_seed[s][metric]:.4f}" if s in by_seed else "-" for s in seeds)
            diff = "-" if row == "parent" else interval_cell(diffs, signed=True)
            print(f"| {row} | {nbytes[row]:,} | {cells} | {interval_cell([v[metric] for v in by_seed.values()])} "
                  f"| {diff} |")  # fmt: skip
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "seed", "val_loss", "val_loss_ar_hit", f"bytes_at_{args.context}"])
            for row, by_seed in values.items():
                for s, v in by_seed.items():
                    w.writerow([row, s, f"{v['loss']:.6f}", f"{v['ar_hit']:.6f}", nbytes[row]])
    if any(math.isnan(x) for by_seed in values.values() for v in by_seed.values() for x in v.values()):
        raise SystemExit("a loss is NaN")


if __name__ == "__main__":
    main()
