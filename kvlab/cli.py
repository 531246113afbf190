"""The ``kvlab`` command, installed with the package (``pip install kvlab``):

    kvlab train recipe=gqa_uptrain [overrides]     # train.py's job: train, uptrain, sweep with -m
    kvlab eval ckpt=PATH [overrides]               # recipe=eval
    kvlab export ckpt=PATH [overrides]             # recipe=export
    kvlab lm-eval ckpt=PATH lm_eval.tasks=[...]    # recipe=lm_eval: lm-evaluation-harness tasks
    kvlab footprint model=NAME [--budget 80GiB]    # the KV-cache footprint report
    kvlab generate PATH --prompt TEXT              # text from a checkpoint or a Hugging Face directory

``train``, ``eval``, ``export`` and ``lm-eval`` take Hydra overrides and flags as ``train.py`` does, over the configs
shipped with kvlab; ``--config-dir DIR`` puts a directory of your own (``DIR/model/mine.yaml`` ...) first on
the search path. ``train.py`` at the top of a checkout runs the same code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = {
    "train": "train, uptrain or sweep (-m) as the recipe and overrides say (train.py)",
    "eval": "evaluate a checkpoint: recipe=eval, ckpt=PATH",
    "export": "export a checkpoint to a Hugging Face directory: recipe=export, ckpt=PATH",
    "lm-eval": "lm-evaluation-harness tasks on a checkpoint: recipe=lm_eval, ckpt=PATH, lm_eval.tasks=[...]",
    "footprint": "the KV-cache footprint report of a model config (built on the meta device)",
    "generate": "generate text from a kvlab checkpoint or a Hugging Face directory",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: kvlab COMMAND [ARGS...]\n\ncommands:")
        print("\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()))
        print("\n`kvlab COMMAND --help` shows a command's own options (Hydra's for train, eval, export and lm-eval).")
        sys.exit(0 if argv else 2)
    command, args = argv[0], argv[1:]
    if command == "footprint":
        from kvlab.recipes.footprint import main as footprint

        footprint(args, prog="kvlab footprint")
    elif command == "generate":
        generate(args)
    elif command in ("train", "eval", "export", "lm-eval"):
        # recipe=eval/export/lm_eval first, so overrides after it (another recipe's settings) still apply
        train(args if command == "train" else [f"recipe={command.replace('-', '_')}", *args])
    else:
        print(f"kvlab: error: unknown command {command!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)


def train(args: list[str]) -> None:
    """``train.py``'s job with ``args`` (Hydra overrides and flags) over the shipped configs. Configuration
    mistakes end it before training with one line naming the field and exit status 1."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from kvlab._config import config_dir
    from kvlab.recipes.config import choice_problem, register_configs

    configs = config_dir()
    problem = choice_problem(args, configs)
    if problem is not None:
        _fail(problem)
    register_configs()
    given = sys.argv
    if not any(a.startswith("hydra.job.name=") for a in args):  # logs are train.log, as train.py's
        args = [*args, "hydra.job.name=train"]

    @hydra.main(version_base="1.3", config_path=str(configs), config_name="train")
    def run_job(cfg: DictConfig) -> None:
        # Lightning starts a multi-process run's other ranks with this process's command line: the one given
        sys.argv = given
        _end_with_the_sweep()
        from hydra.types import RunMode

        from kvlab.recipes.run import ConfigError, RunDiverged, run
        from kvlab.recipes.uptrain import run_uptrain

        try:
            staged = run_uptrain if cfg.get("uptrain") is not None else run
            if cfg.get("lr_sweep") is not None and cfg.lr_sweep.grid:
                from kvlab.recipes.lr_sweep import run_lr_sweep

                run_lr_sweep(cfg, Path(HydraConfig.get().runtime.output_dir), then=staged)
            else:
                staged(cfg, Path(HydraConfig.get().runtime.output_dir))
        except RunDiverged as e:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                _fail(str(e))
            # a sweep's result (its metrics.json says so; the ablation's report lists it): the other jobs go on
            print(f"kvlab: error: {e}", file=sys.stderr)
        except ConfigError as e:
            _fail(str(e))
        finally:
            _leave_process_group()

    sys.argv = [given[0], *args]  # what Hydra parses
    try:
        run_job()
    finally:
        sys.argv = given


def generate(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="kvlab generate", description=COMMANDS["generate"])
    parser.add_argument("path", help="a kvlab checkpoint (.ckpt, or a DeepSpeed checkpoint directory) with "
                        "tokenizer.json beside it, or a Hugging Face directory kvlab exported or reads")  # fmt: skip
    parser.add_argument("--prompt", required=True, action="append",
                        help="the text to continue; several: one batch, each continued as alone")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the fewest most likely tokens whose "
                        "probability reaches p (nucleus sampling)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="of the sampling (with --temperature > 0); each "
                        "prompt draws from its own generator with this seed")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="compile the decode step: pays from a few "
                        "hundred new tokens on (kvlab.archs.decode)")  # fmt: skip
    parser.add_argument("--cache-policy", help="how the cache holds keys and values: int8, int4, fp8, kivi, "
                        "sinks, h2o, snapkv, minicache, or a JSON mapping such as "
                        '\'{"kind": "sinks", "window": 60}\'')  # fmt: skip
    opts = parser.parse_args(args)
    if opts.max_new_tokens < 0:
        parser.error(f"--max-new-tokens={opts.max_new_tokens} must be >= 0")
    import torch

    from kvlab.layers.cache_policy import CachePolicy, policy_option
    from kvlab.tokenizer import eos_id

    try:
        policy = CachePolicy.from_spec(policy_option(opts.cache_policy, "--cache-policy"))  # before the model loads
        model, tokenizer = load_trained(opts.path)
        rows = [tokenizer.encode(prompt).ids for prompt in opts.prompt]
        if not all(rows):
            raise ValueError(f"--prompt {opts.prompt[rows.index([])]!r}: empty after tokenization")
        try:  # (an HF directory's tokenizer may end text with '</s>' or another: eos_id knows them)
            eos = eos_id(tokenizer)
        except ValueError:  # none at all: generate the full --max-new-tokens
            eos = None
        out = model.generate(
            rows,
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
            eos_token_id=eos,
            generator=[torch.Generator().manual_seed(opts.seed) for _ in rows],  # each prompt as alone
            compile=opts.compile,
            cache_policy=policy,
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    width = max(map(len, rows))  # the prompts, left-padded to the longest
    for i, prompt in enumerate(opts.prompt):
        new = [t for t in out[i, width:].tolist() if t != eos]
        print(("\n" if i else "") + prompt + tokenizer.decode(new))


def load_trained(path: str):
    """(model in eval mode, tokenizer) of a kvlab checkpoint with the ``tokenizer.json`` runs save beside it,
    or of a Hugging Face directory holding a ``tokenizer.json``."""
    from kvlab.tokenizer import load_tokenizer

    p = Path(path).expanduser()
    if (p / "config.json").is_file():  # a Hugging Face directory
        if not (p / "tokenizer.json").is_file():  # (before its weights are read)
            raise FileNotFoundError(
                f"{p}: no tokenizer.json in this Hugging Face directory; one with a slow tokenizer's files alone "
                "(tokenizer.model) gets one from transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
            )
        from kvlab.archs.hf import load_hf

        return load_hf(p).eval(), load_tokenizer(str(p))
    if not p.exists():
        raise FileNotFoundError(f"{path}: nothing there; give a kvlab checkpoint or a Hugging Face directory")
    beside = p.parent / "tokenizer.json"
    if not beside.is_file():
        raise FileNotFoundError(f"{beside}: no tokenizer beside the checkpoint (runs save theirs there)")
    from kvlab.recipes.checkpoint import load_checkpoint_model

    return load_checkpoint_model(p).eval(), load_tokenizer(str(beside))


def _leave_process_group() -> None:
    """Tear down a multi-process run's group while Python still runs: left to interpreter exit, gloo's threads
    can be destroyed still joinable, and the process aborts ("terminate called without an active exception",
    seen once in CI after a DDP run had written its metrics)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


_sweep_pid: int | None = None  # in a parallel sweep's worker: the sweep's process, watched


def _end_with_the_sweep(poll_s: float = 2.0, grace_s: float = 30.0) -> None:
    """In a worker of a parallel sweep (``hydra/launcher=joblib``, as ``ablation=standard`` runs): end this process
    when the sweep's is gone. A sweep killed with the basic launcher stops its one job; a joblib worker would go
    on with the job it runs and those handed to it ahead. The watch sends SIGTERM (Lightning stops after the
    step; the last periodic checkpoint resumes it, as after any kill) and ends the worker ``grace_s`` later, or
    at once when the next job starts (here) after the sweep is gone."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    global _sweep_pid
    if not multiprocessing.current_process().name.startswith("LokyProcess"):
        return
    if _sweep_pid is not None:  # a later job of this worker
        if os.getppid() != _sweep_pid:
            os._exit(1)
        return
    _sweep_pid = os.getppid()

    def watch() -> None:
        while os.getppid() == _sweep_pid:
            time.sleep(poll_s)
        print(f"kvlab: the sweep's process {_sweep_pid} is gone: ending this job", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="kvlab-sweep-watch", daemon=True).start()


def _fail(message: str) -> None:
    print(f"kvlab: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
