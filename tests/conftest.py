from __future__ import annotations

import os
from pathlib import Path

# One thread per test process: the suite runs a process per core (pytest-xdist, pyproject.toml), its shapes are
# tiny, and threads beyond the cores spin: on 2 cores, 2 processes of 2 threads each were slower than the suite
# in one process, 2 of one thread each twice as fast. Set before torch starts; tests' subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU only through the interpreter, which must be on before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# generate() compiles its decode step by default, seconds per model and shape; the suite decodes eagerly
# except where a test asks for compilation (tests/archs/test_compiled_decode.py).
os.environ.setdefault("KVLAB_COMPILE", "0")

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))


def preset_dict(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())


def tiny(**overrides) -> dict:
    """A model dict small enough for exact tests in milliseconds."""
    d = dict(
        vocab_size=97,
        d_model=64,
        n_layers=4,
        max_seq_len=64,
        mlp={"kind": "swiglu", "hidden": 96},
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
    )
    d.update(overrides)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error kernel tests bound."""
    return float(
        (actual.detach().double() - expected.detach().double()).abs().max()
        / expected.detach().double().abs().max().clamp(min=1e-30)
    )
