"""The schema of ``configs/train.yaml``, registered with Hydra's ConfigStore.

Hydra merges the YAML tree into these dataclasses, so a misspelt key or a
value of the wrong type fails when the config is composed, before anything
runs. The ``model`` node is free-form here and checked by ``ModelConfig``
(its fields depend on the mixer kinds), with the same strictness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from kvlab._config import RENAMED_PRESETS, load_yaml
from kvlab.recipes.data import DataConfig
from kvlab.recipes.module import OptimConfig

LOGGERS = ("csv", "wandb", "tensorboard", "none")
STAGES = ("train", "eval", "lm_eval", "export")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
# Lightning's names; "bf16"/"16" and friends are its older spellings of the same settings
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "transformer-engine")


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_zero2 | deepspeed_zero3
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    max_steps: int = 200
    val_check_interval: int = 100  # optimizer steps between validations
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    ckpt_every_n_steps: int = 100
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block of the training forward (README: "Compiled training")
    progress_bar: bool = True
    throughput: bool = True  # Lightning's ThroughputMonitor: tokens/s, FLOP/s and MFU (FLOPs from the shapes)


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | wandb | tensorboard | none
    project: str = "kvlab"
    mode: str | None = None  # wandb: offline unless this or WANDB_MODE says online
    name: str | None = None  # wandb run name; null: <run_name>-<preset>-s<seed> (a sweep's job: its overrides)
    group: str | None = None  # wandb group; null: the sweep (<run_name>/<sweep dir>) in a -m run, else none


@dataclass
class EvalConfig:
    """What stage ``eval`` measures beside the validation loss (kvlab.recipes.evals)."""

    decode_speed: bool = True  # generate's greedy tokens/s at batch 1 and 8
    passkey: bool = True  # pass-key retrieval (text data) at 1/4, 1/2 and all of passkey_max_len
    passkey_max_len: int | None = 2048  # the longest prompt; null: the model's max_seq_len (the cap either way)
    passkey_trials: int = 5  # keys per length and depth
    # with a cache policy (`cache`): the validation rows are decoded through it this many tokens a step, each
    # step reading the earlier ones back from the cache (1: every token, as in generation)
    cache_chunk: int = 1
    # ... after the first cache_prompt tokens of each row, prefilled in one step as a prompt (0: none; SnapKV
    # compresses a prompt, and only a prompt)
    cache_prompt: int = 0


@dataclass
class LmEvalConfig:
    """Stage ``lm_eval`` (kvlab.recipes.lm_eval): which lm-eval tasks, and how (lm-eval's options, its names)."""

    tasks: list[str] = field(default_factory=list)  # task or group names (or globs), e.g. [lambada_openai]
    include_path: str | None = None  # a directory of task YAMLs of your own (lm-eval's --include_path)
    builtin_tasks: bool = True  # lm-eval's own tasks too (indexing them takes seconds; their data needs the hub)
    num_fewshot: int | None = None  # null: each task's own
    limit: float | None = None  # examples per task (>= 1), or a fraction of each (< 1); null: all
    batch_size: int = 4  # rows per forward (log-likelihoods) and per generate call
    max_gen_toks: int = 256  # new tokens of generate_until where a task does not say
    bootstrap_iters: int = 100000  # resamples for the metrics' standard errors (0: none)
    compile: bool = False  # compile generate's decode step (pays on long generations)
    seed: int = 1234  # of lm-eval's few-shot sampling and its other seeds, and of sampled generations

    def check(self) -> None:
        """Raise ValueError naming the field whose value lm-eval would not take."""
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"lm_eval.tasks={self.tasks!r}: name one or more lm-eval tasks, e.g. [lambada_openai]")
        for name in ("batch_size", "max_gen_toks"):
            if getattr(self, name) < 1:
                raise ValueError(f"lm_eval.{name}={getattr(self, name)} must be >= 1")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"lm_eval.limit={self.limit} must be > 0 (examples, or a fraction below 1), or null: all")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"lm_eval.num_fewshot={self.num_fewshot} must be >= 0, or null: each task's own")
        if self.bootstrap_iters < 0:
            raise ValueError(f"lm_eval.bootstrap_iters={self.bootstrap_iters} must be >= 0")


EXPORT_DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class ExportConfig:
    """How stage ``export`` writes the Hugging Face directory."""

    dtype: str = "bf16"  # of the exported weights (training keeps fp32 masters): bf16, fp16 or fp32


@dataclass
class UptrainConfig:
    """The staged uptraining recipes (gqa_, mqa_, mla_, cla_uptrain): see kvlab/recipes/uptrain.py."""

    parent_steps: int = 300  # steps of the MHA parent trained (and cached) when init.from=scratch
    alpha: float = 0.05  # uptraining tokens as a fraction of the parent's training tokens
    steps: int | None = None  # uptraining steps, overriding alpha
    warmup_steps: int | None = None  # of the uptraining (and scratch) schedule; null: a tenth of its steps
    lr: float | None = None  # peak lr of the uptraining (not of the scratch baseline); null: optim.lr
    compare_scratch: bool = False  # also train the converted architecture from scratch on the same budget


@dataclass
class LrSweepConfig:
    """The learning-rate sweep run before training (``kvlab.recipes.lr_sweep``): each rate of ``grid`` trained
    for ``steps`` at seed ``seed``, the one of least validation loss then trains the run."""

    grid: list[float] = field(default_factory=list)  # peak learning rates to try; empty: no sweep (optim.lr)
    steps: int = 100  # of each trial (a shorter budget than the run's, with its own warmup and cosine)
    seed: int = 0  # of the trials, whatever the run's seed: every seed of a preset trains at the rate chosen once

    def check(self) -> None:
        """Raise ValueError naming the field that is out of range."""
        if any(not (isinstance(lr, int | float) and lr > 0) for lr in self.grid):
            raise ValueError(f"lr_sweep.grid={list(self.grid)}: every learning rate must be > 0")
        if len(set(self.grid)) != len(self.grid):
            raise ValueError(f"lr_sweep.grid={list(self.grid)} names a learning rate twice")
        if self.steps < 1:
            raise ValueError(f"lr_sweep.steps={self.steps} must be >= 1")


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_name: str = "train"
    output_root: str = "outputs"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["train"])
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    resume: str | None = None  # null | auto (latest run of this run_name) | path to a .ckpt
    # where the weights start: {from: scratch | checkpoint | hf, path: ..., convert: {to: gqa, ...}}
    init: dict[str, Any] = field(default_factory=lambda: {"from": "scratch", "path": None, "convert": None})
    uptrain: UptrainConfig | None = None  # set by the staged uptraining recipes
    ckpt: str | None = None  # recipe=export's / eval's shorthand for init.path: python train.py recipe=eval ckpt=PATH
    iso_params: int | None = None  # widen or narrow the MLP so the model has about this many parameters
    # ... so a training token (forward + backward of a data.seq_len row) costs about this many FLOPs
    iso_flops: int | None = None
    # scale every mixer's cache width (head_dim, kv_lora_rank, state_dim) so one sequence's cache at
    # iso_cache_context tokens holds about this many bf16 bytes per token
    iso_cache: float | None = None
    iso_cache_context: int = 2048
    lr_sweep: LrSweepConfig = field(default_factory=LrSweepConfig)  # choose optim.lr first (grid: empty, off)
    # train on the KL divergence from the initial model before init.convert (knowledge distillation, as
    # MatryoshkaKV trains its projections) instead of on the labels
    distill: bool = False
    # the cache policy stage eval decodes through (kvlab.layers.cache_policy): null (keys and values as
    # computed), int8, int4, fp8, kivi, sinks, or a mapping: {kind: kivi, bits: 4}; its loss, footprint, pass key, speed
    cache: Any = None


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def choice_problem(argv: list[str], shipped: Path) -> str | None:
    """Why a config file this command line picks (``model=mine`` from ``--config-dir``, or the ``shipped`` tree)
    cannot be used: a YAML file that does not parse (naming the file and line; Hydra would show a traceback),
    or a model preset renamed since (naming the new one); None when every choice can be."""
    dirs = [shipped]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.insert(0, Path(argv[i + 1]))
        elif arg.startswith(("--config-dir=", "-cd=")):
            dirs.insert(0, Path(arg.split("=", 1)[1]))
    for arg in argv:
        choice = re.fullmatch(r"\+?([\w/]+)=([\w/.,-]+)", arg)  # group=option(s), e.g. model=mine or model=a,b
        if choice is None:
            continue
        group, options = choice.groups()
        for option in options.split(","):
            found = [d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()]
            if found:
                try:
                    load_yaml(found[0])
                except ValueError as e:
                    return str(e)
            elif group == "model" and option in RENAMED_PRESETS:
                new, why = RENAMED_PRESETS[option]
                return f"model={option}: the preset was renamed {new} {why} (README, 'Models, caches and footprints')"
    return None
