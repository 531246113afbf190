"""Entry point: ``python train.py recipe=NAME [overrides]``.

Hydra composes ``configs/train.yaml`` with the chosen recipe and overrides
(``python train.py --cfg job`` prints the result; ``-m`` sweeps), then
``kvlab.recipes.run`` does the work (``kvlab.recipes.uptrain`` for the
staged uptraining recipes). Configuration mistakes end the run
before training with one line naming the field and exit status 1.
"""

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kvlab.recipes.config import broken_yaml, register_configs
from kvlab.recipes.run import ConfigError, run
from kvlab.recipes.uptrain import run_uptrain

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        staged = run_uptrain if cfg.get("uptrain") is not None else run
        staged(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Tear down a multi-process run's group while Python still runs: left to interpreter exit, gloo's threads
    can be destroyed still joinable, and the process aborts ("terminate called without an active exception",
    seen once in CI after a DDP run had written its metrics)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    problem = broken_yaml(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    if problem is not None:
        print(f"kvlab: error: {problem}", file=sys.stderr)
        sys.exit(1)
    main()
