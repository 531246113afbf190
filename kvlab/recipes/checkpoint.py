"""kvlab's checkpoints as written by training: Lightning ``.ckpt`` files and DeepSpeed checkpoint directories.

Apart from ``kvlab.recipes.run`` so that reading one (``kvlab generate``, benchmarks) does not import Lightning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvlab.archs import CausalLM, ModelConfig, build_model


def read_checkpoint(path) -> tuple[dict, dict]:
    """(model config dict, LMModule state dict) of a kvlab checkpoint.

    A Lightning ``.ckpt`` file, or the directory DeepSpeed strategies write
    (its partitions are gathered into full fp32 tensors).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        states = lightning_fields_file(path)
        if states == path:
            raise FileNotFoundError(
                f"{path} is a directory but not a DeepSpeed checkpoint (no checkpoint/*model_states.pt)"
            )
        model = lightning_fields(path)["hyper_parameters"]["model"]
        return model, get_fp32_state_dict_from_zero_checkpoint(str(path), tag="checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated, empty or not a checkpoint: torch raises several types
        raise ValueError(f"{path}: does not load as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{path}: not a kvlab checkpoint (no state_dict and hyper_parameters.model)")
    return ckpt["hyper_parameters"]["model"], ckpt["state_dict"]


def load_checkpoint_model(path) -> CausalLM:
    """The model a kvlab checkpoint holds (``read_checkpoint``): built from its config, with its weights."""
    model_dict, state = read_checkpoint(path)
    model = build_model(ModelConfig.from_dict(model_dict))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


def lightning_fields_file(path: Path) -> Path:
    """The file holding Lightning's fields (step, hyper-parameters): the checkpoint itself, or, in a
    DeepSpeed checkpoint directory, rank 0's model-states file (``path`` unchanged when there is none)."""
    if path.is_dir():
        found = sorted(path.glob("checkpoint/*mp_rank_00_model_states.pt"))
        return found[0] if found else path
    return path


def lightning_fields(path: Path) -> dict:
    """Lightning's fields of a checkpoint file or DeepSpeed directory, read without loading the weights (mmap)."""
    return torch.load(lightning_fields_file(path), map_location="cpu", weights_only=False, mmap=True)


def checkpoint_step(path) -> int:
    """The global step a checkpoint was saved at: a Lightning file or a DeepSpeed directory; 0 if none."""
    if path is None or not lightning_fields_file(Path(path)).is_file():
        return 0
    return int(lightning_fields(Path(path)).get("global_step", 0))
