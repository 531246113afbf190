"""``python killed_train.py STEP [train.py overrides]``: train.py, SIGKILLed half-way through writing
``last.ckpt`` at global step STEP, the worst moment a kill can land. A test helper, not a test.

Half of the checkpoint's bytes reach the file being written, then the process kills itself, so
whatever was renamed into place before survives only if writes are atomic.

``validating:STEP``: killed instead in the validation after global step STEP, at its first batch;
``evaluating:STEP``: in the validation after training, at global step STEP.
"""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

WHEN = sys.argv.pop(1)
KILL_AT = int(WHEN.split(":")[-1])
_save = torch.save


def _save_then_die_halfway(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("global_step") == KILL_AT and "last.ckpt" in str(f):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)


def _dying(fn, trainer_of):
    """``fn``, killing the process when called at global step KILL_AT (``trainer_of(args)``: the trainer)."""

    def wrapped(*args, **kwargs):
        if trainer_of(args).global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapped


if WHEN.startswith("validating:"):
    from kvlab.recipes.module import LMModule

    LMModule.validation_step = _dying(LMModule.validation_step, lambda args: args[0].trainer)
elif WHEN.startswith("evaluating:"):
    import kvlab.recipes.run

    kvlab.recipes.run._validate = _dying(kvlab.recipes.run._validate, lambda args: args[0])
else:
    torch.save = _save_then_die_halfway
train_py = Path(__file__).resolve().parents[2] / "train.py"
sys.argv[0] = str(train_py)
runpy.run_path(str(train_py), run_name="__main__")
