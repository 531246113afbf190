"""MatryoshkaKV's graceful degradation: one model's validation loss as its cache rank shrinks, PCA vs trained.

    python benchmarks/matryoshka.py [--out DIR] [--ranks 4,8,16,24,32] [override ...]

Runs ``train.py recipe=matryoshka_uptrain`` (the uptraining recipes' cached MHA
parent, PCA-initialised projections, the Matryoshka rank schedule) unless its
run is already in ``--out``, then evaluates at every rank (keys and values
alike) on the same validation batches: the converted model (PCA bases, no
training) and the uptrained one, each from its one set of weights
(``kvlab.archs.convert.with_kv_rank``). Also the greedy search's per-layer
and per-head ranks within 3/8 of the full width (between ranks 8 and 16),
from the converted model. Val loss is the token mean over the run's validation batches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@torch.no_grad()
def val_loss(model, batches) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        n = int((labels != -100).sum())
        total += model(batch["input_ids"], labels=labels).item() * n
        count += n
    return total / count


def main() -> None:
    from kvlab import build_model
    from kvlab.archs import ModelConfig
    from kvlab.archs.convert import calibration_rows, convert_model, with_kv_rank
    from kvlab.recipes.checkpoint import read_checkpoint
    from kvlab.recipes.config import TrainConfig
    from kvlab.recipes.data import build_datamodule
    from kvlab.recipes.run import train_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_matryoshka"))
    parser.add_argument("--ranks", default="4,8,16,24,32")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. uptrain.lr=3e-4")
    args = parser.parse_args()
    run_dir = Path(args.out)
    if not (run_dir / "metrics.json").is_file():
        cmd = [sys.executable, str(REPO / "train.py"), "recipe=matryoshka_uptrain", f"hydra.run.dir={run_dir}",
               "trainer.progress_bar=false", *args.overrides]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    saved = OmegaConf.load(run_dir / "uptrained" / "checkpoints" / "config.yaml")
    tc = train_config(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    datamodule = build_datamodule(tc.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())[: tc.trainer.limit_val_batches]
    rows = calibration_rows(metrics["convert"])
    calibration = torch.as_tensor(datamodule.splits["train"][:rows]["input_ids"])[:, :-1].long()

    parent_dict, parent_state = read_checkpoint(metrics["parent"]["init"]["path"])
    parent = build_model(ModelConfig.from_dict(parent_dict))
    parent.load_state_dict({k.removeprefix("model."): v for k, v in parent_state.items()})
    converted = convert_model(parent, dict(metrics["convert"]), calibration=calibration)
    up_dict, up_state = read_checkpoint(run_dir / "uptrained" / "checkpoints" / "last.ckpt")
    uptrained = build_model(ModelConfig.from_dict(up_dict))
    uptrained.load_state_dict({k.removeprefix("model."): v for k, v in up_state.items()})

    print(f"\nparent MHA val loss {val_loss(parent, batches):.3f} ({metrics['parent']['kv_bytes_per_token']:,} "
          f"bytes/token bf16); overrides: {' '.join(args.overrides) or '(none)'}\n")  # fmt: skip
    print("| rank (keys, values) | KV bytes/token (bf16) | PCA, no training | uptrained (Matryoshka schedule) |")
    print("| --- | ---: | ---: | ---: |")
    for r in (int(x) for x in args.ranks.split(",")):
        pca, trained = with_kv_rank(converted, [r, r]), with_kv_rank(uptrained, [r, r])
        print(f"| {r}, {r} | {trained.kv_footprint(torch.bfloat16).bytes_per_token:,} | "
              f"{val_loss(pca, batches):.3f} | {val_loss(trained, batches):.3f} |")  # fmt: skip
    report = {}
    spec = {**metrics["convert"], "rank": None, "budget": 0.375}
    greedy = convert_model(parent, spec, calibration=calibration, report=report)
    size = greedy.kv_footprint(torch.bfloat16).bytes_per_token
    print(f"\ngreedy per-layer ranks within 3/8 of the width (PCA, no training): {report['matryoshka_ranks']}, "
          f"{size:,} bytes/token, val loss {val_loss(greedy, batches):.3f}")  # fmt: skip
    report = {}
    start = time.perf_counter()
    per_head = convert_model(parent, {**spec, "per_head": True}, calibration=calibration, report=report)
    seconds = time.perf_counter() - start
    size = per_head.kv_footprint(torch.bfloat16).bytes_per_token
    print(f"\ngreedy per-head ranks within 3/8 of the width (PCA, no training; search {seconds:.0f} s): "
          f"{report['matryoshka_ranks']}, {size:,} bytes/token, "
          f"val loss {val_loss(per_head, batches):.3f}")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
