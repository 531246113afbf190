"""What ``python train.py`` does with a composed config: validate, train, evaluate, report.

Everything that can be checked is checked before the first step (model
config, data settings, resume path, strategy), and reported as one line.
A run writes into its Hydra output directory:

- ``checkpoints/``: Lightning checkpoints every ``ckpt_every_n_steps`` and at
  the end (``last.ckpt``, written atomically), with ``config.yaml`` beside them;
- ``logs/``: the logger's files (CSV by default);
- ``metrics.json``: final losses, throughput, size and KV footprint.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvlab._config import check_finite, differences, dotted_items
from kvlab._io import atomic_write, atomic_write_csv, atomic_write_text, pid_alive, remove_orphans
from kvlab.archs import ModelConfig, build_model, convert_model
from kvlab.archs.convert import calibration_rows
from kvlab.layers.cache_policy import CachePolicy
from kvlab.recipes.checkpoint import (
    checkpoint_step,
    lightning_fields,
    lightning_fields_file,
    load_checkpoint_model,
)
from kvlab.recipes.config import ACCELERATORS, EXPORT_DTYPES, LOGGERS, PRECISIONS, STAGES, TrainConfig
from kvlab.recipes.data import (
    DataConfig,
    LMDataModule,
    build_datamodule,
    corpus_fingerprint,
    resume_problem,
    tokenizer_to_use,
)
from kvlab.recipes.evals import evaluate
from kvlab.recipes.footprint import DTYPES
from kvlab.recipes.module import LMModule, TrainingDiverged, training_flops
from kvlab.recipes.strategies import STRATEGIES, build_strategy, deepspeed_available

log = logging.getLogger("kvlab")


class ConfigError(ValueError):
    """A user-facing configuration problem: reported as one line, exit status 1."""


class RunDiverged(ConfigError):
    """Training stopped at a loss or gradients that are not finite; its metrics.json says where (``diverged``).
    Reported as one line, exit status 1, as a configuration's problem is: the rate or the clipping is what to
    change."""


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and/or evaluate as ``cfg`` says; return the metrics written to metrics.json."""
    tc = train_config(cfg)
    model_cfg = _validated(tc)
    L.seed_everything(tc.seed, verbose=False)
    if tc.resume == "auto" and _hydra_run().get("sweep"):  # a sweep continued: this job's own directory
        finished = _finished_job(cfg, run_dir)
        if finished is not None:
            return finished
    ckpt_path = _resume_path(tc, run_dir)
    initial = _initial_model(tc)
    if tc.stages == ["export"]:  # the initial model as it is: no data, no trainer
        return _export_only(tc, run_dir, initial)
    if initial is not None:  # the architecture comes from the source (and conversion), not from `model`
        model_cfg = initial.config
        if tc.data.seq_len > model_cfg.max_seq_len:
            raise ConfigError(
                f"data.seq_len={tc.data.seq_len} exceeds the initial model's max_seq_len={model_cfg.max_seq_len}"
            )
    datamodule = build_datamodule(tc.data, seed=tc.seed)
    try:
        datamodule.prepare_data()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    convert, convert_report = dict(tc.init).get("convert"), {}
    teacher = None
    if tc.distill:
        if initial is None or not convert:
            raise ConfigError("distill=true distils the initial model into its conversion: it needs "
                              "init.from=checkpoint or hf and init.convert")  # fmt: skip
        teacher = initial  # convert_model leaves it as it was
    if initial is not None and convert:
        initial = _converted(initial, conversion_spec(convert), datamodule, convert_report)
        model_cfg = initial.config
    if tc.data.context and model_cfg.context is None and tc.data.context + tc.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(  # without a context encoder the context is read in the prompt
            f"data.context={tc.data.context} + data.seq_len={tc.data.seq_len}: a model without a context encoder "
            f"reads the context in its prompt, which exceeds its max_seq_len={model_cfg.max_seq_len}"
        )
    if datamodule.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {datamodule.vocab_size} tokens"
        )
    _claim_run_dir(run_dir, ckpt_path)
    if convert_report:  # what a conversion's search found (QCQA's Pareto front), beside the run
        _write_json(run_dir / "convert_report.json", convert_report)
    log.info("model plan (layer: mixer <- what it reads of other layers):\n%s", model_cfg.describe_plan())
    try:
        module = LMModule(
            model=model_cfg.to_dict(),
            optim=OmegaConf.to_container(cfg.optim),
            max_steps=tc.trainer.max_steps,
            activation_checkpointing=tc.trainer.activation_checkpointing,
            compile=tc.trainer.compile,
            init_seed=tc.seed,
        )
    except ValueError as e:  # optim.trainable naming no parameter of this model
        raise ConfigError(str(e)) from None
    if initial is not None:
        module.model.load_state_dict(initial.state_dict())
    if teacher is not None:
        module.set_teacher(teacher)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    # (through temporaries: a resumed run writes them again beside the checkpoints that need them)
    atomic_write_text(run_dir / "checkpoints" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    # The tokenizer travels with the checkpoints: init from them (uptraining, export) reads the same tokens.
    if datamodule.tokenizer is not None:  # generated tasks (MQAR) have none
        tokenizer = datamodule.tokenizer
        atomic_write(run_dir / "checkpoints" / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    # a run resuming in its own directory (a killed sweep's job, an uptraining parent) continues its log there
    here = _resumes_in(run_dir, ckpt_path)
    trainer = _trainer(tc, run_dir, continues_log_at=checkpoint_step(ckpt_path) if here else None)
    if "train" in tc.stages:
        datamodule.setup("fit")
        if datamodule.train_batches(trainer.world_size) == 0:
            try:
                datamodule.train_dataloader()  # raises, naming the sizes
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if ckpt_path is not None:
        rows = datamodule.train_rows() if "train" in tc.stages else None
        _check_resumable(ckpt_path, model_cfg, tc, trainer.world_size, rows)
    metrics: dict = {}
    if "train" in tc.stages:
        if ckpt_path is None:  # the starting point, for comparing with the end (a resumed run: its checkpoint's)
            metrics["initial_val_loss"] = module.initial_val_loss = _validate(trainer, module, datamodule)
        if tc.trainer.throughput:
            module.flops_per_batch = training_flops(model_cfg, tc.data.batch_size, tc.data.seq_len)
            if module.flops_per_batch is not None:
                metrics["train_flops_per_token"] = module.flops_per_batch // (tc.data.batch_size * tc.data.seq_len)
        start_step = checkpoint_step(ckpt_path)
        if ckpt_path is not None:
            metrics["resumed_from"] = {"checkpoint": ckpt_path, "step": start_step}
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except TrainingDiverged as e:  # what tells the run apart in a sweep's table (an ablation's), then stop
            metrics.update(_model_metrics(module.model, CachePolicy.from_spec(tc.cache)), seed=tc.seed, lr=tc.optim.lr)
            _stop_diverged(e, trainer, run_dir, metrics, ckpt_path)
        elapsed = time.perf_counter() - t0
        last = run_dir / "checkpoints" / "last.ckpt"
        # Every rank decides and saves: DeepSpeed writes its partitions from all of them.
        trainer.strategy.barrier()
        if checkpoint_step(last) != trainer.global_step:
            trainer.save_checkpoint(last)
        tokens_per_step = tc.data.batch_size * tc.data.seq_len * tc.trainer.accumulate_grad_batches * trainer.world_size
        if trainer.global_step == start_step and ckpt_path is not None:
            _as_after_the_last_step(trainer, ckpt_path)
        metrics.setdefault("initial_val_loss", module.initial_val_loss)
        metrics["train_loss"] = _metric(trainer, "train_loss")
        if metrics["train_loss"] is None and math.isfinite(module._last_loss):  # resumed at its last step
            metrics["train_loss"] = module._last_loss
        if "train_aux_loss" in trainer.callback_metrics:  # MoE load balancing, inside train_loss
            metrics["train_aux_loss"] = _metric(trainer, "train_aux_loss")
        metrics["tokens_seen"] = trainer.global_step * tokens_per_step
        trained = trainer.global_step - start_step
        metrics["tokens_per_s"] = trained * tokens_per_step / elapsed if trained else None
        metrics["threads"] = torch.get_num_threads()  # a parallel sweep's jobs run one thread each (ablation)
        metrics["steps"] = trainer.global_step
    metrics["val_loss"] = _validate(trainer, module, datamodule)
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    metrics["val_accuracy"] = _metric(trainer, "val_accuracy")  # next-token; on data=mqar, recall
    if tc.data.context:  # the same continuations without their context: is it used?
        metrics["val_loss_without_context"] = _metric(trainer, "val_loss_without_context")
    for part in ("ar_hit", "ar_other"):  # perplexity on recallable tokens and on the rest (Zoology)
        loss = _metric(trainer, f"val_loss_{part}")
        metrics[f"val_ppl_{part}"] = None if loss is None else math.exp(min(loss, 50.0))
    policy = CachePolicy.from_spec(tc.cache)
    metrics.update(_model_metrics(module.model, policy))
    metrics.update(seed=tc.seed, lr=tc.optim.lr)  # what an ablation's runs.csv tells its runs apart by
    after = {"eval", "lm_eval", "export"} & set(tc.stages) and trainer.is_global_zero  # rank 0's stages use it
    whole = _whole_model(module, run_dir, initial) if after else None
    if "eval" in tc.stages and trainer.is_global_zero:
        rows = islice(datamodule.val_dataloader(), tc.trainer.limit_val_batches) if policy is not None else None
        metrics.update(evaluate(whole, datamodule.tokenizer, tc.eval, policy, rows))
    if "lm_eval" in tc.stages and trainer.is_global_zero:
        from kvlab.recipes.lm_eval import results_json, run_lm_eval

        try:
            metrics["lm_eval"], results = run_lm_eval(whole, datamodule.tokenizer, tc.lm_eval)
        except ValueError as e:  # a task that is not there
            raise ConfigError(str(e)) from None
        atomic_write_text(run_dir / "lm_eval.json", results_json(results))
    if "export" in tc.stages and trainer.is_global_zero:
        from kvlab.archs.hf import save_hf

        dtype = DTYPES[tc.export.dtype]
        out = save_hf(whole, run_dir / "hf", tokenizer=datamodule.tokenizer, dtype=dtype, metrics=metrics)
        metrics["hf_dir"] = str(out)  # the model card holds the metrics so far
        log.info("export: %s", metrics["hf_dir"])
    if trainer.is_global_zero:
        _write_json(run_dir / "metrics.json", metrics)
        log.info("metrics:\n%s", metrics_table(metrics))
    return metrics


def _stop_diverged(e: TrainingDiverged, trainer: L.Trainer, run_dir: Path, metrics: dict, resumed: str | None) -> None:
    """After a training step whose loss or gradients are not finite: no update applied them and no checkpoint is
    saved after it (those saved before stay as they are); metrics.json records it, with no validation loss (an lr
    sweep's trial that diverged loses); then RunDiverged. (On several processes each rank gets here alike.)"""
    last = run_dir / "checkpoints" / "last.ckpt"
    metrics.update(diverged={"step": e.step, "what": e.what, "loss": str(e.loss)}, steps=e.step - 1, val_loss=None)
    if trainer.is_global_zero:
        _write_json(run_dir / "metrics.json", metrics)
    held = last if last.exists() else (Path(resumed) if resumed is not None else None)
    if held is None:
        raise RunDiverged(
            f"training diverged: {e}, and the run stopped before applying it (no checkpoint was saved before it); "
            "a lower optim.lr or trainer.gradient_clip_val may keep the loss finite"
        )
    raise RunDiverged(
        f"training diverged: {e}, and the run stopped before applying it; {held} holds the weights of step "
        f"{checkpoint_step(held)}: train them on at a lower rate or with clipping from a fresh optimizer "
        f"(init.from=checkpoint init.path={held} optim.lr=... or trainer.gradient_clip_val=...)"
    )


# -- validation of the whole config, before anything runs ------------------------


def train_config(cfg: DictConfig) -> TrainConfig:
    """The typed config, or a ConfigError naming the key (an empty model file, a missing interpolation)."""
    if not cfg.get("model"):
        raise ConfigError(
            "model: the model config is empty; model=NAME must name a YAML file of settings "
            "(configs/model/*.yaml, or one in a --config-dir)"
        )
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or 'config'}: {getattr(e, 'msg', None) or e}") from None


def _validated(tc: TrainConfig) -> ModelConfig:
    try:
        check_finite(tc)  # every float of the run, the model's included: inf and nan are never meant
        model_cfg = ModelConfig.from_dict(tc.model)
        if tc.iso_cache is not None:  # first: the MLP's width (iso_params, iso_flops) leaves the cache as it is
            model_cfg = model_cfg.with_cache(tc.iso_cache, tc.iso_cache_context)
        if tc.iso_params is not None:
            if tc.iso_params < 1:
                raise ValueError(f"iso_params={tc.iso_params} must be a parameter count >= 1")
            model_cfg = model_cfg.with_params(tc.iso_params)
        if tc.iso_flops is not None:
            model_cfg = _with_flops(model_cfg, tc)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    try:
        tc.data.validate()
        tc.optim.validate()
        tc.lr_sweep.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_cache_policy(tc, model_cfg)
    if tc.data.doc_mask and model_cfg.blocks is not None:
        raise ConfigError("data.doc_mask=true packs documents per row, which a Block Transformer's blocks would "
                          "straddle (model.blocks is set); use data.doc_mask=false")  # fmt: skip
    sinks = [(p.index, m.sinks) for p in model_cfg.plan for m in [p.mixer, *getattr(p.mixer, "mixers", [])]
             if getattr(m, "sinks", 0)]  # fmt: skip
    if tc.data.doc_mask and sinks:  # (the first training step failed, deep in the attention's masks)
        raise ConfigError(
            f"data.doc_mask=true packs documents per row; layer {sinks[0][0]}'s sinks={sinks[0][1]} are a row's "
            "first positions, which a packed document does not start at; use data.doc_mask=false"
        )
    if tc.data.doc_mask and model_cfg.meta_tokens:
        raise ConfigError(
            f"data.doc_mask=true packs documents per row; model.meta_tokens={model_cfg.meta_tokens} "
            "go before a row's first token only, not before each document; use data.doc_mask=false"
        )
    t = tc.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if tc.logger.kind not in LOGGERS:
        raise ConfigError(f"logger.kind={tc.logger.kind!r} is not one of {', '.join(LOGGERS)}")
    for stage in tc.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: {stage!r} is not one of {', '.join(STAGES)}")
    if "lm_eval" in tc.stages:  # before any training, which would be lost to a missing package
        try:
            tc.lm_eval.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("stages: lm_eval needs lm-evaluation-harness: pip install 'kvlab[lm-eval]'")
    if tc.eval.passkey_max_len is not None and tc.eval.passkey_max_len < 1:
        raise ConfigError(f"eval.passkey_max_len={tc.eval.passkey_max_len} must be >= 1, or null: max_seq_len")
    if tc.export.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export.dtype={tc.export.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if tc.eval.passkey_trials < 1:
        raise ConfigError(f"eval.passkey_trials={tc.eval.passkey_trials} must be >= 1")
    for name in ("max_steps", "val_check_interval", "ckpt_every_n_steps", "accumulate_grad_batches",
                 "limit_val_batches", "log_every_n_steps", "num_nodes"):  # fmt: skip
        if getattr(t, name) < 1:
            raise ConfigError(f"trainer.{name}={getattr(t, name)} must be >= 1")
    if t.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={t.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    devices_ok = t.devices in ("auto", -1) or (isinstance(t.devices, int) and not isinstance(t.devices, bool)
                                                and t.devices >= 1)  # fmt: skip
    if isinstance(t.devices, (list, tuple)):  # explicit device indices
        devices_ok = bool(t.devices) and all(isinstance(d, int) and d >= 0 for d in t.devices)
    if not devices_ok:
        raise ConfigError(
            f"trainer.devices={t.devices!r} must be a count >= 1, -1 or 'auto' (all), or a list of device indices"
        )
    if t.gradient_clip_val is not None and not t.gradient_clip_val > 0:
        raise ConfigError(f"trainer.gradient_clip_val={t.gradient_clip_val} must be > 0, or null for no clipping")
    if "train" in tc.stages and tc.optim.warmup_steps is not None and tc.optim.warmup_steps > t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={tc.optim.warmup_steps} exceeds trainer.max_steps={t.max_steps}: "
            "the learning rate would never reach optim.lr; lower the warmup"
        )
    # With init from a checkpoint or HF directory the source's max_seq_len applies (checked in run).
    from_scratch = dict(tc.init).get("from", "scratch") == "scratch"
    if from_scratch and tc.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={tc.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if t.strategy.startswith("deepspeed") and not deepspeed_available():
        raise ConfigError(f"trainer.strategy={t.strategy} needs DeepSpeed: pip install 'kvlab[deepspeed]'")
    return model_cfg


INIT_SOURCES = ("scratch", "checkpoint", "hf")


def _with_flops(model_cfg: ModelConfig, tc: TrainConfig) -> ModelConfig:
    """``model_cfg`` with the MLP width at which a training token costs about ``tc.iso_flops`` FLOPs (forward and
    backward of a row of ``data.seq_len``, counted from the shapes by ``training_flops``)."""
    setting = f"iso_flops={tc.iso_flops}"
    if tc.iso_params is not None:
        raise ValueError(f"{setting} and iso_params={tc.iso_params}: both set the MLP's width; choose one")
    if tc.iso_flops < 1:
        raise ValueError(f"{setting} must be a number of FLOPs per training token >= 1")

    def per_token(config: ModelConfig) -> float:
        flops = training_flops(config, 1, tc.data.seq_len)
        if flops is None:
            raise ValueError(f"{setting}: this model's FLOPs cannot be counted from its shapes (its forward depends "
                             "on values: MoE routing, MatryoshkaKV's ranks, RWKV's chunks)")  # fmt: skip
        return flops / tc.data.seq_len

    return model_cfg.with_mlp_hidden_for(tc.iso_flops, per_token, setting)


def _initial_model(tc: TrainConfig):
    """The model named by ``init``, before any conversion, or None to start from scratch.

    ``init.from``: ``scratch``; ``checkpoint`` (a kvlab ``.ckpt``); ``hf`` (a
    Hugging Face directory). The source's tokenizer (the HF directory's, or
    the ``tokenizer.json`` saved beside kvlab checkpoints) is then used for
    the data unless ``data.tokenizer`` says otherwise. ``init.convert`` (the mapping of
    ``kvlab.archs.convert_model``) is applied by ``_converted`` once the data
    is ready, since ``method: similarity`` calibrates on it.
    """
    init = dict(tc.init)
    if tc.ckpt is not None and init.get("path") != tc.ckpt:
        raise ConfigError(
            f"ckpt={tc.ckpt!r} is the shorthand of recipe=eval, export and lm_eval for init.path; here give init.path"
        )
    unknown = set(init) - {"from", "path", "convert"}
    if unknown:
        raise ConfigError(f"init.{sorted(unknown)[0]}: unknown key; valid keys are from, path, convert")
    source = init.get("from", "scratch")
    if source not in INIT_SOURCES:
        raise ConfigError(f"init.from={source!r} is not one of {', '.join(INIT_SOURCES)}")
    if source == "scratch":
        if init.get("convert"):
            raise ConfigError("init.convert needs init.from=checkpoint or hf: there is nothing to convert")
        return None
    path = init.get("path")
    if not path or not Path(path).expanduser().exists():
        raise ConfigError(f"init.path={path!r}: nothing there; init.from={source} needs an existing path")
    try:
        if source == "hf":
            from kvlab.archs.hf import load_hf

            model = load_hf(path)
            if not tc.data.tokenizer:
                tc.data.tokenizer = str(path)
        else:
            beside = Path(path).expanduser().parent / "tokenizer.json"
            if beside.is_file() and tc.stages != ["export"]:  # (an export alone reads no data: _export_only)
                tc.data.tokenizer = tokenizer_to_use(tc.data, beside)
            model = load_checkpoint_model(path)
            ignored = differences(ModelConfig.from_dict(tc.model).to_dict(), model.config.to_dict(), "model")
            if ignored:  # the architecture is the checkpoint's: say which settings of `model` do not apply
                log.info("init: the checkpoint's model is used; model settings that differ and do not apply: %s",
                         "; ".join(ignored[:8]))  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"init: {e}") from None
    log.info("init: from %s %s", source, path)
    return model


# How a run from scratch draws its weights: per module, from the run's seed and the module's name
# (CausalLM.init_weights(seed)); runs cached before it drew them from the global generator and are not reused.
INIT_SCHEME = "per-module seeds"


def training_identity(cfg: DictConfig) -> dict:
    """What shapes the result of training ``cfg``'s model, for the caches of runs that other runs reuse (an
    uptraining parent, the learning-rate sweep's trials; each adds what else its runs depend on): the model
    but its kernel backends (how, not what, it computes), the data but where it is cached and how it is read,
    the optimizer, and the trainer's numerics. The data by its settings and by what the corpus holds
    (``corpus_fingerprint``: its files' sizes and times, the token streams' format), so that a corpus edited in
    place trains a new parent rather than reusing one trained on the old text."""

    def plain(node) -> dict:
        return OmegaConf.to_container(node, resolve=True)

    data = plain(cfg.data)
    return {
        "init": INIT_SCHEME,
        "model": {k: v for k, v in plain(cfg.model).items() if k != "kernels"},
        "data": {k: v for k, v in data.items() if k not in ("cache_dir", "streaming", "num_workers")},
        "corpus": corpus_fingerprint(DataConfig(**data)),
        "optim": plain(cfg.optim),
        "trainer": {k: cfg.trainer[k] for k in ("precision", "accumulate_grad_batches", "gradient_clip_val")},
    }


# the contexts every run counts its cache at, exactly (what an ablation's table reads; KIVI's residual and
# windows make a cache more than per-token bytes times tokens)
KV_CONTEXTS = (1024, 2048, 4096, 8192, 32768)


def _check_cache_policy(tc: TrainConfig, model_cfg: ModelConfig) -> None:
    """``cache``: a policy the model's caches take, for a run that evaluates through it."""
    if tc.cache is None:
        return
    try:
        policy = CachePolicy.from_spec(tc.cache)
        with torch.device("meta"):  # MLA's latent is refused here, before any training
            build_model(model_cfg).kv_footprint(torch.bfloat16, policy)
    except ValueError as e:
        raise ConfigError(f"cache: {e}") from None
    if policy is not None and "eval" not in tc.stages:
        raise ConfigError(f"cache={policy.kind} is the cache stage eval decodes through; stages={tc.stages} has "
                          "no eval stage (training never reads a cache)")  # fmt: skip
    if policy is not None and tc.data.doc_mask:
        raise ConfigError(f"cache={policy.kind} decodes the validation rows through the cache, which cannot restart "
                          "at packed documents: use data.doc_mask=false")  # fmt: skip
    if tc.eval.cache_chunk < 1:
        raise ConfigError(f"eval.cache_chunk={tc.eval.cache_chunk} must be >= 1 (tokens per decoding step)")
    if not 0 <= tc.eval.cache_prompt < tc.data.seq_len:
        raise ConfigError(f"eval.cache_prompt={tc.eval.cache_prompt} must be from 0 to data.seq_len - 1 = "
                          f"{tc.data.seq_len - 1} (a validation row's tokens prefilled before it decodes)")  # fmt: skip


def _model_metrics(model, policy: CachePolicy | None = None) -> dict:
    """What every run reports of its model: parameters, the bf16 KV footprint (its K/V held through
    ``policy``, and then the footprint without it beside), and the config."""
    fp = model.kv_footprint(torch.bfloat16, policy)
    metrics = {"params": model.num_parameters(), "kv_bytes_per_token": fp.bytes_per_token,
               "kv_fixed_bytes": fp.fixed_bytes, "model": model.config.to_dict(),
               "kv_bytes_at": {str(n): fp.total_bytes(n) for n in KV_CONTEXTS}}  # fmt: skip
    if policy is not None:
        metrics["kv_bytes_per_token_bf16"] = model.kv_footprint(torch.bfloat16).bytes_per_token
    if fp.context_bytes_per_token:
        metrics["context_bytes_per_token"] = fp.context_bytes_per_token
    return metrics


def _whole_model(module: LMModule, run_dir: Path, initial):
    """The model as one process holds it, for rank 0's evaluations and export: the module's own, or under FSDP2
    (its parameters sharded over the ranks, which rank 0 alone cannot run) the gathered weights the run saved
    (or, without training, the initial model they came from)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in module.model.parameters()):
        return module.model
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return load_checkpoint_model(last).eval()
    if initial is not None:
        return initial.eval()
    raise ConfigError("trainer=fsdp without training or an initial model: nothing whole to evaluate or export")


def _export_only(tc: TrainConfig, run_dir: Path, initial) -> dict:
    """``stages=[export]``: the initial model (converted where no calibration is asked for) exported with its
    source's tokenizer, without preparing data or validating."""
    from kvlab.archs.hf import save_hf

    if initial is None:
        raise ConfigError("stages=[export] exports an existing model without data: set init.from=checkpoint or hf "
                          "(recipe=export ckpt=PATH stages=[export]); to export what a run trains: "
                          "stages=[train,export]")  # fmt: skip
    init = dict(tc.init)
    convert, report = init.get("convert"), {}
    if convert:
        convert = conversion_spec(convert)
        if calibration_rows(convert):
            raise ConfigError(f"init.convert={convert} calibrates on data, which stages=[export] "
                              "does not prepare: add stage eval (stages=[eval,export])")  # fmt: skip
        try:
            initial = convert_model(initial, convert, report=report)
        except ValueError as e:
            raise ConfigError(f"init.convert: {e}") from None
    source = Path(init["path"]).expanduser()
    tokenizer = tc.data.tokenizer or (source.parent / "tokenizer.json" if source.is_file() else source)
    if not Path(tokenizer).is_file() and not (Path(tokenizer) / "tokenizer.json").is_file():
        log.warning("export: no tokenizer beside %s; the export has none", source)
        tokenizer = None
    _claim_run_dir(run_dir, None)
    metrics = _model_metrics(initial)
    out = save_hf(initial, run_dir / "hf", tokenizer=tokenizer, dtype=DTYPES[tc.export.dtype], metrics=metrics)
    metrics["hf_dir"] = str(out)
    log.info("export: %s", out)
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def conversion_spec(convert) -> dict | list[dict]:
    """``init.convert`` as plain data: one conversion's mapping, or a chain's list of them."""
    if isinstance(convert, (list, tuple, ListConfig)):
        return [dict(step) if isinstance(step, (dict, DictConfig)) else step for step in convert]
    return dict(convert)


def _converted(model, spec: dict | list[dict], datamodule: LMDataModule, report: dict):
    """``init.convert`` applied to the initial model, with calibration rows from the training data;
    ``report`` receives what a search found."""
    calibration = None
    n_rows = calibration_rows(spec)
    if isinstance(n_rows, int) and n_rows > 0:  # convert_model reports a bad calibration_rows
        datamodule.setup("fit")
        rows = datamodule.splits["train"][:n_rows]["input_ids"]
        calibration = torch.as_tensor(rows)[:, :-1].long()
    try:
        model = convert_model(model, spec, calibration=calibration, report=report)
    except ValueError as e:
        raise ConfigError(f"init.convert: {e}") from None
    log.info("init: converted %s", spec)
    return model


def _finished_job(cfg: DictConfig, run_dir: Path) -> dict | None:
    """A continued sweep's job (``resume=auto`` in a multirun over the sweep directory of a killed one) whose
    directory holds its finished run: that run's metrics, kept as they are (None: it did not finish). A
    directory holding a run of other settings (the sweep's overrides changed, and with them the jobs' numbers)
    is refused, naming what differs."""
    _same_job(cfg, run_dir)
    if not (run_dir / "metrics.json").is_file():
        return None
    log.info("resume=auto: this sweep job finished before in %s; its run is kept as it is", run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def _same_job(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a sweep job's directory that holds another job's run (its ``checkpoints/config.yaml``) or one in use."""
    # The other processes of a multi-process run start inside rank 0's fit, which holds the directory by then
    pid = run_dir_in_use(run_dir) if rank_zero_only.rank == 0 else None
    if pid is not None:
        raise ConfigError(f"run directory {run_dir} is in use by another kvlab run (process {pid})")
    saved = run_dir / "checkpoints" / "config.yaml"
    if not saved.is_file():
        return
    theirs, ours = OmegaConf.to_container(OmegaConf.load(saved)), OmegaConf.to_container(cfg, resolve=True)
    theirs.pop("resume", None), ours.pop("resume", None)
    found = differences(ours, theirs)
    if found:
        raise ConfigError(
            f"resume=auto: {run_dir} holds a run of other settings ({'; '.join(found[:6])}: this job vs that run); "
            "continue a sweep with the overrides it ran with (the jobs' numbers name their directories), or "
            "give it another hydra.sweep.dir"
        )


def _resume_path(tc: TrainConfig, run_dir: Path) -> str | None:
    """The checkpoint to continue from: ``resume=PATH`` (verified), or with ``resume=auto`` the newest
    checkpoint of an earlier run of this ``run_name`` that loads, falling back past broken ones (in a sweep:
    of this job's own directory, which a killed sweep's job left)."""
    if tc.resume in (None, "", "none"):
        return None
    if tc.resume == "auto":
        if _hydra_run().get("sweep"):
            return newest_checkpoint(run_dir, "checkpoints/*.ckpt")
        return newest_checkpoint(Path(tc.output_root) / tc.run_name, "*/checkpoints/*.ckpt", but_not=run_dir)
    path = Path(tc.resume).expanduser()
    if not path.exists():  # a Lightning file, or a DeepSpeed checkpoint directory
        raise ConfigError(f"resume={tc.resume!r}: no checkpoint there; give a .ckpt path, auto, or null")
    problem = _checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"resume={tc.resume!r}: {problem}")
    return str(path)


def newest_checkpoint(runs: Path, pattern: str, but_not: Path | None = None, who: str = "resume=auto") -> str | None:
    """``resume=auto``'s choice: the newest checkpoint matching ``pattern`` under ``runs`` that loads, falling
    back past broken ones (None: none does), outside the run directory ``but_not`` (this run's own); ``who``
    heads what is logged."""
    found = [p for p in runs.glob(pattern) if but_not is None or but_not.resolve() not in p.resolve().parents]
    for ckpt_dir in {p.parent for p in found}:
        for orphan in remove_orphans(ckpt_dir):
            log.info("%s: removed %s, left by a checkpoint write that was interrupted", who, orphan)
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = _checkpoint_problem(path)
        if problem is None:
            log.info("%s: continuing %s", who, path)
            return str(path)
        log.warning("%s: skipping %s (%s); trying the next newest", who, path, problem)
    log.info("%s: no usable checkpoint under %s; starting afresh", who, runs)
    return None


def unfinished_cached_run(run_dir: Path, who: str) -> str | None:
    """A run kvlab caches for other runs to reuse (an uptraining parent, a learning-rate trial), interrupted: the
    checkpoint it continues from, or None with its directory cleared (kvlab's own, holding no checkpoint)."""
    if not run_dir.exists():
        return None
    busy = run_dir_in_use(run_dir)
    if busy is not None:
        raise ConfigError(f"{who}: another run (process {busy}) is training it in {run_dir}")
    ckpt = newest_checkpoint(run_dir, "checkpoints/*.ckpt", who=who)
    if ckpt is None:
        shutil.rmtree(run_dir)
    return ckpt


def _checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (None: it loads and has what resuming needs)."""
    fields = lightning_fields_file(path)
    if not fields.is_file():
        return "a directory without a DeepSpeed checkpoint/*model_states.pt"
    if path.is_dir() and not (path / "latest").is_file():  # DeepSpeed writes it last, once every shard is saved
        return "an incomplete DeepSpeed checkpoint (no 'latest' file: its writing was interrupted)"
    try:
        ckpt = lightning_fields(path)
    except Exception as e:  # truncated, empty or not a checkpoint: torch raises several types
        return f"does not load as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    missing = [k for k in ("global_step", "loops", "hyper_parameters") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        return f"not a kvlab training checkpoint (no {', '.join(missing)})"
    return None


def _check_resumable(
    ckpt_path: str, model_cfg: ModelConfig, tc: TrainConfig, world_size: int, rows: dict | None
) -> None:
    """Resuming continues the checkpoint's training: a different model would load (or half load)
    and train something else, so any difference is refused, field by field; so are training ``rows``
    (``LMDataModule.train_rows``; None: not training), a batch size, process count or seed under which the
    checkpoint's place in the data means other rows."""
    saved = lightning_fields(Path(ckpt_path))
    planned = saved.get("hyper_parameters", {}).get("max_steps")
    if planned is not None and planned != tc.trainer.max_steps:  # a longer run is a common wish: said, not refused
        log.warning("resume: trainer.max_steps=%d, the checkpoint's run planned %d: its learning-rate schedule comes "
                    "back with it, so the rate follows the checkpoint's cosine to step %d and then stays at "
                    "optim.lr * optim.min_lr_ratio", tc.trainer.max_steps, planned, planned)  # fmt: skip
    loaders = saved["loops"].get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
    if not loaders:
        log.warning("resume: %s holds no place in the data (an older checkpoint): its epoch restarts", ckpt_path)
    elif (problem := resume_problem(loaders[0], tc.data.batch_size, world_size, tc.seed, rows, ckpt_path)) is not None:
        raise ConfigError(f"resume: {problem}")
    try:
        theirs = ModelConfig.from_dict(saved["hyper_parameters"]["model"]).to_dict()
    except (KeyError, ValueError) as e:
        raise ConfigError(f"resume: {ckpt_path}: its model config does not load ({e})") from None
    ours = model_cfg.to_dict()
    ours.pop("kernels"), theirs.pop("kernels")  # how, not what, the model computes
    found = differences(ours, theirs, "model")
    if found:
        raise ConfigError(
            f"resume: this run's model differs from the checkpoint's ({'; '.join(found[:6])}: this run vs "
            f"the checkpoint); resume with the checkpoint's settings (its config.yaml) or start a new run"
        )
    # The optimizer's state and its schedule come back from the checkpoint, so another optim setting would be
    # silently ignored (a lower rate after a divergence is the usual wish): refused, with the way to get it.
    saved_optim = saved["hyper_parameters"].get("optim")
    found = [] if saved_optim is None else differences(dataclasses.asdict(tc.optim), dict(saved_optim), "optim")
    if found:
        raise ConfigError(
            f"resume: this run's optimizer settings differ from the checkpoint's ({'; '.join(found[:6])}: this run "
            f"vs the checkpoint), which a resumed run would not use: it continues the checkpoint's optimizer and "
            f"schedule; resume with the checkpoint's settings, or train its weights with new ones from a fresh "
            f"optimizer: init.from=checkpoint init.path={ckpt_path}"
        )


LOCK_FILE = ".kvlab-run.lock"


def _claim_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """Take ``run_dir`` for this run, or refuse one that another run holds (alive, or finished or
    interrupted with its checkpoints there), unless this run resumes from that directory's checkpoint."""
    if rank_zero_only.rank != 0:  # the other processes of a multi-process run share rank 0's directory
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    resuming_here = _resumes_in(run_dir, ckpt_path)
    pid = run_dir_in_use(run_dir)
    if pid is not None:
        raise ConfigError(f"run directory {run_dir} is in use by another kvlab run (process {pid}); "
                          "give this run another directory (run_name or hydra.run.dir)")  # fmt: skip
    ours = lock.exists() and lock.read_text().split()[:1] == [str(os.getpid())]
    held = (run_dir / "metrics.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt"))
    if held and not resuming_here and not ours:
        raise ConfigError(
            f"run directory {run_dir} holds another run's checkpoints or metrics; give this run another "
            f"directory, or resume={run_dir / 'checkpoints' / 'last.ckpt'} to continue that run"
        )
    atomic_write_text(lock, f"{os.getpid()}\n")


def _resumes_in(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether the run resumes a checkpoint inside ``run_dir`` (its own directory)."""
    return ckpt_path is not None and run_dir.resolve() in Path(ckpt_path).resolve().parents


def run_dir_in_use(run_dir: Path) -> int | None:
    """The pid of another live process whose run holds ``run_dir`` (its lock file), else None."""
    try:
        pid = int((run_dir / LOCK_FILE).read_text().split()[0])
    except (ValueError, IndexError, OSError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


# -- Lightning objects -------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing through a temporary file in the checkpoint's own directory.

    Lightning's own goes through a temporary file under ``TMPDIR``; on another
    filesystem its "rename" is a copy, and a kill during the copy leaves a
    truncated ``last.ckpt``. Here the rename is atomic (``kvlab._io``).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def metrics_table(metrics: dict) -> str:
    """The run's numbers as aligned ``name  value`` lines, nested sections dotted (the model config left out)."""

    def shown(v) -> str:
        if isinstance(v, float):
            return f"{v:,.4f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    table = [(k, shown(v)) for k, v in dotted_items({k: v for k, v in metrics.items() if k != "model"})]
    width = max((len(k) for k, _ in table), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in table)


class _NotATip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def _quiet_libraries() -> None:
    """A run's log holds kvlab's lines and Lightning's facts, not a library's advertisements or deprecation
    notices about its own code that a user cannot act on."""
    from lightning_utilities.core import rank_zero  # Lightning's rank_zero_info logs through its `log`

    if not any(isinstance(f, _NotATip) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_NotATip())  # Lightning's litlogger tip, at every Trainer
    # Lightning's pytree helper on torch >= 2.10; Lightning's to change, nothing the run does
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # config.yaml sits beside the checkpoints on purpose
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


class LineProgress(L.Callback):
    """Progress for a log file (standard output not a terminal): a line every ``every`` steps and at the
    last, with the loss, tokens/s and the time left, instead of a bar redrawn with carriage returns."""

    def __init__(self, every: int):
        self.every = every
        self.start: tuple[float, int] | None = None
        self.shown = -1

    def on_train_start(self, trainer, module) -> None:
        self.start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step, last = trainer.global_step, trainer.max_steps
        # batches that accumulate gradients leave global_step where it was: one line per step
        if step in (self.start[1], self.shown) or (step % self.every and step != last):
            return
        self.shown = step
        elapsed = time.perf_counter() - self.start[0]
        left = elapsed / (step - self.start[1]) * (last - step)
        m = trainer.callback_metrics
        loss = f"train_loss {float(m['train_loss']):.4f}" if "train_loss" in m else ""
        speed = f", {float(m['tokens_per_s']):,.0f} tokens/s" if "tokens_per_s" in m else ""
        log.info("step %d/%d (%d%%): %s%s, %s left", step, last, 100 * step // last, loss, speed,
                 _duration(left))  # fmt: skip

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            log.info("step %d: val_loss %.4f", trainer.global_step, float(trainer.callback_metrics["val_loss"]))


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint saving the newest step every ``every_n_train_steps`` optimizer steps (and
    ``last.ckpt``), only after a batch that stepped.

    It saves at a batch's end when the step count is a multiple of ``every_n_train_steps``. Under gradient
    accumulation the count stays put through the next window's micro-batches, whose gradients a checkpoint does
    not hold: a save there resumed without them. That happened when the save due at an epoch's last batch was
    put off (a monitored checkpoint waits for an end-of-epoch validation, which step-based validation never
    runs) to the next batch: with one batch a step the checkpoint was lost; with accumulation the next epoch's
    first micro-batch was trained into the checkpoint but its gradient was not, and the resumed run left it out
    of its step. So no monitor (the newest kept, as ``monitor="step"`` kept it) and no save after a batch that
    did not step.

    And nothing the run logs at the checkpoint's step is lost to a kill after it. Lightning writes a step's log
    row after the checkpoint callbacks and validates after that; the resumed run starts at the next step and
    skips a validation due at the checkpoint's (it takes it as done). So the step's row is written before the
    save, and at a step that validates the save waits for the validation's end (a kill during it resumes from
    the checkpoint before, whose run validates again)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._steps_before:  # no optimizer step: its gradients are in no checkpoint
            return
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps:
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            return
        _log_the_step_now(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        for logger in trainer.loggers:  # what was logged before the checkpoint is on disk before it
            if isinstance(logger, RunTensorBoardLogger):
                logger.write_out()
        super()._save_checkpoint(trainer, filepath)


class ContinuedThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, whose training counts (``train/batches``, ``train/samples``,
    ``train/lengths``, ``train/time``) go in the checkpoint and on from there in a resumed run, as the
    uninterrupted run logs them (Lightning's start again from 0). Its rates start a new window."""

    _resumed: dict | None = None

    def state_dict(self) -> dict:
        stage = RunningStage.TRAINING
        if stage not in self._t0s:  # not rank 0, or not training
            return {}
        return {"batches": self._batches[stage], "samples": self._samples[stage], "lengths": self._lengths[stage],
                "time": time.perf_counter() - self._t0s[stage]}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = state_dict or None

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        stage, resumed, self._resumed = RunningStage.TRAINING, self._resumed, None
        if resumed and stage in self._t0s:
            self._batches[stage], self._samples[stage] = resumed["batches"], resumed["samples"]
            self._lengths[stage] = resumed["lengths"]
            self._t0s[stage] -= resumed["time"]


def _log_the_step_now(trainer: L.Trainer) -> None:
    """Writes the step's log row now (the loggers save it at once), and not again where Lightning would write it,
    after the checkpoint callbacks (ThroughputMonitor's row is written already: it runs before them)."""
    connector = trainer._logger_connector
    connector.update_train_step_metrics()

    def written_already() -> None:
        del connector.update_train_step_metrics  # the class's method again from the next step on

    connector.update_train_step_metrics = written_already


def _trainer(tc: TrainConfig, run_dir: Path, continues_log_at: int | None = None) -> L.Trainer:
    """``continues_log_at``: the step of the checkpoint a run resumes in its own directory (its CSV log goes on
    from there); None: a new directory."""
    from lightning.pytorch.callbacks import RichProgressBar

    t = tc.trainer
    _quiet_libraries()
    callbacks = [
        StepCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every_n_steps,
            save_top_k=1,
            save_last=True,
        )
    ]
    if t.throughput:  # FLOP/s and MFU (where the device's peak is known) from the module's flops_per_batch
        callbacks.append(ContinuedThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                                    length_fn=lambda b: b["input_ids"].numel()))  # fmt: skip
    bar = t.progress_bar and sys.stdout.isatty()  # a log file gets lines (LineProgress), not a redrawn bar
    if bar:
        callbacks.append(RichProgressBar())
    elif t.progress_bar:
        callbacks.append(LineProgress(t.log_every_n_steps))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(
            t.strategy, t.accelerator, t.devices * t.num_nodes if isinstance(t.devices, int) and t.devices > 0 else None
        ),  # fmt: skip
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
        logger=_logger(tc, run_dir, continues_log_at),
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
        # DeepSpeed writes its own sharded directories and takes no checkpoint plugin
        plugins=None if t.strategy.startswith("deepspeed") else [AtomicCheckpointIO()],
    )


def _logger(tc: TrainConfig, run_dir: Path, continues_log_at: int | None):
    kind = tc.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return RunCSVLogger(run_dir, continues_log_at)
    if kind == "tensorboard":
        # a run resuming in its own directory hides the killed run's events from its checkpoint's step on
        return RunTensorBoardLogger(save_dir=run_dir, name="logs", version="", purge_step=continues_log_at)
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE") or tc.logger.mode or "offline"
    name, group, tags = wandb_identity(tc, _hydra_run())
    return WandbLogger(project=tc.logger.project, name=name, group=group, tags=tags, save_dir=str(run_dir),
                       offline=mode != "online")  # fmt: skip


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, whose events are all in their file before each checkpoint is saved, so a
    kill loses none that the resumed run will not log again.

    tensorboardX writes events from a thread, and only closing its file waits for them (its flush writes out
    what the thread has written; the events still queued stay there, up to ``flush_secs``, 2 minutes): a kill
    after a checkpoint lost the events before it, which the resumed run, starting after it, never logs. So the
    file is closed before each checkpoint and at each stage's end (the validation before training, the
    training, the final validation), and the next events go to a new file, numbered (tensorboardX names a file
    by the second it opens in, and a stage ended within its file's second had it overwritten by the next
    stage's). A resumed run's purge marker (``purge_step``) goes into its first file only: Lightning's wrote it
    into every new file, where the final validation's hid the resumed run's own training from the checkpoint's
    step on."""

    _files = 0

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._files += 1
            self._kwargs["filename_suffix"] = f".{self._files:06d}"  # (files of one second sort in their order)
        writer = super().experiment
        self._kwargs.pop("purge_step", None)
        return writer

    @rank_zero_only
    def write_out(self) -> None:
        """Close the file, with every event logged so far in it; the next event opens a new one."""
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self._experiment = None  # closed: the next stage writes a file of its own


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, which deletes a metrics.csv already there; with ``continues_at`` (the step of the
    checkpoint a run resumes in its own directory) it keeps the rows the killed run logged before that step and
    writes on after them (those from that step on, the resumed run logs again).

    ThroughputMonitor's validation rows (only ``validate/`` columns) count their step in validation batches, not
    training steps: they go with the validation whose results row follows them, kept or not with it (a
    validation the kill interrupted has no results row: the resumed run runs it again)."""

    def __init__(self, log_dir: str, continues_at: int | None):
        self.continues_at = continues_at
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.continues_at is None or not path.is_file():
            return super()._check_log_dir_exists()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, kept, validation = reader.fieldnames or [], [], []
            for row in reader:  # in the order logged: up to the first row of the resumed step (or a torn one)
                step = row.get("step") or ""
                if None in row.values() or not step.isdigit():
                    break
                if all(k.startswith("validate/") for k, v in row.items() if v and k != "step"):
                    validation.append(row)
                    continue
                if int(step) >= self.continues_at:
                    break
                kept += validation + [row]
                validation = []
        atomic_write_csv(path, kept, header)
        self.metrics_keys = list(header)  # the rows to come go under the same columns (or all are rewritten)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Every row again under the columns a new metric adds, through a temporary (Lightning's rewrites the
        file in place: a kill then lost the whole log)."""
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        atomic_write_csv(self.metrics_file_path, rows, fieldnames)


class RunCSVLogger(CSVLogger):
    """Lightning's CSV logger into ``run_dir/logs/metrics.csv`` (written at every logged step), continuing the log
    of the run it resumes in the same directory, from ``continues_at`` (see ``_ContinuedWriter``), so the file is
    the uninterrupted run's log; None: a new run."""

    def __init__(self, run_dir: Path, continues_at: int | None):
        super().__init__(save_dir=run_dir, name="logs", version="")
        self.continues_at = continues_at

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.continues_at)
        return self._experiment


def _hydra_run() -> dict:
    """What Hydra knows of this run that the config does not hold: the model preset picked, and in a sweep
    (-m) its directory and this job's overrides. Empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    return {"preset": hc.runtime.choices.get("model"), "sweep": Path(hc.sweep.dir).name if sweep else None,
            "overrides": hc.job.override_dirname if sweep else ""}  # fmt: skip


def wandb_identity(tc: TrainConfig, hydra_run: dict) -> tuple[str, str | None, list[str]]:
    """A wandb run's (name, group, tags): named ``<run_name>-<preset>-s<seed>`` (a sweep's job: by its overrides
    instead, which say what differs), grouped by sweep (``<run_name>/<sweep dir>``; None outside a sweep), tagged
    with the run name, the preset and the mixer kinds. ``logger.name`` and ``logger.group`` override them."""
    preset = hydra_run.get("preset") or "model"
    sweep = hydra_run.get("sweep")
    name = f"{tc.run_name}-{hydra_run['overrides']}" if sweep and hydra_run.get("overrides") else None
    name = tc.logger.name or name or f"{tc.run_name}-{preset}-s{tc.seed}"
    group = tc.logger.group or (f"{tc.run_name}/{sweep}" if sweep else None)
    return name, group, [tc.run_name, preset, *ModelConfig.from_dict(tc.model).mixer_kinds]


def _as_after_the_last_step(trainer: L.Trainer, ckpt_path: str) -> None:
    """A run resumed from its last step's checkpoint trains nothing, and Lightning's fit stops before it counts
    that step's end (the log's step) and closes its epoch (the epoch counter goes past the last batch's when a
    fit ends), as it did where the checkpoint was saved in the fit: count them as the uninterrupted run's fit
    did, so that the final validation's log row is that run's."""
    loop = trainer.fit_loop
    loop.epoch_loop._batches_that_stepped = trainer.global_step
    saved = lightning_fields(Path(ckpt_path))["loops"].get("fit_loop", {}).get("state_dict", {})
    loaders = saved.get("combined_loader", [])
    if loaders and "epoch" in loaders[0]:  # the epoch of the last batch trained
        while trainer.current_epoch <= loaders[0]["epoch"]:
            loop.epoch_progress.increment_processed()
            loop.epoch_progress.increment_completed()


def _validate(trainer: L.Trainer, module: LMModule, datamodule: LMDataModule) -> float:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(results[0]["val_loss"])


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
