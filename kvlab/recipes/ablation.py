"""``python train.py -m recipe=ablation``: presets trained and evaluated alike over seeds, then tables and a plot.

The recipe is a Hydra multirun over ``model`` and ``seed`` (every job the
same data, steps and optimizer; stages train + eval; with ``lr_sweep.grid``
each preset's learning rate is chosen first, see ``kvlab.recipes.lr_sweep``).
When the sweep ends, ``AblationReport`` (a Hydra callback) reads every job's
``metrics.json`` and writes into the sweep directory:

- ``runs.csv``: one row per run (preset, seed, learning rate, parameters,
  training FLOPs per token, KV bytes, losses, accuracy, speeds), for any
  re-analysis;
- ``results.csv`` and ``results.md``: one row per preset, the mean of its
  runs with a 95% confidence interval (Student's t over the seeds) for the
  validation loss and the perplexity, and each preset's place on the Pareto
  frontier: on it (by the means), tied with it (its interval overlaps those
  of the frontier presets that beat it), or beaten; below the table, the
  order of the presets at each seed and whether it is the same at every one,
  the runs that diverged (in no mean) and the jobs that did not finish;
- ``pareto.png``: validation perplexity against the cache at ``context``
  tokens (log scale), each preset's mean with its interval, labelled, the
  frontier drawn through the means.

With the wandb logger on, the tables and the plot go to wandb as well.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kvlab._io import atomic_write, atomic_write_csv, atomic_write_text

log = logging.getLogger("kvlab")

RUN_COLUMNS = ("model", "cache", "seed", "lr", "params", "train_flops_per_token", "kv_bytes_per_token",
               "kv_fixed_bytes", "kv_bytes_at_context", "steps", "tokens_seen", "val_loss", "val_loss_forward",
               "val_ppl", "val_ppl_ar_hit",
               "val_ppl_ar_other", "val_accuracy", "decode_tok_s_batch_1", "decode_tok_s_batch_8", "train_tok_s",
               "threads", "diverged", "job")  # fmt: skip
COLUMNS = ("model", "runs", "seeds", "lr", "params", "train_flops_per_token", "kv_bytes_per_token",
           "kv_bytes_at_context", "val_loss", "val_loss_ci95", "val_loss_diff", "val_loss_diff_ci95", "val_ppl",
           "val_ppl_low", "val_ppl_high", "val_accuracy", "decode_tok_s_batch_1", "train_tok_s",
           "frontier", "diverged")  # fmt: skip
CONFIDENCE = 0.95


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories (``<num>-<model>``), in job order."""
    jobs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and d.name.split("-")[0].isdigit()]
    return sorted(jobs, key=lambda d: int(d.name.split("-")[0]))


def collect(sweep_dir: Path, context: int) -> list[dict[str, Any]]:
    """One row per finished job of the sweep, in job order (``<num>-<model>`` directories). A run evaluated
    through a cache policy (``cache``) is its own row, ``<preset>+<policy>``, whose validation loss is the one
    decoded through that cache (``cache_val_loss``: the forward's, ``val_loss_forward``, is blind to it). A run
    whose training diverged has no loss and says at which step (``diverged``)."""
    rows = []
    for job in (d for d in job_dirs(sweep_dir) if (d / "metrics.json").is_file()):
        m = json.loads((job / "metrics.json").read_text())
        decode = m.get("decode_tokens_per_s") or {}
        policy = m.get("cache_policy") or ""
        loss = m.get("cache_val_loss", m["val_loss"])
        diverged = (m.get("diverged") or {}).get("step")
        rows.append({
            "model": job.name.split("-", 1)[1] + (f"+{policy}" if policy else ""),
            "cache": policy,
            "seed": m.get("seed", 0),
            "lr": m.get("lr"),
            "params": m["params"],
            "train_flops_per_token": m.get("train_flops_per_token"),
            "kv_bytes_per_token": m["kv_bytes_per_token"],
            "kv_fixed_bytes": m["kv_fixed_bytes"],
            "kv_bytes_at_context": _cache_at(m, context),
            "steps": m.get("steps"),
            "tokens_seen": m.get("tokens_seen"),
            "val_loss": loss,
            "val_loss_forward": m["val_loss"],
            "val_ppl": None if loss is None else math.exp(min(loss, 50.0)),
            "diverged": diverged,
            "val_ppl_ar_hit": m.get("val_ppl_ar_hit"),
            "val_ppl_ar_other": m.get("val_ppl_ar_other"),
            "val_accuracy": m.get("val_accuracy"),
            "decode_tok_s_batch_1": decode.get("batch_1"),
            "decode_tok_s_batch_8": decode.get("batch_8"),
            "train_tok_s": m.get("tokens_per_s"),
            "threads": m.get("threads"),  # with jobs in parallel (ablation=standard), speeds share the machine
            "job": job.name,
        })  # fmt: skip
    return rows


def _cache_at(m: dict[str, Any], context: int) -> int:
    """One sequence's cache at ``context`` tokens: as the run counted it (``kv_bytes_at``, exact, e.g. KIVI's
    residual in full precision) where it did at that length; else windows are full by then (their bytes are
    among the fixed ones); a context encoder trained on rows with a context (``data.context``: the run then
    reports ``val_loss_without_context``) holds those tokens as its encoder states."""
    exact = (m.get("kv_bytes_at") or {}).get(str(context))
    if exact is not None and "val_loss_without_context" not in m:
        return exact
    per_token = m["kv_bytes_per_token"]
    if "val_loss_without_context" in m and m.get("context_bytes_per_token"):
        per_token = m["context_bytes_per_token"]
    return per_token * context + m["kv_fixed_bytes"]


# -- statistics -----------------------------------------------------------------


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """The mean of ``values`` and the half-width of its ``confidence`` interval, Student's t with n - 1 degrees of
    freedom (seeds are few: the normal's 1.96 would understate it); None for a single value, which has none."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per preset (in the order of its first run): the means of its runs, the validation loss's 95%
    interval and the perplexity's (exp of the loss's bounds), the difference from the first preset's loss paired
    by seed (``paired_difference``), and its frontier mark (``frontier_marks``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["model"], []).append(r)
    # runs that diverged have no loss: they are counted apart (``diverged``: seed@step), not in the means
    finished = {model: [r for r in rs if r["val_loss"] is not None] for model, rs in groups.items()}
    reference = next(iter(finished.values()))
    rows = []
    for model, all_runs in groups.items():
        rs = finished[model]
        loss, half = mean_interval([r["val_loss"] for r in rs]) if rs else (None, None)
        diff, diff_half = paired_difference(rs, reference) if rs and rs is not reference else (None, None)
        lrs = sorted({r["lr"] for r in rs if r["lr"] is not None})
        first = all_runs[0]
        rows.append({
            "model": model,
            "runs": len(rs),
            "diverged": " ".join(f"{r['seed']}@{r['diverged']}" for r in all_runs if r["val_loss"] is None) or None,
            "seeds": " ".join(str(r["seed"]) for r in rs),
            "lr": " ".join(f"{lr:g}" for lr in lrs) or None,
            "params": first["params"],
            "train_flops_per_token": first["train_flops_per_token"],
            "kv_bytes_per_token": first["kv_bytes_per_token"],
            "kv_bytes_at_context": first["kv_bytes_at_context"],
            "val_loss": loss,
            "val_loss_ci95": half,
            "val_loss_diff": diff,
            "val_loss_diff_ci95": diff_half,
            "val_ppl": None if loss is None else math.exp(min(loss, 50.0)),
            "val_ppl_low": None if half is None else math.exp(min(loss - half, 50.0)),
            "val_ppl_high": None if half is None else math.exp(min(loss + half, 50.0)),
            "val_accuracy": _mean([r["val_accuracy"] for r in rs]),
            "decode_tok_s_batch_1": _mean([r["decode_tok_s_batch_1"] for r in rs]),
            "train_tok_s": _mean([r["train_tok_s"] for r in rs]),
        })  # fmt: skip
    marks = frontier_marks(rows)
    for r in rows:
        r["frontier"] = marks[r["model"]]
    return rows


def paired_difference(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The mean over seeds of ``runs``' validation loss minus ``reference``'s at the same seed, and its 95% interval
    (None, None without a seed in common). A seed gives both the same data order, so the pairs cancel what the
    order adds to both: the difference is surer than the two intervals side by side say."""
    by_seed = {r["seed"]: r["val_loss"] for r in reference}
    diffs = [r["val_loss"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    return mean_interval(diffs) if diffs else (None, None)


def seed_orders(runs: list[dict[str, Any]]) -> dict[Any, list[str]]:
    """Per seed, the presets from the lowest validation loss to the highest, at the seeds where every preset ran
    exactly once: whether that order is the same at every seed is what a budget must show before its ranking is
    reported (a seed's order alone can be any)."""
    models = {r["model"] for r in runs}
    by_seed: dict[Any, list[dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r)
    return {seed: [r["model"] for r in sorted(rs, key=lambda r: r["val_loss"])]
            for seed, rs in sorted(by_seed.items())
            if len(rs) == len(models) and {r["model"] for r in rs} == models}  # fmt: skip


def order_line(orders: dict[Any, list[str]]) -> str:
    """``orders`` (``seed_orders``) in words: each seed's order and whether it is the same at every seed."""
    if len(orders) < 2 or len(next(iter(orders.values()))) < 2:
        return ""
    each = "; ".join(f"seed {seed}: {' < '.join(order)}" for seed, order in orders.items())
    same = len({tuple(order) for order in orders.values()}) == 1
    verdict = "the same at every seed" if same else "not the same at every seed"
    return f"Order by validation loss (lowest first), {each}: **{verdict}**."


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both cache size and (mean) perplexity, from the smallest cache up."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["kv_bytes_at_context"], r["val_ppl"])):
        if r["val_ppl"] < best:
            front.append(r)
            best = r["val_ppl"]
    return front


def frontier_marks(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per preset: ``front`` (on the frontier of the means), ``tie`` (beaten by the means, but no frontier preset
    with a cache as small or smaller is better beyond the intervals: its interval overlaps theirs) or ``""``
    (beaten: some such frontier preset's interval lies wholly below its own). Without intervals (one seed)
    the means decide alone."""

    def bounds(r: dict[str, Any]) -> tuple[float, float]:
        half = r.get("val_loss_ci95") or 0.0
        loss = r.get("val_loss", math.log(r["val_ppl"]))
        return loss - half, loss + half

    front = pareto_front([r for r in rows if r["val_ppl"] is not None])
    on_front = {id(r) for r in front}
    marks = {}
    for r in rows:
        if r["val_ppl"] is None:  # every run diverged
            marks[r["model"]] = "diverged"
            continue
        if id(r) in on_front:
            marks[r["model"]] = "front"
            continue
        low = bounds(r)[0]
        beaten = any(bounds(f)[1] < low for f in front if f["kv_bytes_at_context"] <= r["kv_bytes_at_context"])
        marks[r["model"]] = "" if beaten else "tie"
    return marks


# -- tables and the plot ------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(summary: list[dict[str, Any]], context: int, orders: dict[Any, list[str]] | None = None,
                   unfinished: list[str] = ()) -> str:  # fmt: skip
    """The per-preset table as Markdown: loss and perplexity as mean ± interval, the frontier in bold, ties
    marked; below it, with ``orders`` (``seed_orders``), the order of the presets at each seed, then the runs
    that diverged and the jobs that did not finish (``unfinished``), which no mean holds."""
    first = summary[0]["model"]
    head = ("model", "runs", "lr", "params", "train FLOPs/token", "KV bytes/token", f"cache at {context:,}",
            "val loss (95% CI)", f"- {first}'s, paired by seed", "val ppl (95% CI)", "frontier")  # fmt: skip
    lines = [f"Mean over seeds with a 95% confidence interval (Student's t); the difference from {first}'s loss "
             f"at the same seed (same data order), its mean and interval; cache at {context:,} tokens, one "
             "sequence, bf16. Pareto frontier of the means in bold; *tie*: beaten by the means, not beyond the "
             "intervals.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]  # fmt: skip
    for r in summary:
        name = {"front": f"**{r['model']}**", "tie": f"*{r['model']}*"}.get(r["frontier"], r["model"])
        if r["val_loss"] is None:
            loss, ppl = "diverged", "-"
        elif r["val_loss_ci95"] is None:
            loss, ppl = f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}"
        else:
            loss = f"{r['val_loss']:.4f} ± {r['val_loss_ci95']:.4f}"
            ppl = f"{r['val_ppl']:.2f} ({r['val_ppl_low']:.2f}-{r['val_ppl_high']:.2f})"
        if r["val_loss_diff"] is None:
            diff = "-"
        elif r["val_loss_diff_ci95"] is None:
            diff = f"{r['val_loss_diff']:+.4f}"
        else:
            diff = f"{r['val_loss_diff']:+.4f} ± {r['val_loss_diff_ci95']:.4f}"
        runs = _cell(r["runs"]) + (f" (+{len(r['diverged'].split())} diverged)" if r.get("diverged") else "")
        cells = [name, runs, _cell(r["lr"]), _cell(r["params"]), _cell(r["train_flops_per_token"]),
                 _cell(r["kv_bytes_per_token"]), _cell(r["kv_bytes_at_context"]), loss, diff, ppl,
                 r["frontier"] or "beaten"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = [order_line(orders or {})]
    lost = [f"{r['model']} at seed {run.replace('@', ' (step ')})" for r in summary if r.get("diverged")
            for run in r["diverged"].split()]  # fmt: skip
    if lost:
        notes.append(f"Diverged, so in no mean: {', '.join(lost)}.")
    if unfinished:
        notes.append(f"Not finished (no metrics.json; continue the sweep with resume=auto): {', '.join(unfinished)}.")
    return "\n".join(lines + [x for note in notes if note for x in ("", note)]) + "\n"


def plot_pareto(rows: list[dict[str, Any]], path: Path, context: int) -> list[tuple[str, float, float]]:
    """Draw the per-preset rows into ``path`` (means with their intervals where they have them); return the
    points (label, cache bytes, mean perplexity)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [max(r["kv_bytes_at_context"], 1) for r in rows]
    ys = [r["val_ppl"] for r in rows]
    low = [y - (r.get("val_ppl_low") or y) for y, r in zip(ys, rows, strict=True)]
    high = [(r.get("val_ppl_high") or y) - y for y, r in zip(ys, rows, strict=True)]
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color="tab:blue", ecolor="tab:blue", elinewidth=1, capsize=3,
                zorder=3, label="mean, 95% interval")  # fmt: skip
    for x, r in zip(xs, rows, strict=True):
        label = r["model"] + (" (tie)" if r.get("frontier") == "tie" else "")
        ax.annotate(label, (x, r["val_ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(rows)
    ax.step([max(r["kv_bytes_at_context"], 1) for r in front], [r["val_ppl"] for r in front], where="post",
            color="tab:red", alpha=0.6, label="Pareto frontier (means)", zorder=2)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache bytes per sequence at {context:,} tokens (bf16, log scale)")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # (the temporary's name has no .png)
    plt.close(fig)
    return [(r["model"], x, r["val_ppl"]) for x, r in zip(xs, rows, strict=True)]


def report(sweep_dir: Path, context: int = 2048) -> list[dict[str, Any]]:
    """Collect the sweep, write runs.csv, results.csv, results.md and pareto.png; return the per-preset rows."""
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir, context)
    unfinished = [d.name for d in job_dirs(sweep_dir) if not (d / "metrics.json").is_file()]
    if unfinished:
        log.warning("ablation: jobs that did not finish, in no mean: %s", ", ".join(unfinished))
    if not runs:
        log.warning("ablation: no finished job in %s, nothing to report", sweep_dir)
        return []
    summary = summarize(runs)
    atomic_write_csv(sweep_dir / "runs.csv", runs, RUN_COLUMNS, ignore_extra=True)
    atomic_write_csv(sweep_dir / "results.csv", summary, COLUMNS, ignore_extra=True)
    orders = seed_orders([r for r in runs if r["val_loss"] is not None])
    atomic_write_text(sweep_dir / "results.md", markdown_table(summary, context, orders, unfinished))
    scored = [r for r in summary if r["val_ppl"] is not None]
    if scored:
        plot_pareto(scored, sweep_dir / "pareto.png", context)
    log.info("ablation: %d runs of %d models, results in %s", len(runs), len(summary), sweep_dir)
    line = order_line(orders)
    if line:
        log.info("ablation: %s", line.replace("**", ""))
    return summary


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


def main(argv: list[str] | None = None) -> None:
    """``python -m kvlab.recipes.ablation SWEEP_DIR [--context N]``: the report of a sweep again (after more seeds
    ran into it, or at another context length)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvlab.recipes.ablation", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a recipe=ablation multirun directory")
    parser.add_argument("--context", type=int, default=2048, help="tokens per sequence of the cache compared")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if report(args.sweep_dir, args.context):
        print((args.sweep_dir / "results.md").read_text(), end="")


if __name__ == "__main__":
    main()
