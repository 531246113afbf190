"""Lightning strategies for ``trainer.strategy``, CPU included.

``ddp`` is Lightning's own and ``fsdp`` Lightning's ``ModelParallelStrategy`` (PyTorch's FSDP2, ``fully_shard``
per decoder block), with the gloo backend on CPU.
``deepspeed_zero2``/``deepspeed_zero3`` use Lightning's DeepSpeed strategy on
GPUs; on CPU a small subclass lifts its CUDA-only check so ZeRO's
partitioning, gradient reduction and sharded checkpoints run (and are tested)
on machines without a GPU. DeepSpeed is an optional extra (``pip install
kvlab[deepspeed]``).
"""

from __future__ import annotations

import importlib.util
import os

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def build_strategy(name: str, accelerator: str, world_size: int | None = None):
    """The Lightning strategy object (or ``"auto"``) for ``trainer.strategy=name``; ``world_size``: the processes
    of the run, where the config gives them (``fsdp`` shards over all of them)."""
    on_cpu = accelerator == "cpu"
    backend = "gloo" if on_cpu else None
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=backend)
    if name == "fsdp":
        # FSDP2: LMModule.configure_model shards each decoder block (fully_shard) over every process; no tensor
        # parallelism. Checkpoints are gathered into one file on rank 0, as every other strategy's, so resume,
        # init and export read them alike.
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size or "auto", tensor_parallel_size=1,
                                     save_distributed_checkpoint=False, process_group_backend=backend)  # fmt: skip
    if name.startswith("deepspeed_zero"):
        stage = int(name.removeprefix("deepspeed_zero"))
        if on_cpu:
            # DeepSpeed picks its accelerator once, at import: tell it before anything imports it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            return _cpu_deepspeed_class()(stage=stage, process_group_backend="gloo")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=stage)
    raise ValueError(f"trainer.strategy={name!r} is not one of {', '.join(STRATEGIES)}")


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _cpu_deepspeed_class():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeed strategy without its CUDA-only check, for CPU processes over gloo."""

        strategy_name = "deepspeed_cpu"

        @property
        def root_device(self):
            # DeepSpeed reads the device index as "this process has a device of its own" (>= 0);
            # every CPU rank shares device 0 of the CPU accelerator.
            import torch

            return torch.device("cpu", 0)

        def setup_environment(self) -> None:
            # Skip DeepSpeedStrategy's "CUDA GPUs only" check; the rest (ranks, process group) is DDP's.
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            # As DeepSpeedStrategy's, minus its check that devices are GPU indices matching the local ranks.
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return CPUDeepSpeedStrategy
