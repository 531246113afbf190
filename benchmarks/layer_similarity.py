"""How alike adjacent layers' cached keys and values are: MiniCache's premise (Liu et al. 2024, their Figure 1a:
high similarity from the middle to the deep layers of large models), measured on a checkpoint's validation rows.

For each pair of consecutive layers that own a full K/V cache: the mean cosine similarity of the two layers'
key vectors at the same position and K/V head (and of their value vectors), and the mean angular distance
(arccos / pi) MiniCache's retention ranks by.

    python benchmarks/layer_similarity.py --ckpt <run>/checkpoints/last.ckpt --batches 2
"""

from __future__ import annotations

import argparse

import torch
from equal_bytes import val_batches  # benchmarks/equal_bytes.py, beside this script

from kvlab.layers.cache_policy import slerp_merge
from kvlab.layers.kv_cache import StaticKV
from kvlab.recipes.checkpoint import load_checkpoint_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batches", type=int, default=2)
    args = p.parse_args()
    model = load_checkpoint_model(args.ckpt).eval()
    sums: dict[tuple[int, int], list[float]] = {}
    for batch in val_batches(args.ckpt, args.batches):
        ids = batch["input_ids"]
        cache = model.new_cache(ids.shape[0], ids.shape[1], dtype=torch.float32)
        with torch.no_grad():
            model(ids, cache=cache)
        owners = [i for i, s in enumerate(cache.slots) if type(s) is StaticKV]
        for lower, upper in zip(owners, owners[1:], strict=False):
            a, b = cache.slots[lower].view(ids.shape[1]), cache.slots[upper].view(ids.shape[1])
            if a.k.shape != b.k.shape or a.v.shape != b.v.shape:
                continue
            cosines = [torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in ((a.k, b.k), (a.v, b.v))]
            distances = [slerp_merge(x, y, 0.5)[2] for x, y in ((a.k, b.k), (a.v, b.v))]  # as MiniCache ranks by
            row = [float(x.mean()) for x in cosines + distances] + [1.0]
            sums[lower, upper] = [s + r for s, r in zip(sums.get((lower, upper), [0.0] * 5), row, strict=True)]
    print("| layers | keys: mean cosine | values: mean cosine | keys: mean angular distance | values: same |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (lower, upper), s in sums.items():
        n = s[-1]
        print(f"| {lower}-{upper} | {s[0] / n:.3f} | {s[1] / n:.3f} | {s[2] / n:.3f} | {s[3] / n:.3f} |")


if __name__ == "__main__":
    main()
