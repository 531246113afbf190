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

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from kvlab.archs import ModelConfig, build_model, convert_model
from kvlab.recipes.config import LOGGERS, STAGES, TrainConfig
from kvlab.recipes.data import LMDataModule, build_datamodule, tokenizer_to_use
from kvlab.recipes.evals import decode_speed, passkey_grid
from kvlab.recipes.module import LMModule
from kvlab.recipes.strategies import STRATEGIES, build_strategy, deepspeed_available

log = logging.getLogger("kvlab")


class ConfigError(ValueError):
    """A user-facing configuration problem: reported as one line, exit status 1."""


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and/or evaluate as ``cfg`` says; return the metrics written to metrics.json."""
    tc: TrainConfig = OmegaConf.to_object(cfg)
    model_cfg = _validated(tc)
    L.seed_everything(tc.seed, verbose=False)
    ckpt_path = _resume_path(tc, run_dir)
    initial = _initial_model(tc)
    if initial is not None:  # the architecture comes from the source (and conversion), not from `model`
        model_cfg = initial.config
        if tc.data.seq_len > model_cfg.max_seq_len:
            raise ConfigError(
                f"data.seq_len={tc.data.seq_len} exceeds the initial model's max_seq_len={model_cfg.max_seq_len}"
            )
    datamodule = build_datamodule(tc.data)
    try:
        datamodule.prepare_data()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    convert = dict(tc.init).get("convert")
    if initial is not None and convert:
        initial = _converted(initial, dict(convert), datamodule)
        model_cfg = initial.config
    if datamodule.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {datamodule.vocab_size} tokens"
        )
    module = LMModule(
        model=model_cfg.to_dict(),
        optim=OmegaConf.to_container(cfg.optim),
        max_steps=tc.trainer.max_steps,
        activation_checkpointing=tc.trainer.activation_checkpointing,
    )
    if initial is not None:
        module.model.load_state_dict(initial.state_dict())
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "checkpoints" / "config.yaml", resolve=True)
    # The tokenizer travels with the checkpoints: init from them (uptraining, export) reads the same tokens.
    if datamodule.tokenizer is not None:  # generated tasks (MQAR) have none
        datamodule.tokenizer.save(str(run_dir / "checkpoints" / "tokenizer.json"))
    trainer = _trainer(tc, run_dir)
    metrics: dict = {}
    if "train" in tc.stages:
        if ckpt_path is None:  # the starting point, for comparing with the end
            metrics["initial_val_loss"] = _validate(trainer, module, datamodule)
        start_step = _checkpoint_step(ckpt_path)
        if ckpt_path is not None:
            metrics["resumed_from"] = {"checkpoint": ckpt_path, "step": start_step}
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        elapsed = time.perf_counter() - t0
        last = run_dir / "checkpoints" / "last.ckpt"
        # Every rank decides and saves: DeepSpeed writes its partitions from all of them.
        trainer.strategy.barrier()
        if _checkpoint_step(last) != trainer.global_step:
            trainer.save_checkpoint(last)
        tokens_per_step = tc.data.batch_size * tc.data.seq_len * tc.trainer.accumulate_grad_batches * trainer.world_size
        metrics["train_loss"] = _metric(trainer, "train_loss")
        metrics["tokens_seen"] = trainer.global_step * tokens_per_step
        metrics["tokens_per_s"] = (trainer.global_step - start_step) * tokens_per_step / elapsed
        metrics["steps"] = trainer.global_step
    metrics["val_loss"] = _validate(trainer, module, datamodule)
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    metrics["val_accuracy"] = _metric(trainer, "val_accuracy")  # next-token; on data=mqar, recall
    for part in ("ar_hit", "ar_other"):  # perplexity on recallable tokens and on the rest (Zoology)
        loss = _metric(trainer, f"val_loss_{part}")
        metrics[f"val_ppl_{part}"] = None if loss is None else math.exp(min(loss, 50.0))
    fp = module.model.kv_footprint(torch.bfloat16)
    metrics.update(
        params=module.model.num_parameters(),
        kv_bytes_per_token=fp.bytes_per_token,
        kv_fixed_bytes=fp.fixed_bytes,
        model=model_cfg.to_dict(),
    )
    if "eval" in tc.stages and trainer.is_global_zero:
        metrics["decode_tokens_per_s"] = {f"batch_{b}": decode_speed(module.model, b) for b in (1, 8)}
        if datamodule.tokenizer is not None:  # text models: retrieval of a pass key hidden in filler
            metrics["passkey"] = passkey_grid(module.model, datamodule.tokenizer)  # 1/4, 1/2, all of the context
    if "export" in tc.stages and trainer.is_global_zero:
        from kvlab.archs.hf import save_hf

        metrics["hf_dir"] = str(save_hf(module.model, run_dir / "hf", tokenizer=datamodule.tokenizer))
        log.info("export: %s", metrics["hf_dir"])
    if trainer.is_global_zero:
        _write_json(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", {k: v for k, v in metrics.items() if k != "model"})
    return metrics


# -- validation of the whole config, before anything runs ------------------------


def _validated(tc: TrainConfig) -> ModelConfig:
    try:
        model_cfg = ModelConfig.from_dict(tc.model)
        if tc.iso_params is not None:
            if tc.iso_params < 1:
                raise ValueError(f"iso_params={tc.iso_params} must be a parameter count >= 1")
            model_cfg = model_cfg.with_params(tc.iso_params)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    try:
        tc.data.validate()
        tc.optim.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = tc.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if tc.logger.kind not in LOGGERS:
        raise ConfigError(f"logger.kind={tc.logger.kind!r} is not one of {', '.join(LOGGERS)}")
    for stage in tc.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: {stage!r} is not one of {', '.join(STAGES)}")
    for name in ("max_steps", "val_check_interval", "ckpt_every_n_steps", "accumulate_grad_batches"):
        if getattr(t, name) < 1:
            raise ConfigError(f"trainer.{name}={getattr(t, name)} must be >= 1")
    # With init from a checkpoint or HF directory the source's max_seq_len applies (checked in run).
    from_scratch = dict(tc.init).get("from", "scratch") == "scratch"
    if from_scratch and tc.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={tc.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if t.strategy == "fsdp" and t.accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy=fsdp needs trainer.accelerator=gpu (Lightning's FSDP runs on CUDA only); "
            "use trainer=ddp on CPU"
        )
    if t.strategy.startswith("deepspeed") and not deepspeed_available():
        raise ConfigError(f"trainer.strategy={t.strategy} needs DeepSpeed: pip install 'kvlab[deepspeed]'")
    return model_cfg


INIT_SOURCES = ("scratch", "checkpoint", "hf")


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
            f"ckpt={tc.ckpt!r} is recipe=export's and recipe=eval's shorthand for init.path; here give init.path"
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
            if beside.is_file():
                tc.data.tokenizer = tokenizer_to_use(tc.data, beside)
            model_dict, state = read_checkpoint(path)
            model = build_model(ModelConfig.from_dict(model_dict))
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"init: {e}") from None
    log.info("init: from %s %s", source, path)
    return model


CALIBRATION_ROWS = 8  # training rows that convert.method=similarity compares heads on


def _converted(model, spec: dict, datamodule: LMDataModule):
    """``init.convert`` applied to the initial model, with calibration rows from the training data."""
    calibration = None
    if spec.get("method") == "similarity" or spec.get("to") == "mla":  # they measure heads on tokens
        datamodule.setup("fit")
        rows = datamodule.splits["train"][:CALIBRATION_ROWS]["input_ids"]
        calibration = torch.as_tensor(rows)[:, :-1].long()
    try:
        model = convert_model(model, spec, calibration=calibration)
    except ValueError as e:
        raise ConfigError(f"init.convert: {e}") from None
    log.info("init: converted %s", spec)
    return model


def read_checkpoint(path) -> tuple[dict, dict]:
    """(model config dict, LMModule state dict) of a kvlab checkpoint.

    A Lightning ``.ckpt`` file, or the directory DeepSpeed strategies write
    (its partitions are gathered into full fp32 tensors).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        states = _lightning_fields_file(path)
        if states == path:
            raise FileNotFoundError(
                f"{path} is a directory but not a DeepSpeed checkpoint (no checkpoint/*model_states.pt)"
            )
        meta = torch.load(states, map_location="cpu", weights_only=False, mmap=True)
        return meta["hyper_parameters"]["model"], get_fp32_state_dict_from_zero_checkpoint(str(path), tag="checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return ckpt["hyper_parameters"]["model"], ckpt["state_dict"]


def _resume_path(tc: TrainConfig, run_dir: Path) -> str | None:
    if tc.resume in (None, "", "none"):
        return None
    if tc.resume == "auto":
        runs = Path(tc.output_root) / tc.run_name
        found = [p for p in runs.glob("*/checkpoints/last.ckpt") if p.parent.parent.resolve() != run_dir.resolve()]
        if not found:
            log.info("resume=auto: no earlier run under %s; starting afresh", runs)
            return None
        latest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("resume=auto: continuing %s", latest)
        return str(latest)
    path = Path(tc.resume).expanduser()
    if not path.exists():  # a Lightning file, or a DeepSpeed checkpoint directory
        raise ConfigError(f"resume={tc.resume!r}: no checkpoint there; give a .ckpt path, auto, or null")
    return str(path)


def _lightning_fields_file(path: Path) -> Path:
    """The file holding Lightning's fields (step, hyper-parameters): the checkpoint itself, or, in a
    DeepSpeed checkpoint directory, rank 0's model-states file (``path`` unchanged when there is none)."""
    if path.is_dir():
        found = sorted(path.glob("checkpoint/*mp_rank_00_model_states.pt"))
        return found[0] if found else path
    return path


def _checkpoint_step(path) -> int:
    """The global step a checkpoint was saved at: a Lightning file or a DeepSpeed directory; 0 if none."""
    if path is None:
        return 0
    path = _lightning_fields_file(Path(path))
    if not path.is_file():
        return 0
    # mmap: read the step without loading the weights
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))


# -- Lightning objects -------------------------------------------------------------


def _trainer(tc: TrainConfig, run_dir: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

    t = tc.trainer
    # config.yaml sits beside the checkpoints on purpose
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every_n_steps,
            save_top_k=1,
            monitor="step",
            mode="max",
            save_last=True,
        )
    ]
    if t.progress_bar:
        callbacks.append(
            RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps))
        )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy, t.accelerator),
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
        logger=_logger(tc, run_dir),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )


def _logger(tc: TrainConfig, run_dir: Path):
    kind = tc.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=run_dir, name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE") or tc.logger.mode or "offline"
    return WandbLogger(project=tc.logger.project, name=tc.run_name, save_dir=str(run_dir), offline=mode != "online")


def _validate(trainer: L.Trainer, module: LMModule, datamodule: LMDataModule) -> float:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(results[0]["val_loss"])


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
