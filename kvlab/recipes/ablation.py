"""``python train.py -m recipe=ablation``: model presets trained and evaluated alike, then one table and a plot.

The recipe is a Hydra multirun over ``model`` (every job the same data,
steps, optimizer and seed; stages train + eval). When the sweep ends,
``AblationReport`` (a Hydra callback) reads every job's ``metrics.json``
and writes into the sweep directory:

- ``results.csv`` and ``results.md``: parameters, KV bytes per token, fixed
  bytes, the cache of one sequence at ``context`` tokens, validation loss,
  perplexity (all tokens, AR hits, the rest) and accuracy, decode tokens/s at batch 1 and 8, training
  tokens/s;
- ``pareto.png``: validation perplexity against the cache at ``context``
  tokens (log scale), each point labelled, the Pareto frontier (no other
  model both smaller and better) drawn through.

With the wandb logger on, the table and the plot go to wandb as well.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kvlab._io import atomic_write, atomic_write_text

log = logging.getLogger("kvlab")

COLUMNS = ("model", "params", "kv_bytes_per_token", "kv_fixed_bytes", "kv_bytes_at_context", "val_loss", "val_ppl",
           "val_ppl_ar_hit", "val_ppl_ar_other", "val_accuracy", "decode_tok_s_batch_1", "decode_tok_s_batch_8",
           "train_tok_s")  # fmt: skip


def collect(sweep_dir: Path, context: int) -> list[dict[str, Any]]:
    """One row per finished job of the sweep, in job order (``<num>-<model>`` directories)."""
    rows = []
    jobs = [d for d in Path(sweep_dir).iterdir() if (d / "metrics.json").is_file() and d.name.split("-")[0].isdigit()]
    for job in sorted(jobs, key=lambda d: int(d.name.split("-")[0])):
        m = json.loads((job / "metrics.json").read_text())
        decode = m.get("decode_tokens_per_s") or {}
        rows.append({
            "model": job.name.split("-", 1)[1],
            "params": m["params"],
            "kv_bytes_per_token": m["kv_bytes_per_token"],
            "kv_fixed_bytes": m["kv_fixed_bytes"],
            "kv_bytes_at_context": _cache_at(m, context),
            "val_loss": m["val_loss"],
            "val_ppl": m["val_ppl"],
            "val_ppl_ar_hit": m.get("val_ppl_ar_hit"),
            "val_ppl_ar_other": m.get("val_ppl_ar_other"),
            "val_accuracy": m.get("val_accuracy"),
            "decode_tok_s_batch_1": decode.get("batch_1"),
            "decode_tok_s_batch_8": decode.get("batch_8"),
            "train_tok_s": m.get("tokens_per_s"),
        })  # fmt: skip
    return rows


def _cache_at(m: dict[str, Any], context: int) -> int:
    """One sequence's cache at ``context`` tokens: windows are full by then (their bytes are among the fixed
    ones); a context encoder trained on rows with a context (``data.context``: the run then reports
    ``val_loss_without_context``) holds those tokens as its encoder states."""
    per_token = m["kv_bytes_per_token"]
    if "val_loss_without_context" in m and m.get("context_bytes_per_token"):
        per_token = m["context_bytes_per_token"]
    return per_token * context + m["kv_fixed_bytes"]


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both cache size and perplexity, from the smallest cache up."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["kv_bytes_at_context"], r["val_ppl"])):
        if r["val_ppl"] < best:
            front.append(r)
            best = r["val_ppl"]
    return front


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path, context: int) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(sweep_dir) / "results.csv", write_csv)
    lines = [f"Cache at {context:,} tokens, one sequence, bf16. Pareto frontier in bold.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]  # fmt: skip
    front = {r["model"] for r in pareto_front(rows)}
    for r in rows:
        name = f"**{r['model']}**" if r["model"] in front else r["model"]
        lines.append("| " + " | ".join([name] + [_cell(r[c]) for c in COLUMNS[1:]]) + " |")
    atomic_write_text(Path(sweep_dir) / "results.md", "\n".join(lines) + "\n")


def plot_pareto(rows: list[dict[str, Any]], path: Path, context: int) -> list[tuple[str, float, float]]:
    """Draw the plot into ``path``; return its points (label, cache bytes, perplexity)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [max(r["kv_bytes_at_context"], 1) for r in rows]
    ax.scatter(xs, [r["val_ppl"] for r in rows], color="tab:blue", zorder=3)
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(r["model"], (x, r["val_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(rows)
    ax.step([max(r["kv_bytes_at_context"], 1) for r in front], [r["val_ppl"] for r in front], where="post",
            color="tab:red", alpha=0.6, label="Pareto frontier", zorder=2)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache bytes per sequence at {context:,} tokens (bf16, log scale)")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [(r["model"], x, r["val_ppl"]) for x, r in zip(xs, rows, strict=True)]


def report(sweep_dir: Path, context: int = 2048) -> list[dict[str, Any]]:
    """Collect the sweep, write results.csv, results.md and pareto.png; return the rows."""
    rows = collect(sweep_dir, context)
    if not rows:
        log.warning("ablation: no finished job in %s, nothing to report", sweep_dir)
        return rows
    write_tables(rows, sweep_dir, context)
    plot_pareto(rows, Path(sweep_dir) / "pareto.png", context)
    log.info("ablation: %d models, results in %s", len(rows), sweep_dir)
    return rows


class AblationReport(Callback):
    """Hydra callback: the report, once every job of the multirun has finished."""

    def __init__(self, context: int = 2048):
        self.context = context

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = report(sweep_dir, self.context)
        if rows and config.get("logger", {}).get("kind") == "wandb":
            _log_to_wandb(rows, sweep_dir, config)


def _log_to_wandb(rows, sweep_dir: Path, config) -> None:
    import os

    import wandb

    mode = os.environ.get("WANDB_MODE") or config.logger.get("mode") or "offline"
    run = wandb.init(project=config.logger.get("project"), name="ablation", dir=str(sweep_dir), mode=mode)
    run.log({"ablation": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows]),
             "pareto": wandb.Image(str(sweep_dir / "pareto.png"))})  # fmt: skip
    run.finish()
