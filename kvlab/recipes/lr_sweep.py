"""The learning-rate sweep before a run: ``lr_sweep.grid=[1e-3,3e-3,1e-2]`` (the ablation recipes' fair tuning).

Each rate of the grid trains the run's model on its data for ``lr_sweep.steps``
(a shorter budget, with its own warmup and cosine) at seed ``lr_sweep.seed``;
the rate of least validation loss then trains the run itself, for its full
budget, at its own seed. The trials are cached under
``$KVLAB_CACHE/lr_sweeps/<key>/lr-<rate>/``, keyed by everything that shapes
them but the run's seed and budget, so every seed of a preset in an ablation
trains at the rate chosen once, and a sweep interrupted in a trial
continues it from its newest checkpoint. A diverged trial (a loss that is not finite) loses.
The run's ``metrics.json`` records the grid, each trial's loss and the choice
(``lr_sweep``) beside the rate it trained at (``lr``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvlab.recipes.data import default_cache_dir
from kvlab.recipes.run import ConfigError, RunDiverged, _write_json, run, training_identity, unfinished_cached_run

log = logging.getLogger("kvlab")


def choose_lr(losses: dict[float, float]) -> float:
    """The rate of least validation loss (the first in the grid on a tie); rates that diverged (inf or nan) lose."""
    finite = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
    if not finite:
        raise ConfigError(f"lr_sweep: every learning rate diverged ({_listed(losses)}); try smaller rates")
    return min(finite, key=lambda lr: finite[lr])  # min keeps the first of equal losses


def _listed(losses: dict[float, float]) -> str:
    return ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in losses.items())


def sweep_key(cfg: DictConfig) -> str:
    """What the trials depend on: the run's training (``training_identity``) but its rate, where it starts, the
    iso settings, the sweep; not the run's seed or steps (its trials serve every seed and budget)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    identity = training_identity(cfg) | {
        "init": container["init"],
        "iso": [container.get(k) for k in ("iso_params", "iso_flops", "iso_cache", "iso_cache_context")],
        "distill": container.get("distill"),
        "sweep": {k: v for k, v in container["lr_sweep"].items() if k != "grid"},  # each rate is a trial of its own
    }
    del identity["optim"]["lr"]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _trial_config(cfg: DictConfig, lr: float, resume: str | None) -> DictConfig:
    sweep = cfg.lr_sweep
    trial = copy.deepcopy(cfg)
    warmup = cfg.optim.warmup_steps  # an explicit warmup keeps its share of the shorter budget
    changes = {
        "optim.lr": lr,
        "trainer.max_steps": sweep.steps,
        "optim.warmup_steps": None if warmup is None else round(warmup * sweep.steps / cfg.trainer.max_steps),
        "seed": sweep.seed,
        "stages": ["train"],
        "resume": resume,
        "lr_sweep.grid": [],
        "logger.kind": "csv",  # trials are the sweep's business, not runs of the tracker's project
    }
    for key, value in changes.items():
        OmegaConf.update(trial, key, value, merge=False)
    return trial


def trial_losses(cfg: DictConfig, trial=run) -> tuple[dict[float, float], Path]:
    """Each rate's validation loss after ``lr_sweep.steps`` (trained by ``trial(cfg, dir)``, or read from the
    cache), and the directory holding the trials."""
    root = Path(cfg.data.cache_dir or default_cache_dir()) / "lr_sweeps" / sweep_key(cfg)
    losses = {}
    for lr in cfg.lr_sweep.grid:
        trial_dir = root / f"lr-{lr:g}"
        done = trial_dir / "metrics.json"
        if done.is_file():
            log.info("lr_sweep: reusing the trial at lr %g in %s", lr, trial_dir)
        else:  # an interrupted trial continues from its newest checkpoint
            resume = unfinished_cached_run(trial_dir, f"lr_sweep: the trial at lr {lr:g}")
            log.info("lr_sweep: trial at lr %g for %d steps in %s", lr, cfg.lr_sweep.steps, trial_dir)
            try:
                trial(_trial_config(cfg, lr, resume), trial_dir)
            except RunDiverged as e:  # its metrics.json has no validation loss: the rate loses
                log.info("lr_sweep: the trial at lr %g diverged (%s)", lr, e)
        loss = json.loads(done.read_text())["val_loss"]
        losses[float(lr)] = float("nan") if loss is None else float(loss)
    return losses, root


def run_lr_sweep(cfg: DictConfig, run_dir: Path, then=run, trial=run) -> dict:
    """Sweep ``lr_sweep.grid``, then ``then(cfg, run_dir)`` at the chosen rate; return the run's metrics, with the
    sweep's record under ``lr_sweep``."""
    _check(cfg)
    losses, root = trial_losses(cfg, trial)
    chosen = choose_lr(losses)
    log.info("lr_sweep: validation loss after %d steps by rate: %s; training at %g", cfg.lr_sweep.steps,
             _listed(losses), chosen)  # fmt: skip
    if cfg.lr_sweep.steps * 2 < cfg.trainer.max_steps:
        # measured (benchmarks/RESULTS.md, "400-step trials mislead"): a trial's cosine anneals before a larger
        # rate's gain shows, so short trials pick small rates that lose at the full budget
        log.warning("lr_sweep: trials of %d steps for a run of %d favour small rates (at the standard budget, "
                    "400-step trials chose 1e-3 for GQA, 0.19 nats worse at 2,000 steps than 3e-3); trials of at "
                    "least half the run choose surer", cfg.lr_sweep.steps, cfg.trainer.max_steps)  # fmt: skip
    job = copy.deepcopy(cfg)
    OmegaConf.update(job, "optim.lr", chosen, merge=False)
    OmegaConf.update(job, "lr_sweep.grid", [], merge=False)
    metrics = then(job, run_dir)
    metrics["lr_sweep"] = {"grid": [float(lr) for lr in cfg.lr_sweep.grid], "steps": cfg.lr_sweep.steps,
                           "seed": cfg.lr_sweep.seed, "val_loss": {f"{lr:g}": loss for lr, loss in losses.items()},
                           "chosen": chosen, "trials": str(root)}  # fmt: skip
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def _check(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_object(cfg.lr_sweep).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.trainer
    if cfg.get("uptrain") is not None:
        raise ConfigError("lr_sweep.grid is set in an uptraining recipe, whose stages train at several rates; "
                          "sweep uptrain.lr with -m instead")  # fmt: skip
    if t.strategy != "auto" or str(t.devices) != "1" or t.num_nodes != 1:
        raise ConfigError(f"lr_sweep.grid with trainer.strategy={t.strategy}, devices={t.devices}: the sweep runs in "
                          "one process; sweep on one device, then train with optim.lr set")  # fmt: skip
    if "train" not in cfg.stages:
        raise ConfigError(f"lr_sweep.grid is set but stages={list(cfg.stages)} does not train")
