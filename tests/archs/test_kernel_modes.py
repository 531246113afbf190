"""Model-level: forcing the reference kernels and forcing the fast paths give the same model, for every preset."""

import pytest
import torch

import kvlab.kernels.ops as ops_module
from kvlab import build_model
from kvlab.kernels import registry
from tests.conftest import PRESETS, preset_dict, rel_error

DOCS = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])


def _restart_rank_schedules(model):
    """MatryoshkaKV's rank schedule moves on with every training forward: compare forwards at the same ranks."""
    for name, buffer in model.named_buffers():
        if name.endswith("rank_step"):
            buffer.zero_()


def _run(model, mode, ids, labels):
    """Packed-document logits, the loss and every parameter's gradient under ``mode``."""
    model.config.kernels = mode
    model.zero_grad()
    _restart_rank_schedules(model)
    # a model with a context encoder reads a context (not packed documents), so its encoder has gradients too
    context = ids.flip(1)[:, :8] if model.config.context is not None else None
    docs = DOCS if model.takes_packed_documents and context is None else None
    if docs is not None and ids.shape[1] > docs.shape[1]:  # longer rows: the second document runs on
        docs = torch.cat([docs, docs[:, -1:].expand(-1, ids.shape[1] - docs.shape[1])], dim=1)
    logits = model(ids, doc_ids=docs, context=context)
    _restart_rank_schedules(model)
    loss = model(ids, doc_ids=docs, labels=labels, context=context)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("name", PRESETS)
def test_reference_and_fast_kernels_agree(name, monkeypatch):
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    model = build_model(preset_dict(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    ref_logits, ref_loss, ref_grads = _run(model, "reference", ids, labels)
    logits, loss, grads = _run(model, "torch", ids, labels)
    assert rel_error(logits, ref_logits) < 1e-4
    assert rel_error(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for n, g in grads.items():
        assert rel_error(g, ref_grads[n]) < 1e-3, n


@pytest.mark.parametrize(
    "name, ran",
    [
        ("gqa", {"attention", "rms_norm", "linear_cross_entropy"}),
        # the windowed attention kernel, retention's and RWKV-6's linear attention, Mamba-2's SSD and causal
        # conv and RWKV-7's delta rule, each also checked alone in tests/kernels/test_triton.py, take this
        # model-level run only with -m slow (the suite's time)
        pytest.param("yoco_swa", {"attention"}, marks=pytest.mark.slow),
        pytest.param("gpt_oss", {"attention"}, marks=pytest.mark.slow),  # sink logits in the kernel, windows, experts
        pytest.param("retnet", {"linear_attention"}, marks=pytest.mark.slow),
        pytest.param("rwkv6", {"linear_attention"}, marks=pytest.mark.slow),
        # over 32 tokens (VECTOR_CHUNK under the interpreter): RWKV-6's decays per channel in the chunked kernels
        pytest.param("rwkv6-chunked", {"linear_attention"}, marks=pytest.mark.slow),
        pytest.param("samba", {"causal_conv1d", "selective_scan"}, marks=pytest.mark.slow),
        pytest.param("mamba2", {"causal_conv1d", "linear_attention"}, marks=pytest.mark.slow),
        pytest.param("rwkv7", {"delta_rule"}, marks=pytest.mark.slow),
    ],
)
def test_triton_kernels_give_the_same_model(name, ran, monkeypatch):
    """Under the interpreter, on packed documents: the attention, RMSNorm, fused loss, recurrent linear
    attention (RetNet; RWKV-6, which reads exclusively; Mamba-2's SSD), causal conv (Mamba-2) and delta-rule
    (RWKV-7) kernels (RoPE's tables per
    document position take the torch path)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    used = set()

    def spy(op, *args, **kwargs):  # records which backend ran each op
        backend = registry.choose(op, args, kwargs)
        used.add((op, backend.name))
        return backend.function()(*args, **kwargs)

    monkeypatch.setattr(ops_module, "dispatch", spy)
    spec = preset_dict(name.removesuffix("-chunked"))
    if name in ("retnet", "rwkv6", "rwkv6-chunked", "rwkv7", "mamba2"):
        spec["n_layers"] = 1  # the interpreter walks the recurrence token by token
    if name == "samba":
        spec["n_layers"] = 2  # one Mamba-1 layer, one windowed attention layer
    model = build_model(spec)
    ids = torch.randint(0, model.config.vocab_size, (2, 40 if name.endswith("-chunked") else 16))
    labels = ids.roll(-1, dims=1)
    ref_logits, ref_loss, ref_grads = _run(model, "reference", ids, labels)
    used.clear()
    logits, loss, grads = _run(model, "triton", ids, labels)
    assert {(op, "triton") for op in ran} <= used
    assert rel_error(logits, ref_logits) < 1e-4 and rel_error(loss, ref_loss) < 1e-5
    for n, g in grads.items():
        assert rel_error(g, ref_grads[n]) < 1e-3, n
