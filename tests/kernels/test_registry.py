"""The kernel registry: modes, the environment override, per-op choices, fallbacks and their reasons."""

import importlib.util
import logging

import pytest
import torch
import torch._dynamo.testing

import kvlab.kernels.ops  # registers every op
from kvlab.kernels import registry
from kvlab.kernels.registry import choose, ops, parse_mode, use_kernels

# triton is an optional extra: without it, a forced triton mode falls back to torch
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Choices and fallbacks are logged once per process, and other tests made some of them already."""
    monkeypatch.setattr(registry, "_logged", set())


def _q():
    return torch.randn(1, 2, 5, 8)


def _attention_args():
    q = _q()
    return (q, q, q), {"causal": True}


def test_every_op_has_a_reference_and_a_torch_backend():
    assert set(ops()) == set(registry.OPS)
    for op, backends in ops().items():
        assert {"reference", "torch"} <= set(backends), op


def test_auto_on_cpu_takes_the_torch_path_and_never_interpreted_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    args, kwargs = _attention_args()
    assert choose("attention", args, kwargs).name == "torch"
    assert choose("rms_norm", (_q(), torch.ones(8), 1e-5, None)).name == "torch"


def test_modes_force_a_backend_and_fall_back_where_an_op_has_none(monkeypatch, caplog):
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    args, kwargs = _attention_args()
    with use_kernels("reference"):
        assert choose("attention", args, kwargs).name == "reference"
    with use_kernels("triton"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert choose("attention", args, kwargs).name == ("triton" if HAS_TRITON else "torch")
        assert choose("ssd", (torch.randn(1, 5, 2, 4),)).name == "torch"
    assert "ssd has no triton backend" in caplog.text
    with use_kernels("torch,attention=reference"):
        assert choose("attention", args, kwargs).name == "reference"
        assert choose("rms_norm", (_q(), torch.ones(8), 1e-5, None)).name == "torch"


def test_environment_overrides_the_config(monkeypatch):
    args, kwargs = _attention_args()
    monkeypatch.setenv("KVLAB_KERNELS", "reference")
    with use_kernels("torch"):
        assert choose("attention", args, kwargs).name == "reference"


@pytest.mark.skipif(not HAS_TRITON, reason="needs the optional triton package")
def test_triton_cannot_take_an_explicit_mask_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    q = _q()
    with use_kernels("triton"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert choose("attention", (q, q, q), {"mask": torch.ones(5, 5, dtype=torch.bool)}).name == "torch"
    assert "explicit mask" in caplog.text


def test_external_backends_are_unavailable_without_their_packages_or_cuda(monkeypatch, caplog):
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    args, kwargs = _attention_args()
    with use_kernels("external"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert choose("attention", args, kwargs).name == "torch"
    assert "flash_attn is not installed" in caplog.text or "CUDA" in caplog.text


@pytest.mark.parametrize(
    "mode, message",
    [("fast", "'fast' is not one of auto"), ("attention=turbo", "attention='turbo'"), ("attn=torch", "unknown op")],
)
def test_bad_modes_name_the_value_and_what_is_valid(mode, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(mode)
    with pytest.raises(ValueError, match="kernels"):
        from kvlab import ModelConfig

        ModelConfig(kernels=mode)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the optional triton package")
def test_a_backend_whose_module_is_missing_falls_back(monkeypatch, caplog):
    """Exported remote code carries the registry, whose Triton/external targets name kvlab modules it lacks."""
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = (torch.randn(3, 8), torch.ones(8), 1e-6, None)
    with use_kernels("triton"):  # the choice's call-independent part is now cached; registering redoes it
        assert choose("rms_norm", args).name == "triton"
    backends = dict(registry._REGISTRY["rms_norm"])
    monkeypatch.setitem(registry._REGISTRY, "rms_norm", backends)
    registry.register("rms_norm", "triton", "kvlab_missing.kernels:rms_norm")
    with use_kernels("triton"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert choose("rms_norm", args).name == "torch"
    assert "kvlab_missing.kernels is not importable" in caplog.text
    monkeypatch.undo()  # the registry's own dict is back, and so is its kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_kernels("triton"):
        assert choose("rms_norm", args).name == "triton"


def test_the_backend_chosen_is_logged_at_debug_only(monkeypatch, caplog):
    """A default run's log carries no kernel lines; the choice is there at DEBUG."""
    monkeypatch.setattr(registry, "_logged", set())
    q = torch.randn(1, 2, 3, 8)
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        kvlab.kernels.ops.attention(q, q, q, causal=True)
    assert not caplog.records
    monkeypatch.setattr(registry, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger=registry.__name__):
        kvlab.kernels.ops.attention(q, q, q, causal=True)
    assert "kernel attention:" in caplog.text


def test_auto_leaves_a_call_to_a_faster_later_backend_and_a_named_mode_does_not(monkeypatch):
    """A backend's auto_skip passes a call on in auto (kvlab's Triton attention leaves plain attention to SDPA);
    a mode naming the backend still gets it, and so does auto when no later backend can run the call."""
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    fake = registry.Backend(
        "external",
        lambda *a, **k: None,
        auto_skip=lambda q, *a, doc_ids=None, **k: "slower here" if doc_ids is None else None,
    )
    backends = {**registry._REGISTRY["attention"], "external": fake}
    monkeypatch.setitem(registry._REGISTRY, "attention", backends)
    args, kwargs = _attention_args()
    with use_kernels("auto"):
        assert choose("attention", args, kwargs).name == "torch"
        assert choose("attention", args, {**kwargs, "doc_ids": torch.zeros(1, 5, dtype=torch.long)}) is fake
    with use_kernels("external"):
        assert choose("attention", args, kwargs) is fake
    refusing = {name: registry.Backend(name, b.target, supports=lambda *a, **k: "no") for name, b in backends.items()}
    monkeypatch.setitem(registry._REGISTRY, "attention", {**refusing, "external": fake})
    with use_kernels("auto"):
        assert choose("attention", args, kwargs) is fake


def test_a_traced_op_is_not_retraced_once_the_eager_path_has_imported_its_backend(monkeypatch):
    """Inside torch.compile an op is its torch backend's function, resolved when it was registered: one resolved
    lazily there (``function()``'s first call) would be a guard that fails once eager code resolves it, and the
    next call would retrace (MLA's absorbed attention, which only the decode step calls, cost each model's second
    generation a second)."""
    fresh = {  # registered and never called, as in a new process
        name: registry.Backend(b.name, b.target, b.packages, b.supports, b.auto_skip)
        for name, b in registry._REGISTRY["rms_norm"].items()
    }
    monkeypatch.setitem(registry._REGISTRY, "rms_norm", fresh)
    counter = torch._dynamo.testing.CompileCounter()
    norm = torch.compile(lambda x, w: kvlab.kernels.ops.rms_norm(x, w, 1e-5), backend=counter, fullgraph=True)
    x, w = torch.randn(2, 8), torch.rand(8)
    traced = norm(x, w)
    torch.testing.assert_close(kvlab.kernels.ops.rms_norm(x, w, 1e-5), traced)  # eager: imports the backend
    norm(x, w)
    assert counter.frame_count == 1
